"""Threshold attacks on one signal: loss (Yeom et al., 2018), confidence, entropy and modified entropy
(Song & Mittal, USENIX Security 2021).

The score of a record is its signal, oriented so that higher means "member" (e.g. minus the loss). When
reference models are given, a threshold is fitted on their outputs (pooled over models, each record labelled
by the reference model's membership mask) to maximise balanced accuracy, globally or per class, and the score
becomes `signal - threshold[label]`: positive means "member" under the fitted decision rule. The ranking, and so
AUC and TPR at low FPR, only changes with per-class thresholds.
"""

from __future__ import annotations

import numpy as np

from .. import signals
from .._checks import check_choice
from ..metrics import _roc
from .base import Attack
from .inputs import AttackInputs

__all__ = ["SIGNAL_ORIENTATION", "ThresholdAttack", "best_threshold", "fit_thresholds", "oriented_signal"]

#: +1 where a larger signal means "member", -1 where a smaller one does
SIGNAL_ORIENTATION = {"loss": -1.0, "confidence": 1.0, "entropy": -1.0, "modified_entropy": -1.0}


def oriented_signal(signal: str, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`(..., N, A, C)` logits and `(N,)` labels to `(..., N)` member-oriented scores, averaged over `A`."""
    values = signals.SIGNALS[signal](logits, labels[:, None])  # (..., N, A)
    return SIGNAL_ORIENTATION[signal] * values.mean(-1)


def best_threshold(scores: np.ndarray, is_member: np.ndarray) -> float:
    """The threshold `t` ("member when score >= t") with the largest TPR - FPR (= balanced accuracy - 1/2)."""
    fpr, tpr, thresholds = _roc(scores, is_member)
    gap = (tpr - fpr)[1:]  # skip the +inf threshold: flag at least one record
    best = 1 + int(np.argmax(gap >= gap.max() - 1e-12))  # ties (up to rounding) go to the larger threshold
    return float(thresholds[best])


def fit_thresholds(
    scores: np.ndarray, is_member: np.ndarray, labels: np.ndarray, *, num_classes: int, per_class: bool
) -> np.ndarray:
    """Thresholds `(num_classes,)` fitted on shadow data. A class without both members and non-members among
    the shadow records falls back to the global threshold."""
    global_t = best_threshold(scores, is_member)
    thresholds = np.full(num_classes, global_t)
    if per_class:
        for c in range(num_classes):
            sel = labels == c
            if is_member[sel].any() and not is_member[sel].all():
                thresholds[c] = best_threshold(scores[sel], is_member[sel])
    return thresholds


class ThresholdAttack(Attack):
    """Threshold attack on `signal` in {"loss", "confidence", "entropy", "modified_entropy"}."""

    def __init__(self, *, signal: str = "loss", per_class: bool = False) -> None:
        self.signal = check_choice("signal", signal, tuple(SIGNAL_ORIENTATION))
        self.per_class = bool(per_class)
        self.name = signal

    def score(self, inputs: AttackInputs) -> np.ndarray:
        target = oriented_signal(self.signal, inputs.target_logits, inputs.labels)  # (N,)
        if inputs.num_references == 0:
            return target
        ref = oriented_signal(self.signal, inputs.reference_logits, inputs.labels)  # (K, N)
        labels = np.broadcast_to(inputs.labels, ref.shape)
        thresholds = fit_thresholds(
            ref.ravel(),
            inputs.reference_in.ravel(),
            labels.ravel(),
            num_classes=inputs.target_logits.shape[-1],
            per_class=self.per_class,
        )
        return target - thresholds[inputs.labels]
