"""The `early_stop` defense: the simplest regulariser, and a baseline every defense must beat.

With `epochs=E` the released model is the one after E epochs (the learning-rate schedule is still the recipe's;
such models may train stacked). With `patience=P`, training stops once the validation loss (cross-entropy on the
defender's reserve, records no audited model trains on) has not improved for P epochs, and the model of the best
epoch is released (as Keras' `restore_best_weights` or Lightning's best checkpoint do); the rule's state and the
best weights are part of the checkpoint, so a resumed run releases the same model.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .. import losses
from .._checks import check_positive_int, expected
from .._hooks import DefenseHooks, Procedure, TrainingSetup, legacy_identity
from ..errors import InvalidArgumentError
from ..training import Recipe, loss_stats
from .base import Defense, per_sample_loss

__all__ = ["EarlyStop", "create"]

NAME = "early_stop"
DOC = "release the model after `epochs` epochs, or at the best validation loss with `patience` (reserve data)"


@dataclass(frozen=True)
class EarlyStop(Procedure):
    """Early stopping after a fixed number of epochs, or by patience (one of the two)."""

    epochs: int | None = None  # the model after this many epochs is released
    patience: int | None = None  # stop when the validation loss has not improved for this many epochs

    @property
    def identity(self) -> str:
        return legacy_identity(stop_after=self.epochs, patience=self.patience)

    @property
    def needs_reserve(self) -> bool:
        return self.patience is not None  # the validation split

    def last_epoch(self, recipe: Recipe) -> int:
        return recipe.epochs if self.epochs is None else min(recipe.epochs, self.epochs)

    def hooks(self) -> DefenseHooks:
        return DefenseHooks() if self.patience is None else _Patience(self.patience)


class _Patience(DefenseHooks):
    """The patience rule: the validation loss after each epoch, the best epoch's weights, the stop."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.watch = {"best": math.inf, "best_epoch": 0, "bad": 0, "stopped": False}
        self.best_state: dict[str, Tensor] | None = None

    @property
    def stopped(self) -> bool:
        return self.watch["stopped"]

    def end_epoch(self, epoch: int, model: nn.Module, record: dict[str, Any], setup: TrainingSetup) -> bool:
        val_loss = loss_stats(model, *setup.reserve, 4 * setup.recipe.batch_size)["loss_mean"]
        record["val_loss"] = val_loss
        if val_loss < self.watch["best"]:
            self.watch.update(best=val_loss, best_epoch=epoch + 1, bad=0)
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.watch["bad"] += 1
        self.watch["stopped"] = self.watch["bad"] >= self.patience
        if self.stopped or epoch + 1 == setup.recipe.epochs:  # done: the best epoch's model is the released one,
            model.load_state_dict(self.best_state)  # and the last record's statistics and the checkpoint are its
            record["released_epoch"] = self.watch["best_epoch"]
        return self.stopped

    def state_dict(self) -> dict[str, Any]:
        return {"patience": json.dumps(self.watch), "best_model": self.best_state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.watch, self.best_state = json.loads(state["patience"]), state["best_model"]

    def release(self, model: nn.Module) -> None:
        if self.best_state is not None:
            model.load_state_dict(self.best_state)


def create(*, epochs: int | None = None, patience: int | None = None, loss: str = "ce") -> Defense:
    """`early_stop`: `epochs` or `patience`, not both."""
    if (epochs is None) == (patience is None):
        raise InvalidArgumentError(
            expected(
                "epochs",
                "given (the model after that many epochs is released), or patience instead, not both",
                f"epochs={epochs}, patience={patience}",
            )
        )
    if epochs is not None:
        check_positive_int("epochs", epochs)
    if patience is not None:
        check_positive_int("patience", patience)
    return Defense(
        per_sample_loss("early_stop", loss) if loss != "relaxloss" else losses.create(loss),
        EarlyStop(epochs=None if epochs is None else int(epochs), patience=None if patience is None else int(patience)),
    )
