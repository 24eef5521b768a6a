"""Models and the training engine: determinism, resume after SIGKILL, logs, errors, augmentation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import ccl
from ccl.training import Recipe, TrainingError, augment_batch, fit, lr_at

TINY = dict(epochs=4, batch_size=32, lr=0.05)


def tiny_problem(seed=0):
    data = ccl.data.load("synthetic", num_samples=200, num_features=10, num_classes=3, seed=seed)
    return (data.x[:100], data.y[:100]), (data.x[100:], data.y[100:])


def tiny_model(seed=0):
    return ccl.models.create("mlp", num_classes=3, input_shape=(10,), hidden=(32,), seed=seed)


# ------------------------------------------------------------------ models
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet18", "wrn"])
def test_models_build_and_are_seeded(name):
    shape = (12,) if name == "mlp" else (3, 16, 16)
    params = {"width": 8} if name in ("cnn", "resnet18") else ({"width": 1, "depth": 10} if name == "wrn" else {})
    a = ccl.models.create(name, num_classes=5, input_shape=shape, seed=1, **params)
    b = ccl.models.create(name, num_classes=5, input_shape=shape, seed=1, **params)
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    assert a.eval()(torch.randn(2, *shape)).shape == (2, 5)


def test_model_errors():
    with pytest.raises(ValueError, match="Unknown model 'resnet19'.*Did you mean"):
        ccl.models.create("resnet19", num_classes=10, input_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="`input_shape`.*image model 'resnet18'"):
        ccl.models.create("resnet18", num_classes=10, input_shape=(600,))
    with pytest.raises(ValueError, match="`num_classes`"):
        ccl.models.create("mlp", num_classes=1, input_shape=(4,))
    with pytest.raises(ValueError, match="hiden.*hidden"):
        ccl.models.create("mlp", num_classes=3, input_shape=(4,), hiden=(3,))


def test_architecture_sizes_match_the_literature():
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(ccl.models.create("resnet18", num_classes=10, input_shape=(3, 32, 32))) == 11_173_962
    assert n(ccl.models.create("resnet34", num_classes=10, input_shape=(3, 32, 32))) == 21_282_122
    assert (
        n(ccl.models.create("mlp", num_classes=100, input_shape=(600,)))
        == 600 * 1024 + 1024 + 1024 * 512 + 512 + 512 * 256 + 256 + 256 * 128 + 128 + 128 * 100 + 100
    )


# ------------------------------------------------------------------ fit
def test_fit_learns_logs_and_is_deterministic(tmp_path, quiet):
    train, heldout = tiny_problem()
    r1 = fit(
        tiny_model(),
        ccl.losses.create("ccel"),
        train,
        heldout=heldout,
        recipe=Recipe(**TINY),
        runtime=quiet,
        checkpoint_dir=tmp_path / "a",
    )
    r2 = fit(tiny_model(), ccl.losses.create("ccel"), train, heldout=heldout, recipe=Recipe(**TINY), runtime=quiet)
    for pa, pb in zip(r1.model.state_dict().values(), r2.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    for key in (
        "train_loss",
        "train_acc",
        "heldout_acc",
        "member_loss_mean",
        "member_loss_var",
        "nonmember_loss_mean",
        "nonmember_loss_var",
        "lr",
    ):
        assert key in log[-1]
    assert log[-1]["member_acc"] > 0.6
    r3 = fit(tiny_model(), ccl.losses.create("ccel"), train, recipe=Recipe(**{**TINY, "seed": 1}), runtime=quiet)
    assert not torch.equal(r3.model.net[1].weight, r1.model.net[1].weight)


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_member_loss_variance_matches_a_direct_computation(optimizer, quiet):
    train, heldout = tiny_problem()
    r = fit(
        tiny_model(),
        ccl.losses.create("ce"),
        train,
        heldout=heldout,
        recipe=Recipe(**{**TINY, "optimizer": optimizer, "lr": 0.01}),
        runtime=quiet,
    )
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(r.model(train[0]), train[1], reduction="none").double()
    assert r.history[-1]["member_loss_var"] == pytest.approx(ce.var(unbiased=False).item(), rel=1e-6)
    assert r.history[-1]["member_loss_mean"] == pytest.approx(ce.mean().item(), rel=1e-6)


def test_checkpoint_resume_continues_exactly(tmp_path, quiet):
    train, heldout = tiny_problem()
    full = fit(tiny_model(), ccl.losses.create("relaxloss", alpha=0.5), train, recipe=Recipe(**TINY), runtime=quiet)
    part = Recipe(**{**TINY})
    # train two epochs, then "crash": rebuild everything and continue from the checkpoint
    fit(
        tiny_model(),
        ccl.losses.create("relaxloss", alpha=0.5),
        train,
        recipe=Recipe(**{**TINY, "epochs": 4}),
        runtime=quiet,
        checkpoint_dir=tmp_path,
    )
    state = ccl.training.load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["epoch"] == 4
    resumed = fit(
        tiny_model(seed=99),
        ccl.losses.create("relaxloss", alpha=0.5),
        train,
        recipe=part,
        runtime=quiet,
        checkpoint_dir=tmp_path,
    )
    assert resumed.resumed_from_epoch == 4
    for pa, pb in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb)
    with pytest.raises(ValueError, match="another recipe"):
        fit(
            tiny_model(),
            ccl.losses.create("ce"),
            train,
            recipe=Recipe(**{**TINY, "lr": 0.5}),
            runtime=quiet,
            checkpoint_dir=tmp_path,
        )


_KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch, ccl
    from ccl.training import Recipe, Runtime, fit
    ccl.training.CHECKPOINT_EVERY_S = 0.0  # a checkpoint after every epoch: the kill lands between two of them
    QUIET = Runtime(progress=False)
    data = ccl.data.load("synthetic", num_samples=200, num_features=10, num_classes=3, seed=0)
    model = ccl.models.create("mlp", num_classes=3, input_shape=(10,), hidden=(32,), seed=0)
    slow = sys.argv[2] == "slow"
    base = ccl.losses.create("ccql")
    def loss_fn(out, y):
        if slow:
            time.sleep(0.01)  # gives the test time to kill mid-epoch
        return base(out, y)
    cfg = Recipe(epochs=8, batch_size=16, lr=0.05)
    r = fit(model, loss_fn, (data.x[:100], data.y[:100]), recipe=cfg, runtime=QUIET, checkpoint_dir=sys.argv[1])
    torch.save(r.model.state_dict(), sys.argv[1] + "/final.pt")
""")


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_KILL_SCRIPT)
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    subprocess.run([sys.executable, str(script), str(ref_dir), "fast"], check=True, env=env)
    proc = subprocess.Popen([sys.executable, str(script), str(run_dir), "slow"], env=env)
    ckpt = run_dir / "checkpoint.pt"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for epoch 2's checkpoint, then kill within epoch 3
        if ckpt.exists() and ccl.training.load_checkpoint(ckpt)["epoch"] >= 2:
            break
        time.sleep(0.02)
    time.sleep(0.03)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = ccl.training.load_checkpoint(ckpt)["epoch"]
    assert 2 <= killed_at < 8, "the kill should land mid-training"
    assert not (run_dir / "final.pt").exists()
    # what the kill left under its real names is complete: the log parses line by line
    assert len([json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]) >= killed_at
    subprocess.run([sys.executable, str(script), str(run_dir), "fast"], check=True, env=env)
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]  # stale temp files swept
    a = torch.load(ref_dir / "final.pt", weights_only=True)
    b = torch.load(run_dir / "final.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.usefixtures("checkpoint_every_epoch")
def test_non_finite_loss_names_epoch_and_batch_and_keeps_checkpoint(tmp_path, quiet):
    train, _ = tiny_problem()
    calls = {"n": 0}

    def exploding(out, y):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(out, y)
        return loss * float("nan") if calls["n"] == 6 else loss  # 4 batches per epoch: epoch 1, batch 1

    with pytest.raises(TrainingError, match="epoch 1 .*batch 1.*checkpoint.pt"):
        fit(tiny_model(), exploding, train, recipe=Recipe(**TINY), runtime=quiet, checkpoint_dir=tmp_path)
    assert ccl.training.load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def test_diverging_training_with_a_ccl_loss_names_epoch_and_batch(tmp_path, quiet):
    train, _ = tiny_problem()
    with pytest.raises(TrainingError, match="epoch 0 .*batch"):
        fit(
            tiny_model(),
            ccl.losses.create("ccel"),
            train,
            recipe=Recipe(**{**TINY, "lr": 1e30}),
            runtime=quiet,
            checkpoint_dir=tmp_path,
        )


def test_bad_data_gets_clear_errors(quiet):
    train, _ = tiny_problem()
    ce = ccl.losses.create("ce")
    cfg = Recipe(**TINY)
    with pytest.raises(ValueError, match="train labels.*\\[0, 3\\).*\\[0, 7\\]"):
        fit(tiny_model(), ce, (train[0], torch.arange(100) % 8), recipe=cfg, runtime=quiet)
    with pytest.raises(ValueError, match="cannot take inputs of shape \\(7,\\)"):
        fit(tiny_model(), ce, (torch.randn(10, 7), torch.zeros(10, dtype=torch.long)), recipe=cfg, runtime=quiet)
    with pytest.raises(ValueError, match="`train`.*non-empty"):
        fit(tiny_model(), ce, (torch.randn(0, 10), torch.zeros(0, dtype=torch.long)), recipe=cfg, runtime=quiet)
    with pytest.raises(ValueError, match="`augment`"):
        fit(tiny_model(), ce, train, recipe=Recipe(**{**TINY, "augment": True}), runtime=quiet)
    with pytest.raises(ValueError, match="`optimizer`.*'sgd'.*'rmsprop'"):
        Recipe(optimizer="rmsprop")
    with pytest.raises(ValueError, match="`lr`"):
        Recipe(lr=-1.0)


def test_corrupt_checkpoint_is_refused_with_its_path(tmp_path, quiet):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    train, _ = tiny_problem()
    with pytest.raises(ValueError, match="checkpoint.pt.*corrupt"):
        fit(tiny_model(), ccl.losses.create("ce"), train, recipe=Recipe(**TINY), runtime=quiet, checkpoint_dir=tmp_path)


def test_lr_schedules():
    cfg = Recipe(epochs=100, lr=0.1, schedule="multistep", milestones=(0.5, 0.75))
    assert [lr_at(e, cfg) for e in (0, 49, 50, 74, 75, 99)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cos = Recipe(epochs=10, lr=0.2, schedule="cosine")
    assert lr_at(0, cos) == pytest.approx(0.2) and lr_at(5, cos) == pytest.approx(0.1)


def test_batched_augmentation_matches_a_per_image_loop():
    x = torch.randn(6, 3, 8, 8)
    g1 = torch.Generator().manual_seed(0)
    got = augment_batch(x, g1, padding=2)
    g2 = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 5, (6,), generator=g2)
    dx = torch.randint(0, 5, (6,), generator=g2)
    flip = torch.rand(6, generator=g2) < 0.5
    for i in range(6):
        padded = torch.nn.functional.pad(x[i], (2, 2, 2, 2))
        crop = padded[:, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        if flip[i]:
            crop = crop.flip(2)
        assert torch.equal(got[i], crop)


def test_image_training_with_augmentation_and_flip_queries(quiet):
    data = ccl.data.load("digits", as_image=True)
    model = ccl.models.create("cnn", num_classes=10, input_shape=data.input_shape, width=8, seed=0)
    r = fit(
        model,
        ccl.losses.create("ce"),
        (data.x[:256], data.y[:256]),
        recipe=Recipe(epochs=2, batch_size=64, lr=0.05, augment=True),
        runtime=quiet,
    )
    logits = ccl.training.predict_logits(r.model, data.x[:10], flip_queries=True)
    assert logits.shape == (10, 2, 10)
    plain = ccl.training.predict_logits(r.model, data.x[:10])
    np.testing.assert_allclose(logits[:, 0], plain, rtol=1e-5, atol=1e-5)


def test_a_checkpoint_is_written_every_so_many_seconds_and_after_the_last_epoch(tmp_path, quiet, monkeypatch):
    """A checkpoint after every epoch (each with fsync) cost up to 75% of a small model's training: a short run
    writes one, after its last epoch (and its whole log); with the interval at 0, one per epoch."""
    import ccl.training as training

    saved = []
    real = training._save_checkpoint

    def counted(path, model, optimizer, epochs, *rest):
        saved.append(epochs)
        return real(path, model, optimizer, epochs, *rest)

    monkeypatch.setattr(training, "_save_checkpoint", counted)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))

    def train(folder: str) -> None:
        recipe = Recipe(epochs=4, batch_size=16, seed=0)
        fit(torch.nn.Linear(5, 3), torch.nn.CrossEntropyLoss(), (x, y), recipe=recipe, runtime=quiet,
            checkpoint_dir=tmp_path / folder)  # fmt: skip

    train("a")
    assert saved == [4]
    monkeypatch.setattr(training, "CHECKPOINT_EVERY_S", 0.0)
    train("b")
    assert saved == [4, 1, 2, 3, 4]
    assert len((tmp_path / "a" / "log.jsonl").read_text().splitlines()) == 4
