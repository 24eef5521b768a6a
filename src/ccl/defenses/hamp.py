"""The `hamp` defense (Chen and Pattabiraman, NDSS 2024): high-entropy soft labels in training, and the released
model's outputs modified at query time.

Training: `HAMPLoss`, cross-entropy against a soft label whose entropy is `gamma * log C`, with an entropy
regulariser (`alpha`). Release (`HAMP.query_transform`, applied by the audit to every model's outputs): each
query's scores are those of a random input (uniform over each feature's range in the data), rearranged to the
query's own rank order (`hamp_modify`), so the predicted label stays. Every attack sees the released outputs and
accuracy is measured on them; label-only attacks are unaffected by the modification, by design.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .._checks import check_choice, check_in_range, check_logits_targets
from .._hooks import Procedure, legacy_identity
from .base import Defense

__all__ = ["HAMP", "HAMPLoss", "create", "hamp_modify", "hamp_soft_label_confidence"]

NAME = "hamp"
DOC = "HAMP: high-entropy soft labels, entropy regulariser, modified outputs at query time"


def hamp_soft_label_confidence(num_classes: int, gamma: float) -> float:
    """The true class's probability p of HAMP's soft label `[p, (1-p)/(C-1), ...]` whose entropy is `gamma`
    times the largest possible, log C (bisection: the entropy falls as p rises from 1/C to 1)."""
    c = num_classes
    target = gamma * math.log(c)

    def entropy(p: float) -> float:
        q = (1 - p) / (c - 1)
        return -(p * math.log(p) if p > 0 else 0.0) - ((c - 1) * q * math.log(q) if q > 0 else 0.0)

    lo, hi = 1.0 / c, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if entropy(mid) > target else (lo, mid)
    return (lo + hi) / 2


class HAMPLoss(nn.Module):
    """HAMP's training loss (Chen and Pattabiraman, NDSS 2024): cross-entropy against a high-entropy soft label
    (the true class gets the probability whose label entropy is `gamma * log C`, the others share the rest)
    minus `alpha` times the entropy of the prediction: `-sum_c s_c log p_c - alpha * H(p)`."""

    def __init__(self, *, gamma: float = 0.95, alpha: float = 0.001, reduction: str = "mean") -> None:
        super().__init__()
        self.gamma = check_in_range("gamma", gamma, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
        self.alpha = check_in_range("alpha", alpha, low=0.0)
        self.reduction = check_choice("reduction", reduction, ("none", "mean", "sum"))

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        c = logits.shape[-1]
        p = hamp_soft_label_confidence(c, self.gamma)
        log_p = torch.log_softmax(logits.float(), -1)
        soft = torch.full_like(log_p, (1 - p) / (c - 1)).scatter_(-1, target[:, None], p)
        entropy = -(log_p.exp() * log_p).sum(-1)
        return -(soft * log_p).sum(-1) - self.alpha * entropy

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        check_logits_targets(logits, target)
        loss = self.per_sample(logits, target)
        return loss.mean() if self.reduction == "mean" else loss.sum() if self.reduction == "sum" else loss


def hamp_modify(logits: np.ndarray, random_logits: np.ndarray) -> np.ndarray:
    """HAMP's output modification: each query's released scores are those of a random input, rearranged to the
    rank order of the query's own scores (so the predicted label stays); returned as log-probabilities.
    `logits (..., C)` and `random_logits (..., C)` of the same shape."""
    real = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    rand = torch.softmax(torch.from_numpy(np.asarray(random_logits, dtype=np.float32)), -1)
    ranks = real.argsort(-1).argsort(-1)  # the rank of each class in the query's own scores
    released = rand.sort(-1).values.gather(-1, ranks)  # the random scores, in that order
    return torch.log(released.clamp_min(1e-30)).numpy()


@dataclass(frozen=True)
class HAMP(Procedure):
    """HAMP beyond its loss: the released outputs are modified at query time."""

    @property
    def identity(self) -> str:
        return legacy_identity(modify_outputs="hamp")

    @torch.no_grad()
    def query_transform(
        self, forward_all: Callable[[Tensor], Tensor], logits: list[np.ndarray], x_all: Tensor, *, seed: int
    ) -> list[np.ndarray]:
        """For each query, the scores of its own random input (uniform over each feature's range in `x_all`),
        rearranged to the query's rank order (`hamp_modify`); the same random inputs for every model."""
        n = logits[0].shape[0]
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 0x4A]).generate_state(1)[0]))
        low, high = x_all.min(0).values, x_all.max(0).values
        noise = low + (high - low) * torch.rand((n, *x_all.shape[1:]), generator=g)
        random_logits = torch.cat([forward_all(noise[i : i + 1024]).float().cpu() for i in range(0, n, 1024)], 1)
        random_logits = random_logits.numpy()
        out = []
        for k, lg in enumerate(logits):
            rl = random_logits[k] if lg.ndim == 2 else np.broadcast_to(random_logits[k][:, None, :], lg.shape)
            out.append(hamp_modify(lg, rl))
        return out


def create(*, gamma: float = 0.95, alpha: float = 0.001) -> Defense:
    """`hamp`: the soft labels' entropy `gamma * log C` and the entropy regulariser's weight `alpha`."""
    return Defense(HAMPLoss(gamma=gamma, alpha=alpha), HAMP())
