"""The hooks through which a defense changes training and the released model (Opacus' shape: `GradSampleModule`
wraps the model, `DPOptimizer` the optimizer, and the training loop stays the user's).

A defense is a loss and a `Procedure`: a frozen record of its settings that says what the audit needs before any
training (whether models may train stacked, whether it learns from the defender's reserve, the epoch whose model
is released, how queries see the released outputs) and, for each model, returns fresh `DefenseHooks`, the
per-model state that the one training loop (`ccl.training.fit`) calls at fixed places:

    setup = hooks.prepare(setup)                    # before anything moves: distillation's teacher
    model, forward = hooks.wrap(model, setup)       # DP-SGD's per-sample module
    loss = hooks.wrap_loss(loss, forward=..., model=..., setup=setup)   # advreg's inner adversary
    optimizer = hooks.optimizer(optimizer)          # DP-SGD's clipping and noise
    for each epoch:
        hooks.start_epoch(optimizer, seed=..., epoch=..., device=...)   # DP-SGD's noise seed
        batches = hooks.batches(generator, device)  # DP-SGD's Poisson batches (None: the seeded shuffle)
        ...                                         # the steps
        stop = hooks.end_epoch(epoch, model, record, setup)   # patience; epsilon or gain in the log record
        checkpoint |= hooks.state_dict()            # restored with hooks.load_state_dict on resume
    hooks.release(model)                            # the best epoch's weights
    hooks.privacy_spent(epochs)                     # DP-SGD's accounting

Every default does nothing, so a defense overrides only what it changes; nothing here knows any defense. This
module imports nothing of `ccl` at run time: the engine and the defenses both depend on it, and the engine on no
defense.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor, nn

if TYPE_CHECKING:
    import torch

    from .training import Recipe, Runtime

__all__ = ["DefenseHooks", "Procedure", "TrainingSetup", "legacy_identity"]

#: The fields of the one record that held every built-in defense's settings before each had its own module. A
#: checkpoint records the procedure that wrote it as that record's repr, so the built-in defenses keep writing it.
_LEGACY_FIELDS = ("dp", "stop_after", "modify_outputs", "patience", "adversary", "distill")


def legacy_identity(**fields: Any) -> str:
    """`Procedure(dp=None, stop_after=None, ...)` with `fields` set: the identity a built-in defense's checkpoints
    were written with (so they still resume)."""
    values = dict.fromkeys(_LEGACY_FIELDS) | fields
    return "Procedure(" + ", ".join(f"{k}={v!r}" for k, v in values.items()) + ")"


@dataclass
class TrainingSetup:
    """One model's training as the hooks see it. `prepare` may return a changed copy (`dataclasses.replace`);
    after it, the loop moves the tensors to the training device and hands the same record to the other hooks."""

    model: nn.Module
    loss: Callable[[Tensor, Tensor], Tensor]
    train: tuple[Tensor, Tensor]  # (x (N, ...), y (N,) or soft labels (N, C))
    reserve: tuple[Tensor, Tensor] | None  # the defender's reserve, for a defense with `needs_reserve`
    heldout: tuple[Tensor, Tensor] | None
    recipe: Recipe
    runtime: Runtime
    checkpoint_dir: str | os.PathLike | None
    resume: bool
    description: str
    num_classes: int
    stats_members: tuple[Tensor, Tensor] | None = None  # whose loss statistics the log reports as the members'


class DefenseHooks:
    """One model's training under a defense (see the module docstring); every hook's default does nothing."""

    mixed_precision = True  # False: the loop trains in float32 whatever the recipe's precision
    stopped = False  # True once the defense has ended training early (also when restored from a checkpoint)

    def prepare(self, setup: TrainingSetup) -> TrainingSetup:
        """What to train, before anything moves to the device (a distilled student trains on other data)."""
        return setup

    def wrap(self, model: nn.Module, setup: TrainingSetup) -> tuple[nn.Module, Callable[[Tensor], Tensor] | None]:
        """The module to train and checkpoint, and its forward if the defense replaces it (None: the module's own,
        compiled when the runtime asks)."""
        return model, None

    def wrap_loss(
        self, loss: Callable, *, forward: Callable[[Tensor], Tensor], model: nn.Module, setup: TrainingSetup
    ) -> Callable:
        """The loss the loop minimises, given the model's forward."""
        return loss

    def optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        return optimizer

    def start_epoch(self, optimizer: torch.optim.Optimizer, *, seed: int, epoch: int, device: torch.device) -> None:
        """Before the epoch's first step (after its learning rate is set)."""

    def batches(self, generator: torch.Generator, device: torch.device) -> list[Tensor] | None:
        """The epoch's batches as `(1, b)` positions of the training records, drawn from the epoch's generator;
        None: the loop's seeded shuffle."""
        return None

    def end_epoch(self, epoch: int, model: nn.Module, record: dict[str, Any], setup: TrainingSetup) -> bool:
        """After the epoch (0-based): may add to its log `record` or change the model; True stops training."""
        return False

    def state_dict(self) -> dict[str, Any]:
        """What the checkpoint keeps besides the model and the optimizer (keys of the checkpoint itself)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores `state_dict()`'s entries from a loaded checkpoint."""

    def release(self, model: nn.Module) -> None:
        """After training: makes `model` the released one (e.g. the best epoch's weights)."""

    def privacy_spent(self, epochs: int) -> Any | None:
        """The privacy the model spent in `epochs` epochs (DP-SGD's accounting); None for other defenses."""
        return None


@dataclass(frozen=True)
class Procedure:
    """What a defense does beyond its loss: nothing, for a plain loss. A defense subclasses it as a frozen
    dataclass of its settings and overrides what it changes; `hooks()` gives each trained model its own state."""

    @property
    def identity(self) -> str:
        """What a checkpoint records of the procedure that wrote it (a resumed model must match it)."""
        return legacy_identity() if type(self) is Procedure else repr(self)

    @property
    def needs_reserve(self) -> bool:
        """Whether the defense learns from the defender's reserve: records no audited model trains on."""
        return False

    @property
    def stackable(self) -> bool:
        """Whether models of this defense may train stacked (K at once, `ccl.stacked`, which calls no hooks): only
        if the loss, `last_epoch` and `query_transform` are all the defense changes."""
        return not self.needs_reserve and type(self.hooks()) is DefenseHooks

    def last_epoch(self, recipe: Recipe) -> int:
        """The number of epochs after which the released model is taken (at most the recipe's)."""
        return recipe.epochs

    def hooks(self) -> DefenseHooks:
        """Fresh hooks for one model's training."""
        return DefenseHooks()

    def query_transform(
        self, forward_all: Callable[[Tensor], Tensor], logits: list[np.ndarray], x_all: Tensor, *, seed: int
    ) -> list[np.ndarray]:
        """The outputs queries see: `logits[k] (Q, [A,] C)` of model k (`forward_all(x) -> (K, B, C)`), as
        released; `x_all` every record of the data (its range)."""
        return logits
