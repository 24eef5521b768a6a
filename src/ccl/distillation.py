"""Distillation for membership privacy (DMP; Shejwalkar and Houmansadr, AAAI 2021).

A teacher trained on the private members labels a reference set that no audited model trains on (the
defender's reserve); the released student learns only those soft labels. `soft_labels` gives the teacher's
softened outputs `softmax(t / T)`; `DistillationLoss` is `T^2 * KL(softmax(t / T) || softmax(s / T))`, the
T^2 keeping the gradient's scale independent of T (Hinton, Vinyals and Dean, 2015). `ccl.training.fit` runs
both stages when a defense's procedure has `distill` set.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._checks import check_in_range, expected
from .errors import InvalidArgumentError

__all__ = ["DistillationLoss", "soft_labels"]


@torch.no_grad()
def soft_labels(teacher_logits: Tensor, temperature: float) -> Tensor:
    """The teacher's soft labels `softmax(logits / T)`, float32 `(N, C)`."""
    return torch.softmax(teacher_logits.float() / temperature, -1)


class DistillationLoss(nn.Module):
    """`T^2 * KL(q || softmax(s / T))` between soft labels `q (N, C)` and the student's logits `s (N, C)`, per
    sample (`per_sample`) or averaged over the batch (`forward`)."""

    def __init__(self, *, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = check_in_range("temperature", temperature, low=0.0, low_inclusive=False)

    def per_sample(self, logits: Tensor, soft: Tensor) -> Tensor:
        if soft.shape != logits.shape or not soft.is_floating_point():
            raise InvalidArgumentError(
                expected("soft labels", f"a float tensor of the logits' shape {tuple(logits.shape)}", tuple(soft.shape))
            )
        t = self.temperature
        log_q = torch.log(soft.float().clamp_min(1e-30))
        log_s = torch.log_softmax(logits.float() / t, -1)
        return t * t * (soft.float() * (log_q - log_s)).sum(-1)

    def forward(self, logits: Tensor, soft: Tensor) -> Tensor:
        return self.per_sample(logits, soft).mean()
