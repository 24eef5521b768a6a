"""Auditing a model trained elsewhere: a user's architecture, trained with plain PyTorch, supplied to ccl."""

from __future__ import annotations

import json
import textwrap
import warnings

import numpy as np
import pytest
import torch

import ccl
from ccl import cli
from ccl.audit.supplied import MEMBER_ACCURACY_Z, member_accuracy_z, supplied_split, target_fit_note
from ccl.config import ConfigError, ExperimentConfig
from ccl.results import load_scores

MODULE = """
import torch

def build(num_classes, input_shape, seed=None):
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(input_shape[0], 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, num_classes))
"""


@pytest.fixture
def user_model(tmp_path, monkeypatch):
    (tmp_path / "user_net.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import importlib

    return importlib.import_module("user_net")


def test_a_model_trained_elsewhere_is_audited_and_the_loss_auc_recomputes_by_hand(tmp_path, user_model):
    data = ccl.data.load("digits")
    rng = np.random.default_rng(0)
    members = np.sort(rng.choice(len(data), 150, replace=False))
    torch.manual_seed(0)
    model = user_model.build(10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = data.x[members], data.y[members]
    for _ in range(100):  # plain PyTorch, outside ccl: overfits the 150 members
        for i in range(0, 150, 32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
            opt.step()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    np.save(tmp_path / "members.npy", members)
    out = tmp_path / "audit"
    argv = [
        "audit",
        "--dataset",
        "digits",
        "--model",
        "user_net:build",
        "--target-checkpoint",
        "model.pt",
        "--target-members",
        "members.npy",
        "--epochs",
        "20",
        "--batch-size",
        "32",
        "--lr",
        "0.1",
        "--schedule",
        "constant",
        "--num-references",
        "4",
        "--bootstrap",
        "0",
        "--attacks",
        "loss",
        "lira",
        "label_only_boundary",
        "gradient",
        "--quiet",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    result = json.loads((out / "results" / "ce" / "seed-0" / "metrics.json").read_text())
    # the checkpoint's boundary distances and gradient norms are measured: its attacks run, as every other
    assert {"label_only_boundary", "gradient"} <= set(result["attacks"])
    assert result["attacks"]["gradient"]["auc"] > 0.6
    split = ccl.data.MembershipSplit.load(out / "splits" / "seed-0.npz")
    assert set(split.target_members) <= set(members) and split.target_in.sum() == (~split.target_in).sum()
    assert not set(split.target_nonmembers) & set(members)
    model.eval()
    with torch.no_grad():
        logits = model(data.x[split.pool]).double()  # ccl scores in float64 from the float32 logits
        loss = torch.nn.functional.cross_entropy(logits, data.y[split.pool], reduction="none")
    by_hand = ccl.metrics.roc_auc(-loss.numpy(), split.target_in)  # the loss attack ranks by the loss
    assert result["attacks"]["loss"]["auc"] == pytest.approx(by_hand, abs=1e-9)
    assert by_hand > 0.6  # the supplied model overfits: the audit sees it
    assert "supplied" in result["notes"][0] and "recipe" in result["notes"][0]
    assert not any("does not look trained" in note for note in result["notes"])
    assert "not trained by ccl" in (out / "report.html").read_text()
    assert len(list((out / "models").glob("*/outputs.npz"))) == 4  # the references only
    scores = load_scores(out / "results" / "ce" / "seed-0")
    np.testing.assert_allclose(scores["target_loss"], loss.numpy(), rtol=1e-5, atol=1e-6)


def _train_elsewhere(user_model, x, y, *, lr):
    """The user's network fitted with plain PyTorch, outside ccl, to the records `(x, y)` (until it overfits)."""
    torch.manual_seed(0)
    model = user_model.build(10, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    for _ in range(100):
        for i in range(0, len(y), 32):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i : i + 32]), y[i : i + 32]).backward()
            opt.step()
    return model


@pytest.mark.parametrize("pixels", ["raw", "ccl"])
def test_a_target_trained_on_raw_digits_is_flagged_with_both_accuracies(tmp_path, user_model, pixels):
    # scikit-learn's raw digits are 0..16, ccl's are divided by 16: a ReLU network trained on the raw ones still
    # classifies ccl's as before (the accuracies look fine), but its outputs are flat (loss 1.5 instead of 0.003)
    from sklearn.datasets import load_digits

    data = ccl.data.load("digits")
    raw = torch.tensor(load_digits().data, dtype=torch.float32)
    members = np.sort(np.random.default_rng(0).choice(len(data), 150, replace=False))
    x = (raw if pixels == "raw" else data.x)[members]
    model = _train_elsewhere(user_model, x, data.y[members], lr=0.01 if pixels == "raw" else 0.1)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    np.save(tmp_path / "members.npy", members)
    out = tmp_path / "audit"
    argv = ["audit", "--dataset", "digits", "--model", "user_net:build", "--target-checkpoint", "model.pt"]
    argv += ["--target-members", "members.npy", "--epochs", "10", "--batch-size", "32", "--lr", "0.1"]
    argv += ["--num-references", "2", "--bootstrap", "0", "--attacks", "loss", "--quiet", "--out", str(out)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cli.main(argv) == 0
    flagged = [str(w.message) for w in caught if "does not look trained" in str(w.message)]
    result = json.loads((out / "results" / "ce" / "seed-0" / "metrics.json").read_text())
    if pixels == "ccl":
        assert not flagged and not any("does not look trained" in note for note in result["notes"])
        return
    assert len(flagged) == 1 and flagged[0] in result["notes"]  # printed by the command line, kept in the result
    note = flagged[0]
    members_acc = f"{100 * result['train_acc']:.1f}% on its {result['num_members']} members"
    others = result["num_nonmembers"] + result["num_population"]
    assert members_acc in note and f"{100 * result['test_acc']:.1f}% on {others} records it did not" in note
    assert result["train_acc"] > 0.99 and result["test_acc"] > 0.8  # the accuracies alone would not show it
    assert "fits its own members worse" in note and "z =" not in note
    assert ccl.data.preprocessing("digits") in note and "did not standardise them" in note
    assert "preprocessed otherwise" in note and "--target-members" in note
    assert "does not look trained" in (out / "report.html").read_text()


def _fixture_split_and_logits(*, flat: float = 1.0, wrong_members: bool = False):
    """A supplied target's split over 600 records (150 members) and logits `(1 + 2, Q, 10)`: the target gets its
    members right with a logit of `10 / flat` (0 elsewhere) and 80% of the others with a logit of `3 / flat`; the
    two references get their members right with 10, and 80% of the rest with 3."""
    rng = np.random.default_rng(0)
    members = np.sort(rng.choice(600, 150, replace=False))
    split = supplied_split(members, 600, num_references=2, seed=0, population_fraction=0.2)
    query = np.r_[split.pool, split.population]
    labels = rng.integers(0, 10, query.size)
    trained_on = np.isin(query, members)
    if wrong_members:  # the target learnt other records than those listed
        trained_on = rng.permutation(trained_on)
    logits = np.zeros((3, query.size, 10), np.float32)
    guesses = np.where(rng.random((3, query.size)) < 0.8, labels, (labels + 1) % 10)  # right 80% of the time
    logits[0, np.arange(query.size), np.where(trained_on, labels, guesses[0])] = np.where(trained_on, 10.0, 3.0) / flat
    for k in (1, 2):
        is_in = np.r_[split.reference_in[k - 1], np.zeros(split.population.size, bool)]
        logits[k, np.arange(query.size), np.where(is_in, labels, guesses[k])] = np.where(is_in, 10.0, 3.0)
    return logits, labels, split


def test_the_fit_check_names_each_symptom_and_stays_quiet_on_a_healthy_target():
    logits, labels, split = _fixture_split_and_logits()
    assert target_fit_note(logits, labels, split, preprocessing="P.") is None
    assert target_fit_note(logits[:, :, None], labels, split, preprocessing="P.") is None  # (1 + K, Q, A, C)
    # flat outputs, the same predictions: only the loss shows it
    logits, labels, split = _fixture_split_and_logits(flat=16.0)
    note = target_fit_note(logits, labels, split, preprocessing="How ccl preprocessed it.")
    assert "100.0% on its 150 members" in note and "fits its own members worse" in note and "z =" not in note
    assert note.endswith("How ccl preprocessed it.")
    assert target_fit_note(logits[:1], labels, split, preprocessing="P.") is None  # no references: no yardstick
    # the wrong members: only the accuracy shows it, with the references or without
    logits, labels, split = _fixture_split_and_logits(wrong_members=True)
    for given in (logits, logits[:1]):
        note = target_fit_note(given, labels, split, preprocessing="P.")
        assert "does not classify its members clearly better" in note and "fits its own members worse" not in note


def test_member_accuracy_z_is_the_two_proportion_test_at_its_level():
    member, nonmember = np.r_[np.ones(90, bool), np.zeros(10, bool)], np.r_[np.ones(160, bool), np.zeros(40, bool)]
    pooled = 250 / 300
    by_hand = (0.9 - 0.8) / np.sqrt(pooled * (1 - pooled) * (1 / 100 + 1 / 200))
    assert member_accuracy_z(member, nonmember) == pytest.approx(by_hand, rel=1e-12)
    assert member_accuracy_z(np.ones(5, bool), np.ones(7, bool)) == 0.0  # all right: no evidence of a difference
    # equal accuracies (the wrong members) pass the check about 1% of the time: a Monte Carlo estimate
    rng = np.random.default_rng(0)
    passed = [
        member_accuracy_z(rng.random(150) < 0.85, rng.random(330) < 0.85) > MEMBER_ACCURACY_Z for _ in range(4000)
    ]
    assert 0.004 < np.mean(passed) < 0.02


def test_supplied_outputs_instead_of_weights(tmp_path, user_model):
    data = ccl.data.load("digits")
    members = np.zeros(len(data), bool)
    members[:400] = True
    logits = np.random.default_rng(0).normal(size=(len(data), 10)).astype(np.float32)
    logits[np.arange(400), data.y[:400].numpy()] += 3  # members: confident
    np.save(tmp_path / "logits.npy", logits)
    np.save(tmp_path / "mask.npy", members)
    out = tmp_path / "audit"
    assert (
        cli.main(
            [
                "audit",
                "--dataset",
                "digits",
                "--target-logits",
                "logits.npy",
                "--target-members",
                "mask.npy",
                "--epochs",
                "2",
                "--num-references",
                "2",
                "--bootstrap",
                "0",
                "--attacks",
                "loss",
                "gradient",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads((out / "results" / "ce" / "seed-0" / "metrics.json").read_text())
    assert result["attacks"]["loss"]["auc"] > 0.9
    # outputs have no weights: the white-box attack is skipped, and the result says so
    assert "gradient" not in result["attacks"] and any("gradient attack was skipped" in n for n in result["notes"])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"target_checkpoint": "model.pt"}, "needs both its members"),
        ({"target_members": "members.npy"}, "needs both its members"),
        ({"target_members": "members.npy", "target_checkpoint": "model.pt", "target_logits": "model.pt"}, "not both"),
        ({"target_members": "missing.npy", "target_checkpoint": "model.pt"}, "`target_members`"),
        ({"target_members": "members.npy", "target_checkpoint": "model.pt", "canaries": 2}, "Canaries"),
    ],
)
def test_supplied_target_options_are_checked(tmp_path, monkeypatch, changes, message):
    monkeypatch.chdir(tmp_path)
    np.save(tmp_path / "members.npy", np.arange(10))
    torch.save({}, tmp_path / "model.pt")
    with pytest.raises(ConfigError, match=message):
        ExperimentConfig.from_dict({"dataset": "digits", **changes})


def test_report_exports_the_table_for_pipelines(tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "compare",
                "--dataset",
                "synthetic",
                "--data-option",
                "num_samples=160",
                "--epochs",
                "2",
                "--num-references",
                "4",
                "--bootstrap",
                "0",
                "--quiet",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert cli.main(["report", str(out), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["defense"] == "ce"
    assert cli.main(["report", str(out), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("defense,seeds,test_acc")
    assert cli.main(["report", str(out), "--format", "md"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("## Summary") and "### single target, random records" in md
    assert "### pooled leave-one-out, random records" in md
