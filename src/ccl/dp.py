"""DP-SGD through Opacus: calibration, per-sample clipping and noise, Poisson sampling, accounting.

`ccl` uses three pieces of Opacus (an optional extra: `pip install 'ccl[dp]'`): `GradSampleModule` for the
per-sample gradients, `DPOptimizer` for clipping each to `max_grad_norm`, summing, adding Gaussian noise of
standard deviation `noise_multiplier * max_grad_norm` and averaging over the expected batch size, and the RDP
(or PRV) accountant. The batches are drawn here, with Poisson sampling (each record in each step independently
with probability q = batch_size / n, n / batch_size steps per epoch), from the epoch's seeded generator; the
noise comes from a generator seeded by (seed, epoch) too, so a resumed model is bit-identical to an
uninterrupted one and has spent the same epsilon (it depends only on the number of steps taken).
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import torch
from torch import Tensor, nn

from .errors import MissingDependencyError

__all__ = ["DPTrainer", "calibrate_noise", "epsilon_spent"]


def _opacus():
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "DP-SGD needs Opacus, which is not installed: pip install 'ccl[dp]' (Opacus needs torch >= 2.6)."
        ) from None
    import opacus

    return opacus


@functools.lru_cache(maxsize=64)
def calibrate_noise(epsilon: float, delta: float, *, sample_rate: float, steps: int, accountant: str = "rdp") -> float:
    """The noise multiplier with which `steps` Poisson-sampled steps at `sample_rate` spend at most
    (epsilon, delta), from Opacus' accountant (cached: every model of an audit shares it). It searches to within
    0.01 of epsilon from below; `epsilon_spent` reports what the steps actually spend."""
    _opacus()
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha": still an upper bound
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
            )
        )


@functools.lru_cache(maxsize=64)
def _rdp_of_one_step(noise_multiplier: float, sample_rate: float) -> tuple:
    from opacus.accountants.analysis import rdp
    from opacus.accountants.rdp import RDPAccountant

    orders = tuple(RDPAccountant.DEFAULT_ALPHAS)
    return orders, tuple(rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=orders))


def epsilon_spent(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str = "rdp"
) -> float:
    """The epsilon that `steps` DP-SGD steps spend at `delta`, by Opacus' accountant. For RDP the one-step
    curve is computed once and composed linearly (RDP adds up over steps), as the accountant itself does."""
    _opacus()
    if steps == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if accountant == "rdp":
            from opacus.accountants.analysis import rdp

            orders, one = _rdp_of_one_step(noise_multiplier, sample_rate)
            return float(rdp.get_privacy_spent(orders=list(orders), rdp=np.array(one) * steps, delta=delta)[0])
        from opacus.accountants import create_accountant

        acc = create_accountant(accountant)
        acc.history = [(noise_multiplier, sample_rate, steps)]
        return float(acc.get_epsilon(delta=delta))


class DPTrainer:
    """One model's DP-SGD state: its (Opacus-compatible) module, the sampling rate, the noise, the steps."""

    def __init__(self, model: nn.Module, dp, *, num_records: int, batch_size: int, epochs: int) -> None:
        _opacus()
        from opacus import GradSampleModule
        from opacus.validators import ModuleValidator

        if not ModuleValidator.is_valid(model):
            model = ModuleValidator.fix(model)  # BatchNorm -> GroupNorm: per-sample gradients need no batch stats
        self.model = model
        self.module = GradSampleModule(model, loss_reduction="mean")
        self.dp = dp
        self.num_records = num_records
        self.sample_rate = min(1.0, batch_size / num_records)
        self.steps_per_epoch = max(1, round(1 / self.sample_rate))
        # calibrated for exactly the steps taken: epochs x steps_per_epoch
        self.noise_multiplier = dp.resolve_noise(sample_rate=self.sample_rate, steps=epochs * self.steps_per_epoch)

    def optimizer(self, base: torch.optim.Optimizer) -> torch.optim.Optimizer:
        from opacus.optimizers import DPOptimizer

        return DPOptimizer(
            base,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.dp.max_grad_norm,
            expected_batch_size=max(1, round(self.sample_rate * self.num_records)),
            loss_reduction="mean",
        )

    def start_epoch(self, optimizer: torch.optim.Optimizer, seed: int, epoch: int, device: torch.device) -> None:
        """Seeds the epoch's noise: resuming at an epoch gives the same noise as running through it."""
        g = torch.Generator(device=device)
        g.manual_seed(int(np.random.SeedSequence([seed, epoch, 0xD9]).generate_state(1)[0]))
        optimizer.generator = g

    def batches(self, generator: torch.Generator, device: torch.device) -> list[Tensor]:
        """The epoch's Poisson batches: `(1, b)` positions of the members, each in with probability q."""
        out = []
        for _ in range(self.steps_per_epoch):
            keep = torch.rand(self.num_records, generator=generator, device=device) < self.sample_rate
            idx = keep.nonzero().flatten()
            out.append(idx[None])
        return out

    def epsilon(self, epochs_done: int) -> float:
        return epsilon_spent(
            self.noise_multiplier,
            self.sample_rate,
            epochs_done * self.steps_per_epoch,
            self.dp.delta,
            self.dp.accountant,
        )
