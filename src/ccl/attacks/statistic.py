"""Attacks on one number per (model, record) that only the auditor's access can measure, calibrated per record.

Two statistics are measured where each model's weights exist (`ccl.audit.statistics`, at training time) and stored
with its outputs:

- `boundary_distance` (`ccl.attacks.boundary`): the distance to the decision boundary, from predicted labels
  only (access: labels). Members lie farther from the boundary: higher is more likely a member.
- `gradient_norm` (`ccl.attacks.gradient`): the norm of the gradient of the record's loss with respect to the
  weights (access: the weights). Members' gradients are smaller.

Score. Each statistic is scaled by its logarithm (`log(distance + floor)`, `log(norm)`: both are positive and
skewed, their logarithms closer to Gaussian, as LiRA's logit scaling does for confidences). With reference models
(`calibrated`, by default when `K >= 4`), the score is LiRA's online likelihood ratio on the scaled statistic:
`log N(s; mu_in, sigma_in) - log N(s; mu_out, sigma_out)`, the means per record over the reference models that
trained on it (IN) and those that did not (OUT), the spread per record or pooled over the records
(`variance`, "auto": pooled below 64 reference models, as `ccl.attacks.lira`). Without them, the oriented
statistic itself (the distance; minus the gradient norm), the attacks of Choquette-Choo et al. and Nasr et al.

The leave-one-out evaluation has no fast path for these attacks: it scores each model as the target with
`leave_one_out_scores_slow` (M calls on `(K, P)` numbers, cheap next to measuring them).
"""

from __future__ import annotations

import numpy as np

from .._checks import check_choice, check_positive_int, expected
from ..errors import InvalidArgumentTypeError
from .base import Attack
from .boundary import MAX_DISTANCE, QUERIES, RANGE_BITS
from .inputs import AttackInputs, NotEnoughReferencesError
from .lira import _log_normal_pdf, gaussian_fit

__all__ = [
    "STATISTICS",
    "BoundaryDistanceAttack",
    "GradientNormAttack",
    "StatisticAttack",
    "gaussian_likelihood_ratio",
    "oriented_statistic",
    "scaled_statistic",
]

#: statistic -> (orientation: +1 when members are higher, the floor added before the logarithm)
STATISTICS = {
    "boundary_distance": (1.0, MAX_DISTANCE / 2**RANGE_BITS),  # the bisection's resolution: misclassified -> floor
    "gradient_norm": (-1.0, 1e-30),
}
#: the fewest reference models the calibrated attacks use (two IN and two OUT observations per record, as LiRA)
MIN_REFERENCES = 4


def scaled_statistic(statistic: str, values: np.ndarray) -> np.ndarray:
    """`log(values + floor)` of a statistic (see the module docstring), float64."""
    _, floor = STATISTICS[check_choice("statistic", statistic, STATISTICS)]
    return np.log(np.asarray(values, dtype=np.float64) + floor)


def oriented_statistic(statistic: str, values: np.ndarray) -> np.ndarray:
    """The uncalibrated score: the statistic, negated when members are lower."""
    sign, _ = STATISTICS[check_choice("statistic", statistic, STATISTICS)]
    return sign * np.asarray(values, dtype=np.float64)


def gaussian_likelihood_ratio(
    target: np.ndarray, reference: np.ndarray, reference_in: np.ndarray, *, variance: str
) -> np.ndarray:
    """`(N,)` LiRA's online score of `target (N,)` against Gaussians fitted per record to `reference (K, N)`
    where `reference_in (K, N)` (IN) and where not (OUT); `variance` "per_example" or "global"."""
    need = 2 if variance == "per_example" else 1
    fits = {}
    for side, mask in {"IN": reference_in, "OUT": ~reference_in}.items():
        fewest = int(mask.sum(0).min()) if mask.size else 0
        if fewest < need or (variance == "global" and int(mask.sum()) <= mask.shape[1]):
            raise NotEnoughReferencesError(
                f"A calibrated statistic attack with variance={variance!r} needs at least {need} {side} reference "
                f"model(s) per record (and some record with 2), but a record has {fewest}: train more reference models."
            )
        mean, std = gaussian_fit(reference[:, :, None], mask, variance=variance)
        fits[side] = (mean[:, 0], std[:, 0])
    (mu_in, s_in), (mu_out, s_out) = fits["IN"], fits["OUT"]
    return _log_normal_pdf(target, mu_in, s_in) - _log_normal_pdf(target, mu_out, s_out)


class StatisticAttack(Attack):
    """The attack on a stored per-model `statistic` ("boundary_distance" or "gradient_norm"); see the module
    docstring. `calibrated`: None (default) calibrates when reference models' statistics are given for
    `K >= 4` models, True requires them, False scores the target's statistic alone."""

    #: what the auditor must be able to do with the target: "scores", "labels" or "weights"
    access = "scores"

    def __init__(self, *, statistic: str, calibrated: bool | None = None, variance: str = "auto") -> None:
        self.statistic = check_choice("statistic", statistic, STATISTICS)
        if calibrated is not None and not isinstance(calibrated, bool):
            raise InvalidArgumentTypeError(
                expected("calibrated", "True, False or None (calibrate when reference models are given)", calibrated)
            )
        self.calibrated = calibrated
        self.variance = check_choice("variance", variance, ("auto", "per_example", "global"))

    @property
    def fields(self) -> tuple[str, str]:
        """The `AttackInputs` fields of the target's and the reference models' statistic."""
        return f"target_{self.statistic}", f"reference_{self.statistic}"

    @property
    def min_references(self) -> int:  # type: ignore[override]
        return MIN_REFERENCES if self.calibrated else 0

    @property
    def needs_inputs(self) -> tuple[str, ...]:
        """The optional `AttackInputs` fields that must be present (`ccl.attacks.runnable` reads it)."""
        return self.fields if self.calibrated else self.fields[:1]

    def score(self, inputs: AttackInputs) -> np.ndarray:
        target_field, reference_field = self.fields
        hint = (
            f"pass each model's {self.statistic.replace('_', ' ')} of every record (`{target_field}` (N,) for the "
            f"target, `{reference_field}` (K, N) for the reference models); an audit measures it when the attack "
            "is named in --attacks."
        )
        inputs.require_inputs(self.name, (target_field,), hint)
        target, reference = getattr(inputs, target_field), getattr(inputs, reference_field)
        calibrate = self.calibrated
        if calibrate is None:
            calibrate = reference is not None and inputs.num_references >= MIN_REFERENCES
        if not calibrate:
            return oriented_statistic(self.statistic, target)
        inputs.require_references(self.name, MIN_REFERENCES)
        inputs.require_inputs(self.name, (reference_field,), hint)
        variance = self.variance
        if variance == "auto":
            variance = "global" if inputs.num_references < 64 else "per_example"
        return gaussian_likelihood_ratio(
            scaled_statistic(self.statistic, target),
            scaled_statistic(self.statistic, reference),
            inputs.reference_in,
            variance=variance,
        )


class BoundaryDistanceAttack(StatisticAttack):
    """The label-only boundary-distance attack. `queries`: the label queries per record and model that measure
    the distance (`ccl.attacks.boundary.boundary_distances`; an audit asks every model with this budget)."""

    name = "label_only_boundary"
    access = "labels"

    def __init__(self, *, queries: int = QUERIES, calibrated: bool | None = None, variance: str = "auto") -> None:
        super().__init__(statistic="boundary_distance", calibrated=calibrated, variance=variance)
        self.queries = check_positive_int("queries", queries, minimum=2)


class GradientNormAttack(StatisticAttack):
    """The white-box attack on the norm of each record's loss gradient with respect to the weights."""

    name = "gradient"
    access = "weights"

    def __init__(self, *, calibrated: bool | None = None, variance: str = "auto") -> None:
        super().__init__(statistic="gradient_norm", calibrated=calibrated, variance=variance)
