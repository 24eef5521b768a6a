"""What the metrics and the privacy bounds share: the validation of (scores, membership), the thresholds of a
sorted score order, and two small types."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ._checks import expected
from .errors import InvalidArgumentError, InvalidArgumentTypeError

__all__ = ["DegenerateMetricWarning", "Interval", "sorted_thresholds", "validate_scores"]


class DegenerateMetricWarning(UserWarning):
    """A metric was asked of input that cannot support it; the metric is NaN."""


class Interval(NamedTuple):
    low: float
    high: float


def validate_scores(scores: ArrayLike, is_member: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores)
    m = np.asarray(is_member)
    if s.ndim != 1:
        raise InvalidArgumentError(expected("scores", "a 1-D array", f"shape {s.shape}"))
    if not (np.issubdtype(s.dtype, np.floating) or np.issubdtype(s.dtype, np.integer)):
        raise InvalidArgumentTypeError(expected("scores", "real numbers", s.dtype))
    s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise InvalidArgumentError(
            expected("scores", "finite numbers", f"{int(np.sum(~np.isfinite(s)))} NaN or inf values")
        )
    if m.shape != s.shape:
        raise InvalidArgumentError(
            expected("is_member", f"an array of shape {s.shape} like `scores`", f"shape {m.shape}")
        )
    if m.dtype != bool:
        if not (np.issubdtype(m.dtype, np.number) and np.isin(m, (0, 1)).all()):
            raise InvalidArgumentError(expected("is_member", "booleans (or 0/1)", f"values {np.unique(m)[:5]}"))
        m = m.astype(bool)
    return s, m


def sorted_thresholds(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(order, last)`: the scores' order from highest to lowest (stable), and in that order the last index of
    each run of tied scores. "Member when `score >= t`" at each distinct score t takes a tie whole, so the true
    positives at the thresholds are `cumsum(m[order])[last]`."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    return order, np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
