"""The `distillation` defense: distillation for membership privacy (DMP; Shejwalkar and Houmansadr, AAAI 2021).

A teacher trained on the private members labels a reference set that no audited model trains on (the
defender's reserve); the released student learns only those soft labels. `soft_labels` gives the teacher's
softened outputs `softmax(t / T)`; `DistillationLoss` is `T^2 * KL(softmax(t / T) || softmax(s / T))`, the
T^2 keeping the gradient's scale independent of T (Hinton, Vinyals and Dean, 2015). Its `prepare` hook trains
the teacher (with the recipe, into `checkpoint_dir/teacher`) and hands the loop the student's data: the
reserve's records, the teacher's soft labels, and the members whose loss statistics the log reports.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .._checks import check_in_range, expected
from .._hooks import DefenseHooks, Procedure, TrainingSetup, legacy_identity
from ..errors import InvalidArgumentError
from ..training import fit, predict_logits
from .base import Defense, per_sample_loss

__all__ = ["Distillation", "DistillationLoss", "create", "soft_labels"]

NAME = "distillation"
DOC = "DMP: a teacher on the members, the released student on the reserve's soft labels"


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


# ----------------------------------------------------------------------------------------------------------
# The defense: its settings, its hooks in the training loop, its factory
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Distillation(Procedure):
    """DMP's settings: the temperature of the soft labels."""

    temperature: float

    @property
    def identity(self) -> str:
        return legacy_identity(distill=self)

    @property
    def needs_reserve(self) -> bool:
        return True  # the student's transfer set

    def hooks(self) -> DefenseHooks:
        return _Distill(self.temperature)


class _Distill(DefenseHooks):
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature

    def prepare(self, setup: TrainingSetup) -> TrainingSetup:
        """The teacher (a copy of the model, same initial weights) trains on the members with the defense's
        loss; the model, the released student, then trains on the reserve against its soft labels."""
        teacher = fit(
            copy.deepcopy(setup.model),
            setup.loss,
            setup.train,
            recipe=setup.recipe,
            runtime=setup.runtime,
            heldout=setup.heldout,
            checkpoint_dir=None if setup.checkpoint_dir is None else Path(setup.checkpoint_dir) / "teacher",
            resume=setup.resume,
            description=f"{setup.description} teacher",
        ).model
        t, rx = self.temperature, setup.reserve[0]
        teacher_logits = torch.as_tensor(predict_logits(teacher, rx, device=setup.runtime.device))
        return dataclasses.replace(
            setup,
            loss=DistillationLoss(temperature=t),
            train=(rx, soft_labels(teacher_logits, t)),
            stats_members=setup.train,
            description=f"{setup.description} student",
        )


def create(*, temperature: float = 1.0, loss: str = "ce") -> Defense:
    """`distillation`: the soft labels' `temperature`; `loss` trains the teacher (the student always learns the
    teacher's soft labels)."""
    check_in_range("temperature", temperature, low=0.0, low_inclusive=False)
    return Defense(per_sample_loss("distillation", loss), Distillation(float(temperature)))
