"""The `advreg` defense, adversarial regularisation (Nasr, Shokri and Houmansadr, CCS 2018): the classifier
trains against an inner membership-inference model.

`InferenceModel` is h(p, y): the softmax output p and the one-hot label y, each through its own small branch,
then a joint layer and a sigmoid (the paper's architecture, narrower). `AdversarialLoss` wraps the defense's loss
and is what the training loop calls: before each classifier step it runs `k` steps of h on a batch of members
and a batch of the defender's reference non-members (gradient ascent on h's gain, written as descent on the
binary cross-entropy), with the classifier in eval mode and out of the graph; then it returns
`loss(f(x), y) + alpha * (mean h(softmax f(x), y) - 0.5)` for the classifier's own batch, whose gradient
flows into the classifier only (h's gradients are cleared before its next step).

The batches h trains on come from a generator seeded by (seed, epoch) (`set_epoch`), and h's weights and
optimizer are part of the module's state (saved in the classifier's checkpoint), so a resumed model is
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import check_in_range, check_positive_int
from .._hooks import DefenseHooks, Procedure, TrainingSetup, legacy_identity
from .base import Defense, per_sample_loss

__all__ = ["AdvReg", "AdversarialLoss", "InferenceModel", "create", "inference_gain"]

NAME = "advreg"
DOC = "adversarial regularisation (Nasr et al.): an inner inference model, reserve non-members"


class InferenceModel(nn.Module):
    """h(p, y) -> the probability that the record (with output p and label y) is a member."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.output_branch = nn.Sequential(nn.Linear(num_classes, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
        self.label_branch = nn.Sequential(nn.Linear(num_classes, 64), nn.ReLU())
        self.joint = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 1))
        self.num_classes = num_classes

    def logit(self, probs: Tensor, labels: Tensor) -> Tensor:
        onehot = F.one_hot(labels, self.num_classes).to(probs.dtype)
        return self.joint(torch.cat([self.output_branch(probs), self.label_branch(onehot)], -1)).squeeze(-1)

    def forward(self, probs: Tensor, labels: Tensor) -> Tensor:
        return torch.sigmoid(self.logit(probs, labels))


def inference_gain(h: InferenceModel, member_probs, member_labels, nonmember_probs, nonmember_labels) -> Tensor:
    """h's gain, the quantity its steps ascend: `mean log h(members) + mean log(1 - h(non-members))`."""
    return (
        F.logsigmoid(h.logit(member_probs, member_labels)).mean()
        + F.logsigmoid(-h.logit(nonmember_probs, nonmember_labels)).mean()
    )


class AdversarialLoss(nn.Module):
    """The classifier's loss under adversarial regularisation (see the module docstring). With `alpha=0`
    h still trains, but the classifier's weights are exactly those of the plain loss.

    Args:
        loss: the defense's per-batch loss `loss(logits, target) -> scalar`.
        classifier: the classifier's forward function (its module must be trained in place by the loop).
        module: the classifier module (switched to eval mode while h trains, then restored).
        members: `(x, y)` the classifier's training records, on its device.
        reserve: `(x', y')` the defender's reference non-members, on its device.
        num_classes, alpha, steps, lr: h's size and the settings of `AdvReg`.
        batch_size: the size of h's member and non-member batches.
        seed: seeds h's initial weights and, with the epoch, its batches.
    """

    def __init__(
        self,
        loss: Callable[[Tensor, Tensor], Tensor],
        *,
        classifier: Callable[[Tensor], Tensor],
        module: nn.Module,
        members: tuple[Tensor, Tensor],
        reserve: tuple[Tensor, Tensor],
        num_classes: int,
        alpha: float,
        steps: int,
        lr: float,
        batch_size: int,
        seed: int,
    ) -> None:
        super().__init__()
        self.loss = loss
        # not submodules: the classifier's weights are saved by its own checkpoint, not as part of this loss
        object.__setattr__(self, "_classifier", classifier)
        object.__setattr__(self, "_module", module)
        self._members, self._reserve = members, reserve
        self.alpha, self.steps, self.batch_size, self.seed = alpha, steps, batch_size, seed
        device = members[0].device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([seed, 0xADE]).generate_state(1)[0]))
            self.inference = InferenceModel(num_classes).to(device)
        self.optimizer = torch.optim.Adam(self.inference.parameters(), lr=lr)
        self._generator = torch.Generator(device=device)
        self.set_epoch(0)
        self.last_gain = float("nan")  # h's gain on its last batch (logged)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.loss, "set_epoch"):
            self.loss.set_epoch(epoch)
        self._generator.manual_seed(int(np.random.SeedSequence([self.seed, epoch, 0xADE]).generate_state(1)[0]))

    def _batch(self, data: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = data
        idx = torch.randint(
            0, x.shape[0], (min(self.batch_size, x.shape[0]),), generator=self._generator, device=x.device
        )
        return x[idx], y[idx]

    @torch.no_grad()
    def _probs(self, x: Tensor) -> Tensor:
        return torch.softmax(self._classifier(x).float(), -1)

    def train_inference(self) -> float:
        """`steps` steps of h on fresh member and non-member batches; returns its last gain."""
        was_training = self._module.training
        self._module.eval()
        try:
            for _ in range(self.steps):
                (xm, ym), (xn, yn) = self._batch(self._members), self._batch(self._reserve)
                gain = inference_gain(self.inference, self._probs(xm), ym, self._probs(xn), yn)
                self.optimizer.zero_grad(set_to_none=True)
                (-gain).backward()
                self.optimizer.step()
        finally:
            self._module.train(was_training)
        self.optimizer.zero_grad(set_to_none=True)
        self.last_gain = float(gain.detach())
        return self.last_gain

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            self.train_inference()
        base = self.loss(logits, target)
        flagged = self.inference(torch.softmax(logits.float(), -1), target).mean()
        return base + self.alpha * (flagged - 0.5)

    # h's optimizer is part of the state saved with the classifier's checkpoint
    def get_extra_state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


# ----------------------------------------------------------------------------------------------------------
# The defense: its settings, its hooks in the training loop, its factory
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdvReg(Procedure):
    """Adversarial regularisation's settings (see the module docstring)."""

    alpha: float  # the weight of the inference model's output in the classifier's loss
    steps: int  # inference-model steps per classifier step (the paper's k)
    lr: float  # the inference model's Adam learning rate

    @property
    def identity(self) -> str:
        return legacy_identity(adversary=self)

    @property
    def needs_reserve(self) -> bool:
        return True  # the inference model's reference non-members

    def hooks(self) -> DefenseHooks:
        return _Adversary(self)


class _Adversary(DefenseHooks):
    """The loop's loss becomes an `AdversarialLoss`; h's gain goes into each record, h's state into checkpoints."""

    def __init__(self, settings: AdvReg) -> None:
        self.settings = settings
        self.loss: AdversarialLoss | None = None

    def wrap_loss(self, loss: Callable, *, forward: Callable, model: nn.Module, setup: TrainingSetup) -> Callable:
        self.loss = AdversarialLoss(
            loss,
            classifier=forward,
            module=model,
            members=setup.train,
            reserve=setup.reserve,
            num_classes=setup.num_classes,
            alpha=self.settings.alpha,
            steps=self.settings.steps,
            lr=self.settings.lr,
            batch_size=setup.recipe.batch_size,
            seed=setup.recipe.seed,
        )
        return self.loss

    def end_epoch(self, epoch: int, model: nn.Module, record: dict[str, Any], setup: TrainingSetup) -> bool:
        record["inference_gain"] = self.loss.last_gain
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"adversary": self.loss.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss.load_state_dict(state["adversary"])


def create(*, alpha: float = 3.0, k: int = 1, lr: float = 1e-3, loss: str = "ce") -> Defense:
    """`advreg`: h's weight `alpha`, its `k` steps per classifier step at Adam's `lr`."""
    check_in_range("alpha", alpha, low=0.0)
    check_positive_int("k", k)
    check_in_range("lr", lr, low=0.0, low_inclusive=False)
    return Defense(per_sample_loss("advreg", loss), AdvReg(float(alpha), int(k), float(lr)))
