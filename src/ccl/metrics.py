"""Privacy metrics of a membership-inference attack: pure functions of `scores` and `is_member`.

`scores` are real numbers, higher meaning "more likely a member"; `is_member` is the ground truth. Every
metric reads the ROC curve, computed once by sorting, and matches `sklearn.metrics` (tested). Degenerate input
(a single class, or too few non-members to resolve the asked false-positive rate) warns and returns NaN rather
than a misleading 0.

Example:
    >>> scores, is_member = [0.9, 0.8, 0.3, 0.1], [True, False, True, False]
    >>> round(roc_auc(scores, is_member), 3)
    0.75
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ._checks import check_in_range, check_positive_int, expected
from ._scores import DegenerateMetricWarning, Interval, sorted_thresholds
from ._scores import validate_scores as _validate
from .bounds import clopper_pearson, epsilon_lower_bound, one_run_epsilon_lower_bound
from .errors import InvalidArgumentError, InvalidArgumentTypeError

__all__ = [
    "DEFAULT_FPRS",
    "clopper_pearson",
    "epsilon_lower_bound",
    "one_run_epsilon_lower_bound",
    "metric_names",
    "roc_metrics",
    "tpr_key",
    "DegenerateMetricWarning",
    "AttackMetrics",
    "Interval",
    "RocCurve",
    "balanced_accuracy",
    "bootstrap_ci",
    "evaluate",
    "membership_advantage",
    "roc_auc",
    "roc_curve",
    "tpr_at_fpr",
]

DEFAULT_FPRS = (1e-3, 1e-2)


class RocCurve(NamedTuple):
    """Points of the ROC curve at every distinct threshold, from (0, 0) to (1, 1), as `sklearn.metrics.roc_curve`
    with `drop_intermediate=False`: `thresholds[0]` is `inf`, and a sample is called a member when
    `score >= threshold`."""

    fpr: np.ndarray
    tpr: np.ndarray
    thresholds: np.ndarray


def _warn_nan(msg: str) -> float:
    warnings.warn(msg + " Returning NaN.", DegenerateMetricWarning, stacklevel=3)
    return math.nan


def _both_classes(m: np.ndarray, metric: str) -> bool:
    if m.all() or not m.any():
        _warn_nan(
            f"{metric} needs both members and non-members, but got only {'members' if m.all() else 'non-members'}."
        )
        return False
    return True


def _roc(s: np.ndarray, m: np.ndarray) -> RocCurve:
    order, last = sorted_thresholds(s)
    s_sorted, m_sorted = s[order], m[order]
    tps = np.cumsum(m_sorted)[last]
    fps = (last + 1) - tps
    tps, fps = np.r_[0, tps], np.r_[0, fps]
    thresholds = np.r_[np.inf, s_sorted[last]]
    n_pos, n_neg = m.sum(), m.size - m.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        return RocCurve(fps / n_neg, tps / n_pos, thresholds)


def roc_curve(scores: ArrayLike, is_member: ArrayLike) -> RocCurve:
    """The ROC curve. Warns and returns NaN rates when one class is missing."""
    s, m = _validate(scores, is_member)
    _both_classes(m, "roc_curve")
    return _roc(s, m)


def roc_auc(scores: ArrayLike, is_member: ArrayLike) -> float:
    """Area under the ROC curve (ties count one half), as `sklearn.metrics.roc_auc_score`."""
    s, m = _validate(scores, is_member)
    if not _both_classes(m, "roc_auc"):
        return math.nan
    fpr, tpr, _ = _roc(s, m)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)  # trapezoids between ROC points


def membership_advantage(scores: ArrayLike, is_member: ArrayLike) -> float:
    """`max over thresholds of TPR - FPR` (Yeom et al., 2018), the paper's Adv; 0 when no threshold helps."""
    s, m = _validate(scores, is_member)
    if not _both_classes(m, "membership_advantage"):
        return math.nan
    fpr, tpr, _ = _roc(s, m)
    return float(np.max(tpr - fpr))


def tpr_at_fpr(scores: ArrayLike, is_member: ArrayLike, *, fpr: float = 1e-3) -> float:
    """The largest TPR among thresholds whose FPR does not exceed `fpr`.

    Warns and returns NaN when fewer than `1 / fpr` non-members are given: such an FPR cannot be resolved.
    """
    fpr = check_in_range("fpr", fpr, low=0.0, high=1.0, low_inclusive=False)
    s, m = _validate(scores, is_member)
    if not _both_classes(m, "tpr_at_fpr"):
        return math.nan
    n_neg = int((~m).sum())
    if n_neg * fpr < 1 - 1e-9:
        return _warn_nan(
            f"tpr_at_fpr(fpr={fpr:g}) needs at least {math.ceil(1 / fpr - 1e-9)} non-members, but got {n_neg}."
        )
    curve = _roc(s, m)
    return float(curve.tpr[curve.fpr <= fpr + 1e-12].max())


def balanced_accuracy(scores: ArrayLike, is_member: ArrayLike, *, threshold: float) -> float:
    """`(TPR + TNR) / 2` of the decision "member when `score >= threshold`"."""
    s, m = _validate(scores, is_member)
    if not _both_classes(m, "balanced_accuracy"):
        return math.nan
    predicted = s >= threshold
    return float(0.5 * (predicted[m].mean() + (~predicted[~m]).mean()))


def bootstrap_ci(
    metric: Callable[[np.ndarray, np.ndarray], float],
    scores: ArrayLike,
    is_member: ArrayLike,
    *,
    n_resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of `metric(scores, is_member)`.

    Members and non-members are resampled separately (with replacement), keeping both counts fixed.
    """
    n_resamples = check_positive_int("n_resamples", n_resamples, minimum=2)
    confidence = check_in_range("confidence", confidence, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    s, m = _validate(scores, is_member)
    if m.all() or not m.any():
        _warn_nan("bootstrap_ci needs both members and non-members.")
        return Interval(math.nan, math.nan)
    rng = np.random.default_rng(seed)
    pos, neg = np.nonzero(m)[0], np.nonzero(~m)[0]
    values = np.empty(n_resamples)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateMetricWarning)
        for b in range(n_resamples):
            idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
            values[b] = metric(s[idx], m[idx])
    if np.isnan(values).all():
        return Interval(math.nan, math.nan)
    tail = 50 * (1 - confidence)
    low, high = np.nanpercentile(values, [tail, 100 - tail])
    return Interval(float(low), float(high))


def tpr_key(fpr: float) -> str:
    """The one spelling of the TPR-at-FPR metric's key, e.g. `tpr_key(0.01) == "tpr@0.01"`."""
    return f"tpr@{float(fpr):g}"


def metric_names(fprs: Sequence[float] = DEFAULT_FPRS) -> tuple[str, ...]:
    """The keys of `AttackMetrics.as_dict()` that hold a metric (each also has a `KEY_ci` interval)."""
    return ("auc", "advantage", *(tpr_key(f) for f in fprs))


@dataclass(frozen=True)
class AttackMetrics:
    """The headline metrics of one attack, each with a bootstrap confidence interval (or NaN bounds)."""

    auc: float
    advantage: float
    tpr_at_fpr: dict[float, float]
    auc_ci: Interval
    advantage_ci: Interval
    tpr_at_fpr_ci: dict[float, Interval]
    n_members: int
    n_nonmembers: int

    def as_dict(self) -> dict:
        out = {
            "auc": self.auc,
            "auc_ci": list(self.auc_ci),
            "advantage": self.advantage,
            "advantage_ci": list(self.advantage_ci),
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
        }
        for f, v in self.tpr_at_fpr.items():
            out[tpr_key(f)] = v
            out[tpr_key(f) + "_ci"] = list(self.tpr_at_fpr_ci[f])
        return out


def evaluate(
    scores: ArrayLike,
    is_member: ArrayLike,
    *,
    fprs: Sequence[float] = DEFAULT_FPRS,
    n_resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> AttackMetrics:
    """AUC, advantage and TPR at each FPR in `fprs`, with bootstrap intervals (`n_resamples=0` skips them)."""
    if isinstance(fprs, (str, bytes)) or not isinstance(fprs, Sequence):
        raise InvalidArgumentTypeError(expected("fprs", "a list of false-positive rates in (0, 1]", fprs))
    for f in fprs:
        check_in_range("fprs", f, low=0.0, high=1.0, low_inclusive=False)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)):
        raise InvalidArgumentTypeError(expected("n_resamples", "0 (no intervals) or an integer >= 2", n_resamples))
    if n_resamples != 0 and n_resamples < 2:
        raise InvalidArgumentError(expected("n_resamples", "0 (no intervals) or an integer >= 2", n_resamples))
    s, m = _validate(scores, is_member)
    nan = Interval(math.nan, math.nan)
    fprs = [float(f) for f in fprs]
    point = roc_metrics(s, m, fprs)  # warns (as each metric would) when one class is missing
    cis = [nan] * len(point)
    if n_resamples and m.any() and not m.all():
        # One ROC per resample gives every metric: the resamples are those `bootstrap_ci` draws with the same
        # seed, so each interval equals `bootstrap_ci(metric, ...)` (tested), at a quarter of the cost.
        confidence = check_in_range(
            "confidence", confidence, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False
        )
        rng = np.random.default_rng(seed)
        pos, neg = np.nonzero(m)[0], np.nonzero(~m)[0]
        counts = (  # the draws of `bootstrap_ci`, in its order, kept as counts (idx[integers] is what
            # `rng.choice(idx, idx.size)` draws, without its argument checks: half of the bootstrap's time)
            np.bincount(
                np.concatenate([pos[rng.integers(0, pos.size, pos.size)], neg[rng.integers(0, neg.size, neg.size)]]),
                minlength=s.size,
            )
            for _ in range(n_resamples)
        )
        values = roc_metrics_weighted(s, m, counts, fprs)
        tail = 50 * (1 - confidence)
        for k in range(len(point)):
            if not (math.isnan(point[k]) or np.isnan(values[:, k]).all()):
                low, high = np.nanpercentile(values[:, k], [tail, 100 - tail])
                cis[k] = Interval(float(low), float(high))
    return AttackMetrics(
        auc=float(point[0]),
        advantage=float(point[1]),
        tpr_at_fpr={f: float(point[2 + i]) for i, f in enumerate(fprs)},
        auc_ci=cis[0],
        advantage_ci=cis[1],
        tpr_at_fpr_ci={f: cis[2 + i] for i, f in enumerate(fprs)},
        n_members=int(m.sum()),
        n_nonmembers=int((~m).sum()),
    )


def _roc_metrics(s: np.ndarray, m: np.ndarray, fprs: Sequence[float]) -> np.ndarray:
    """[AUC, advantage, TPR at each FPR] from one ROC; NaN where undefined (one class, too few non-members)."""
    n_pos = int(m.sum())
    n_neg = m.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.full(2 + len(fprs), np.nan)
    fpr, tpr, _ = _roc(s, m)
    out = [float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2), float(np.max(tpr - fpr))]
    for f in fprs:
        out.append(math.nan if n_neg * f < 1 - 1e-9 else float(tpr[fpr <= f + 1e-12].max()))
    return np.array(out)


#: Elements (resamples x records) of one batch of a bootstrap's counts: bounds its memory to tens of MB.
BOOTSTRAP_BATCH_ELEMENTS = 1 << 21


def roc_metrics_weighted(
    s: np.ndarray, m: np.ndarray, weights: Iterable[np.ndarray], fprs: Sequence[float]
) -> np.ndarray:
    """`_roc_metrics` of each bootstrap resample given by its counts: each row of `weights` (a `(B, n)` array, or
    rows drawn lazily by a generator) says how many times each record of `s`, `m` `(n,)` is drawn. A resample is a
    multiset of the same records, so its ROC is a weighted cumulative sum over the one sorted order: one sort in
    all instead of one per resample, and rows taken `BOOTSTRAP_BATCH_ELEMENTS` at a time (bounded memory). Equal
    to `_roc_metrics(s[idx], m[idx])` of the drawn indices up to float rounding (tested). `(B, 2 + len(fprs))`."""
    s, m = np.asarray(s, dtype=np.float64), np.asarray(m, dtype=bool)
    order, last = sorted_thresholds(s)
    m_sorted = m[order]
    rows, out = iter(weights), []
    while batch := list(itertools.islice(rows, max(1, BOOTSTRAP_BATCH_ELEMENTS // max(1, s.size)))):
        w = np.stack(batch)
        w = w.astype(np.float64 if w.dtype.kind == "f" else np.int64, copy=False)  # signed: TP n_neg - FP n_pos
        out.append(_weighted_batch(np.take(w, order, axis=1), m_sorted, last, fprs))
    return np.concatenate(out) if out else np.empty((0, 2 + len(fprs)))


def _weighted_batch(w: np.ndarray, m_sorted: np.ndarray, last: np.ndarray, fprs: Sequence[float]) -> np.ndarray:
    """`_roc_metrics` of each row of counts `w (B, n)` (in sorted order). The true and false positives at each
    threshold are integers, so the AUC (trapezoids: sum of dFP * (TP + TP_prev) / 2) and the advantage
    (max TP * n_neg - FP * n_pos) are summed exactly and divided once; the TPR at an FPR is read at the end of
    the prefix of thresholds whose FPR does not exceed it (FP does not decrease along the order)."""
    b = w.shape[0]
    tp = np.cumsum(w * m_sorted, axis=1)[:, last]
    fp = np.cumsum(w, axis=1)[:, last]
    fp -= tp
    n_pos, n_neg = tp[:, -1], fp[:, -1]
    auc2 = fp[:, 0] * tp[:, 0] + np.einsum("ij,ij->i", np.diff(fp, axis=1), tp[:, 1:] + tp[:, :-1])
    adv = np.maximum((tp * n_neg[:, None] - fp * n_pos[:, None]).max(axis=1), 0)  # the (0, 0) point: 0
    pairs = (n_pos * n_neg).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample of one class: NaN below
        cols = [auc2 / (2 * pairs), adv / pairs]
        for f in fprs:
            within = np.count_nonzero(fp <= ((f + 1e-12) * n_neg)[:, None], axis=1)  # thresholds in the prefix
            at = np.where(within > 0, tp[np.arange(b), np.maximum(within - 1, 0)], 0) / n_pos
            cols.append(np.where(n_neg * f < 1 - 1e-9, np.nan, at))
    values = np.stack(cols, axis=1)
    values[(n_pos == 0) | (n_neg == 0)] = np.nan
    return values


def roc_metrics(scores: ArrayLike, is_member: ArrayLike, fprs: Sequence[float] = DEFAULT_FPRS) -> np.ndarray:
    """`[roc_auc, membership_advantage, tpr_at_fpr(f) for f in fprs]` from one sort of the scores, equal to the
    separate functions (tested); warns like them on degenerate input."""
    s, m = _validate(scores, is_member)
    if not _both_classes(m, "roc_metrics"):
        return np.full(2 + len(fprs), np.nan)
    n_neg = int((~m).sum())
    for f in fprs:
        if n_neg * f < 1 - 1e-9:
            _warn_nan(f"tpr_at_fpr(fpr={f:g}) needs at least {math.ceil(1 / f - 1e-9)} non-members, but got {n_neg}.")
    return _roc_metrics(s, m, fprs)
