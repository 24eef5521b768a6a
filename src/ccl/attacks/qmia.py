"""Quantile-regression membership inference, QMIA (Bertran, Tang, Roth, Kearns, Morgenstern, Wu, NeurIPS 2023).

No reference models: one regression model learns, from public non-member data (the population: records no
model trained on), the `1 - alpha` quantile of the target's score on a non-member given the record. A record is
flagged when its score exceeds its own predicted quantile, so records that are easy for any model (high score
whether trained on or not) do not look like members; thresholding at 0 flags about a fraction `alpha` of
non-members (the quantile model's calibration, checked on held-out non-members in the tests).

- Score signal: the hinge (logit margin) `phi = z_y - max_{c != y} z_c` of the target's logits, as Bertran et al.,
  averaged over augmented queries (axis `A`). It is unchanged when a constant is added to every logit of a record,
  so log-probabilities give the same score as logits.
- Regressor input: the record's features (its flattened input, standardised with the population's mean and
  standard deviation) and the one-hot label (the score's distribution depends on the class).
- Regressor: a one-hidden-layer ReLU MLP, trained full-batch with Adam on the pinball loss at quantile
  `1 - alpha` on `(population features, target's phi on them)`, targets standardised; seeded and deterministic
  on the CPU.
- Conformal recalibration (`calibration_fraction`, default 0.2; Romano, Patterson and Candès, NeurIPS 2019): the
  regressor is fitted on the other records of the population and shifted by the `ceil((1 - alpha)(m + 1))`-th
  smallest residual `phi - q_hat` of the `m` held-back ones, so that a fresh non-member exceeds it with
  probability at most `alpha` (and at least `alpha - 1/(m + 1)`) even when the regressor overfits its
  training records, which it does in the tail (in-sample exceedance `alpha`, out-of-sample up to ~1.7 `alpha`
  without it on 2,000 records). `calibration_fraction=0` fits on the whole population, as Bertran et al.
- Attack score: `phi(x) - q_hat(x)`, higher meaning member; `> 0` flags at a false-positive rate about `alpha`.

Cost: `steps` full-batch passes over the population, `O(steps * Z * d * hidden)`: well under a second for
2,000 records of 64 features, seconds for thousands of flattened 32x32x3 images.
"""

from __future__ import annotations

import numpy as np
import torch

from .._checks import check_in_range, check_positive_int, expected
from ..errors import InvalidArgumentError
from .base import Attack
from .inputs import AttackInputs
from .label_only import check_seed

__all__ = ["QMIA", "conformal_shift", "fit_quantile_regressor", "hinge_score", "pinball_loss"]


def hinge_score(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`(..., N, A, C)` logits and `(N,)` labels to `(..., N)`: `z_y - max_{c != y} z_c`, averaged over `A`."""
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))[:, None, None].expand(*z.shape[:-1], 1)
    z_y = z.gather(-1, y).squeeze(-1)
    rest = z.scatter(-1, y, -torch.inf).amax(-1)
    return (z_y - rest).mean(-1).numpy()


def pinball_loss(pred: torch.Tensor, target: torch.Tensor, *, quantile: float) -> torch.Tensor:
    """The mean pinball (quantile) loss `max(tau (t - q), (tau - 1)(t - q))`, minimised by the `tau`-quantile."""
    diff = target - pred
    return torch.maximum(quantile * diff, (quantile - 1) * diff).mean()


def conformal_shift(residuals: np.ndarray, alpha: float) -> float:
    """The `ceil((1 - alpha)(m + 1))`-th smallest of `m` residuals (the largest when that exceeds `m`): the split
    conformal correction under which a fresh residual exceeds it with probability at most `alpha`."""
    r = np.sort(np.asarray(residuals, dtype=np.float64))
    k = min(int(np.ceil((1 - alpha) * (r.size + 1))), r.size)
    return float(r[k - 1])


def fit_quantile_regressor(
    x: np.ndarray,
    t: np.ndarray,
    *,
    quantile: float,
    hidden: int = 32,
    steps: int = 300,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    seed: int = 0,
):
    """Fits `q(x) ~ quantile of t | x` on `x (Z, d)` and `t (Z,)`; returns `predict: (M, d) -> (M,)` float64.

    Inputs and targets are standardised with their means and standard deviations over the `Z` rows (a constant
    column is left centred); the MLP is initialised from `seed` and trained full-batch with Adam (decoupled
    weight decay) for `steps` steps."""
    quantile = check_in_range("quantile", quantile, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    x = np.asarray(x, dtype=np.float64)
    t = np.asarray(t, dtype=np.float64)
    x_mean, x_std = x.mean(0), x.std(0)
    x_std = np.where(x_std > 1e-12, x_std, 1.0)
    t_mean, t_std = float(t.mean()), float(t.std())
    t_std = t_std if t_std > 1e-12 else 1.0

    def prepare(rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(((np.asarray(rows, dtype=np.float64) - x_mean) / x_std).astype(np.float32))

    gen = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    params = [
        (torch.randn(d, hidden, generator=gen) / d**0.5).requires_grad_(),
        torch.zeros(hidden, requires_grad=True),
        (torch.randn(hidden, 1, generator=gen) / hidden**0.5).requires_grad_(),
        torch.zeros(1, requires_grad=True),
    ]

    def forward(rows: torch.Tensor) -> torch.Tensor:
        return (torch.relu(rows @ params[0] + params[1]) @ params[2] + params[3]).squeeze(-1)

    xt = prepare(x)
    tt = torch.from_numpy(((t - t_mean) / t_std).astype(np.float32))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        pinball_loss(forward(xt), tt, quantile=quantile).backward()
        opt.step()

    @torch.no_grad()
    def predict(rows: np.ndarray) -> np.ndarray:
        return forward(prepare(rows)).double().numpy() * t_std + t_mean

    return predict


class QMIA(Attack):
    """QMIA at false-positive rate `alpha`; see the module docstring. Needs `features`, `population_features`
    and the target's logits on the population, no reference models."""

    name = "qmia"
    min_references = 0
    needs_population = True
    #: the optional `AttackInputs` fields that must be present (`ccl.attacks.runnable` reads it)
    needs_inputs = ("features", "population_features")

    def __init__(
        self,
        *,
        alpha: float = 0.1,
        hidden: int = 32,
        steps: int = 300,
        lr: float = 1e-2,
        weight_decay: float = 1e-4,
        calibration_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        self.alpha = check_in_range("alpha", alpha, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.hidden = check_positive_int("hidden", hidden)
        self.steps = check_positive_int("steps", steps)
        self.lr = check_in_range("lr", lr, low=0.0, low_inclusive=False)
        self.weight_decay = check_in_range("weight_decay", weight_decay, low=0.0)
        self.calibration_fraction = check_in_range("calibration_fraction", calibration_fraction, low=0.0, high=0.5)
        self.seed = check_seed(seed)

    @property
    def min_population(self) -> int:
        """The fewest population records that leave at least 2 to fit the regressor and, with a calibration
        fraction, at least 1 to calibrate it."""
        return next(z for z in range(2, 1_000) if self._splits(z))

    def _splits(self, z: int) -> bool:
        m = int(round(self.calibration_fraction * z))
        return z >= 2 and (self.calibration_fraction == 0 or (m >= 1 and z - m >= 2))

    def score(self, inputs: AttackInputs) -> np.ndarray:
        hint = (
            "pass the records' flattened inputs as `features` (N, d) and `population_features` (Z, d), with the "
            "target's logits on the population (`population_target_logits`, `population_labels`)."
        )
        inputs.require_inputs(self.name, ("population_target_logits", "features", "population_features"), hint)
        c = inputs.target_logits.shape[-1]
        if c < 2:
            raise InvalidArgumentError(expected("target_logits", "logits over at least 2 classes (a margin)", c))
        eye = np.eye(c)

        def design(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
            return np.concatenate([features, eye[labels]], axis=1)

        phi_z = hinge_score(inputs.population_target_logits, inputs.population_labels)
        design_z = design(inputs.population_features, inputs.population_labels)
        z = phi_z.size
        if z < 2:
            raise InvalidArgumentError(
                expected("population_target_logits", "outputs on at least 2 population records", f"{z} record(s)")
            )
        m = int(round(self.calibration_fraction * z))
        if not self._splits(z):
            raise InvalidArgumentError(
                expected(
                    "calibration_fraction",
                    f"0, or a fraction that leaves records both to fit and to calibrate ({z} population records)",
                    self.calibration_fraction,
                )
            )
        order = np.random.default_rng(self.seed).permutation(z)
        held, fit = order[:m], order[m:]
        predict = fit_quantile_regressor(
            design_z[fit],
            phi_z[fit],
            quantile=1.0 - self.alpha,
            hidden=self.hidden,
            steps=self.steps,
            lr=self.lr,
            weight_decay=self.weight_decay,
            seed=self.seed,
        )
        shift = conformal_shift(phi_z[held] - predict(design_z[held]), self.alpha) if m else 0.0
        phi_x = hinge_score(inputs.target_logits, inputs.labels)
        return phi_x - (predict(design(inputs.features, inputs.labels)) + shift)
