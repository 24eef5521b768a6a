"""DPTrainer(per_sample="ghost"): per-sample norms from torch.func, the clipped sum from one backward pass.

Checked against a loop of single-record backward passes (the clipped sum of per-sample gradients, 1e-5) and
against Opacus' hooks (the whole step, noise included, given the same generator state)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

pytest.importorskip("opacus")

import ccl  # noqa: E402
import ccl.defenses  # noqa: E402
from ccl.defenses.dpsgd import DPTrainer, is_plain_mlp  # noqa: E402
from ccl.errors import InvalidArgumentError  # noqa: E402


def settings(max_grad_norm: float = 0.5, noise_multiplier: float = 1.0):
    defense = ccl.defenses.create("dpsgd", max_grad_norm=max_grad_norm, noise_multiplier=noise_multiplier)
    return defense.procedure


def data(n: int = 13, d: int = 20, c: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def mlp(activation: str = "tanh", d: int = 20, c: int = 7) -> nn.Module:
    return ccl.models.create("mlp", num_classes=c, input_shape=(d,), seed=0, hidden=(16, 8), activation=activation)


def clipped_sum_by_loop(model: nn.Module, loss_fn, x, y, max_grad_norm: float) -> tuple[list, torch.Tensor]:
    """Sum over records of min(1, C / (||g_i|| + 1e-6)) g_i, each g_i from its own backward pass; and the norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    norms = []
    for i in range(x.shape[0]):
        g = torch.autograd.grad(loss_fn(model(x[i : i + 1]), y[i : i + 1]), params)
        norm = torch.sqrt(sum(t.double().square().sum() for t in g))
        norms.append(norm)
        factor = min(1.0, max_grad_norm / (float(norm) + 1e-6))
        for acc, t in zip(total, g, strict=True):
            acc += factor * t
    return total, torch.stack(norms)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("loss", ["ce", "ccel"])
@pytest.mark.parametrize(("ghost", "chunk"), [(True, None), (False, None), (False, 1), (False, 4)])
def test_clipped_sum_equals_a_per_sample_loop(activation, loss, ghost, chunk):
    x, y = data()
    loss_fn = ccl.losses.create(loss)
    reference_model = mlp(activation)
    _, norms = clipped_sum_by_loop(reference_model, loss_fn, x, y, 1.0)
    bound = float(norms.median())  # about half the records clipped, half not
    expected, _ = clipped_sum_by_loop(reference_model, loss_fn, x, y, bound)
    trainer = DPTrainer(
        mlp(activation),
        settings(max_grad_norm=bound),
        num_records=100,
        batch_size=13,
        epochs=1,
        per_sample="ghost",
    )
    assert trainer.module.ghost  # a plain MLP: ghost norms unless told otherwise
    trainer.module.ghost = ghost  # False: the norms from torch.func, the fallback for other layouts
    if chunk is not None:
        trainer.module.chunk = chunk  # several chunks, the last one short (13 records)

    loss_fn(trainer.module(x), y).backward()
    for p, e in zip(trainer.model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-5)


def test_norms_equal_the_per_sample_loop():
    x, y = data(n=9)
    loss_fn = ccl.losses.create("ce")
    model = mlp()
    _, norms = clipped_sum_by_loop(model, loss_fn, x, y, 1.0)
    trainer = DPTrainer(model, settings(), num_records=100, batch_size=9, epochs=1, per_sample="ghost")
    logits = model(x).detach().requires_grad_(True)
    out_grad = torch.autograd.grad(loss_fn.per_sample(logits, y).sum(), logits)[0]
    torch.testing.assert_close(trainer.module.norms(x, out_grad).double(), norms, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("noise_multiplier", [0.0, 1.0])
def test_steps_equal_opacus_hooks_given_the_same_noise(noise_multiplier):
    """Three SGD-with-momentum steps, on batches of varying size (Poisson), match Opacus' hooks and DPOptimizer."""
    loss_fn = ccl.losses.create("ce")
    model = mlp()
    x, y = data(n=12, seed=1)
    bound = float(clipped_sum_by_loop(model, loss_fn, x, y, 1.0)[1].median())
    trainers = {
        kind: DPTrainer(
            copy.deepcopy(model),
            settings(max_grad_norm=bound, noise_multiplier=noise_multiplier),
            num_records=60,
            batch_size=12,
            epochs=1,
            per_sample=kind,
        )
        for kind in ("opacus", "ghost")
    }
    optimizers = {
        kind: t.optimizer(torch.optim.SGD(t.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4))
        for kind, t in trainers.items()
    }
    for kind, t in trainers.items():
        t.start_epoch(optimizers[kind], seed=3, epoch=0, device=torch.device("cpu"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for step, n in enumerate((12, 9, 15)):
            x, y = data(n=n, seed=step + 1)
            for kind, t in trainers.items():
                optimizers[kind].zero_grad(set_to_none=True)
                loss_fn(t.module(x), y).backward()
                optimizers[kind].step()
    for a, b in zip(trainers["opacus"].model.parameters(), trainers["ghost"].model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_which_models_take_the_fast_path():
    assert is_plain_mlp(mlp())
    assert not is_plain_mlp(ccl.models.create("cnn", num_classes=10, input_shape=(3, 16, 16), width=4))
    assert not is_plain_mlp(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 2)))
    assert not is_plain_mlp(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))

    def make(model, per_sample):
        return DPTrainer(model, settings(), num_records=100, batch_size=10, epochs=1, per_sample=per_sample)

    assert make(mlp(), "opacus").per_sample == "opacus"  # the default stays Opacus' hooks
    assert make(mlp(), "auto").per_sample == "ghost"
    cnn = ccl.models.create("cnn", num_classes=10, input_shape=(3, 16, 16), width=4)
    assert make(cnn, "auto").per_sample == "opacus"
    with pytest.raises(InvalidArgumentError, match="plain MLP"):
        make(ccl.models.create("cnn", num_classes=10, input_shape=(3, 16, 16), width=4), "ghost")
    with pytest.raises(InvalidArgumentError, match="per_sample"):
        make(mlp(), "hooks")


def test_evaluation_needs_no_gradient_and_registers_nothing():
    x, _ = data()
    trainer = DPTrainer(mlp(), settings(), num_records=100, batch_size=13, epochs=1, per_sample="ghost")
    with torch.no_grad():
        out = trainer.module(x)
    assert not out.requires_grad
    torch.testing.assert_close(out, trainer.model(x))


def test_ghost_norms_equal_the_per_sample_loop_and_a_reused_layer_falls_back_to_ghost():
    x, y = data(n=9)
    loss_fn = ccl.losses.create("ce")
    model = mlp()
    _, norms = clipped_sum_by_loop(model, loss_fn, x, y, 1.0)
    trainer = DPTrainer(model, settings(), num_records=100, batch_size=9, epochs=1, per_sample="ghost")
    seen = []
    trainer.module._clip = lambda inputs, g, out, layers: seen.append(
        trainer.module.ghost_norms(out, g * inputs.shape[0], layers) if layers else None
    )
    loss_fn(trainer.module(x), y).backward()
    torch.testing.assert_close(seen[0].double(), norms, rtol=1e-5, atol=1e-6)

    class Twice(nn.Module):  # one Linear layer applied twice: |a|^2 |delta|^2 no longer holds
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(20, 20), nn.Linear(20, 7)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    twice = Twice()
    expected, _ = clipped_sum_by_loop(twice, loss_fn, x, y, 0.3)
    trainer = DPTrainer(
        copy.deepcopy(twice),
        settings(max_grad_norm=0.3),
        num_records=100,
        batch_size=9,
        epochs=1,
        per_sample="ghost",
    )
    loss_fn(trainer.module(x), y).backward()
    for p, e in zip(trainer.model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-5)


def test_an_in_place_activation_falls_back_from_ghost_norms_and_the_model_stays_picklable(tmp_path):
    """ReLU(inplace=True) overwrites a Linear layer's recorded output: the ghost formula would read the
    activation's gradient, so the norms come from torch.func instead; no hook is left on the user's model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(inplace=True), nn.Linear(16, 7))
    x, y = data(n=11)
    loss_fn = ccl.losses.create("ce")
    expected, _ = clipped_sum_by_loop(model, loss_fn, x, y, 0.3)
    trainer = DPTrainer(copy.deepcopy(model), settings(max_grad_norm=0.3), num_records=100, batch_size=11, epochs=1)
    assert trainer.per_sample == "ghost"
    loss_fn(trainer.module(x), y).backward()
    for p, e in zip(trainer.model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-5)
    assert not any(m._forward_hooks for m in trainer.model.modules())
    torch.save(trainer.model, tmp_path / "whole.pt")  # a user may save the trained module whole


@pytest.mark.parametrize("per_sample", ["opacus", "ghost"])
def test_the_noise_has_the_hand_computed_scale_and_is_fresh_at_every_step(per_sample):
    """SGD at lr 1 without momentum: a noisy step's update minus the noiseless update from the same weights is
    the noise alone, N(0, (noise_multiplier * max_grad_norm / B)^2) in every coordinate with B the expected batch
    size (here 12, while the batch holds 9 records), drawn afresh at each step and each epoch."""
    loss_fn = ccl.losses.create("ce")
    model = ccl.models.create("mlp", num_classes=7, input_shape=(20,), seed=0, hidden=(128, 64))  # 11,399 parameters
    sigma, bound, expected_batch = 2.0, 0.5, 12
    x, y = data(n=9)

    def trainer(noise_multiplier):
        t = DPTrainer(
            copy.deepcopy(model),
            settings(max_grad_norm=bound, noise_multiplier=noise_multiplier),
            num_records=60,
            batch_size=expected_batch,
            epochs=2,
            per_sample=per_sample,
        )
        return t, t.optimizer(torch.optim.SGD(t.model.parameters(), lr=1.0))

    def flat(m):
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    noisy, noisy_opt = trainer(sigma)
    clean, clean_opt = trainer(0.0)
    noises = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for epoch in range(2):
            noisy.start_epoch(noisy_opt, seed=3, epoch=epoch, device=torch.device("cpu"))
            for _ in range(2):
                clean.model.load_state_dict(noisy.model.state_dict())  # the same weights, so the same clipped sum
                before = flat(noisy.model)
                for t, opt in ((noisy, noisy_opt), (clean, clean_opt)):
                    opt.zero_grad(set_to_none=True)
                    loss_fn(t.module(x), y).backward()
                    opt.step()
                noises.append(flat(clean.model) - flat(noisy.model))  # (before - noisy) - (before - clean)
                assert not torch.equal(flat(noisy.model), before)
    scale = sigma * bound / expected_batch
    for noise in noises:
        assert abs(float(noise.std()) / scale - 1) < 0.05  # 0.7% is one standard error with 11,399 draws
        assert abs(float(noise.mean())) < 0.05 * scale
    corr = torch.corrcoef(torch.stack(noises))
    assert float((corr - torch.eye(len(noises))).abs().max()) < 0.05  # four independent draws: steps and epochs
