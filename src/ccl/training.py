"""The training engine: one readable loop for any classifier and any loss of `ccl.losses`.

Two typed configs keep what determines the weights apart from how a run is executed:
- `Recipe` (frozen): optimizer, schedule, epochs, batch size, precision, augmentation, seed. Two models trained
  with the same recipe on the same records are the same model; cache keys and checkpoints compare the recipe.
- `Runtime` (frozen): device, channels_last, compile, eval_every, progress, threads. Changing one never
  invalidates a model or a checkpoint.

`fit` trains one model; `ccl.stacked.fit_stacked` trains K models of one recipe in lockstep. Both run the same
epoch loop (`train_models`) over a `Models` adapter (one module, or K stacked with `torch.func`), so the
learning-rate schedule, `set_epoch`, the seeded batch order, augmentation, autocast, the finiteness checks and
the optimizer step are written once.

What it guarantees:
- Deterministic: the shuffling and augmentation of epoch `e` of a model with seed `s` come from a generator
  seeded with `(s, e)`, so the same seed gives bit-identical weights on CPU, also across an interruption.
- Resumable: a checkpoint (weights, optimizer, epoch, history, recipe) is written atomically every
  `CHECKPOINT_EVERY_S` seconds and after the last epoch
  and loaded with `weights_only=True`. A non-finite loss, or weights that are no longer finite (their squared
  norm overflows float32), stops training with an error naming the epoch (and batch), keeping the last good
  checkpoint.
- Observable: a JSONL log with one line per epoch: train loss and accuracy, held-out accuracy, and the mean and
  variance of the cross-entropy on members and non-members, the CCL paper's key quantity.
- Fast where it can be: data stays on the device; augmentation (random crop with 4-pixel padding, horizontal
  flip) runs on whole batches, only while training; on CUDA, bf16 autocast and channels_last by default.

Example:
    >>> data = ccl.data.load("digits")
    >>> model = ccl.models.create("mlp", num_classes=10, input_shape=data.input_shape, hidden=(256,), seed=0)
    >>> result = ccl.training.fit(model, ccl.losses.create("ccel"), (data.x, data.y),
    ...                           recipe=ccl.training.Recipe(epochs=20, lr=0.05))
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_in_range, check_positive_int, expected
from ._device import resolve_device
from ._hooks import DefenseHooks, Procedure, TrainingSetup
from ._io import atomic_path, remove_stale_temporaries, write_text
from .data.transforms import augment_batch
from .errors import InvalidArgumentError, InvalidArgumentTypeError, RunDirectoryError, TrainingError

__all__ = [
    "FitResult",
    "Recipe",
    "Runtime",
    "TrainingError",
    "augment_batch",
    "autocast_dtype",
    "defense_label",
    "epoch_generator",
    "fit",
    "load_checkpoint",
    "loss_stats",
    "lr_at",
    "make_optimizer",
    "predict_logits",
    "resolve_device",
    "train_models",
]

CHECKPOINT = "checkpoint.pt"
#: Seconds between two checkpoints of a training run, which always ends with one: an interrupted run resumes from
#: the last and replays the epochs after it bit for bit (each epoch's batches and noise are seeded by (seed,
#: epoch)). One after every epoch, each written atomically with fsync, cost 40-75% of a small model's training
#: (the demo's DP-SGD models: 0.65 s against 0.37 s).
CHECKPOINT_EVERY_S = 30.0


class CheckpointClock:
    """Says when a checkpoint is due: `CHECKPOINT_EVERY_S` seconds after the last one, and at the final epoch."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def due(self, *, final: bool) -> bool:
        now = time.monotonic()
        if final or now - self.last >= CHECKPOINT_EVERY_S:
            self.last = now
            return True
        return False


@dataclass(frozen=True)
class Recipe:
    """What determines the trained weights (with the model, its initial weights and the records)."""

    # `help` and `choices` are also the command line's (`ccl.cli` builds the recipe's flags from these fields)
    epochs: int = field(default=30, metadata={"help": "epochs of training"})
    batch_size: int = field(default=128, metadata={"help": "records per batch"})
    optimizer: str = field(default="sgd", metadata={"choices": ("sgd", "adam", "adamw")})
    lr: float = field(default=0.1, metadata={"help": "peak learning rate"})
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum"})
    weight_decay: float = field(default=5e-4, metadata={"help": "L2 weight decay"})
    schedule: str = field(default="cosine", metadata={"choices": ("constant", "multistep", "cosine")})  # per epoch
    milestones: tuple[float, ...] = (0.5, 0.75)  # multistep: fractions of `epochs` where lr *= lr_decay
    lr_decay: float = 0.1
    augment: bool = field(default=False, metadata={"help": "random crop + flip while training (images)"})
    precision: str = field(
        default="auto", metadata={"choices": ("auto", "fp32", "bf16", "fp16"), "help": "bf16 on CUDA, fp32 on CPU"}
    )
    seed: int = 0  # batch order, augmentation and dropout (the initial weights come from the model's seed)

    def __post_init__(self) -> None:
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_choice("optimizer", self.optimizer, _RECIPE_CHOICES["optimizer"])
        check_in_range("lr", self.lr, low=0.0, low_inclusive=False)
        check_in_range("momentum", self.momentum, low=0.0, high=1.0, high_inclusive=False)
        check_in_range("weight_decay", self.weight_decay, low=0.0)
        check_choice("schedule", self.schedule, _RECIPE_CHOICES["schedule"])
        if isinstance(self.milestones, (str, bytes)) or not isinstance(self.milestones, Iterable):
            raise InvalidArgumentTypeError(expected("milestones", "a list of fractions in [0, 1]", self.milestones))
        object.__setattr__(self, "milestones", tuple(self.milestones))
        for m in self.milestones:
            check_in_range("milestones", m, low=0.0, high=1.0)
        object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
        check_in_range("lr_decay", self.lr_decay, low=0.0, high=1.0, low_inclusive=False)
        if not isinstance(self.augment, bool):
            raise InvalidArgumentTypeError(expected("augment", "true or false", self.augment))
        check_choice("precision", self.precision, _RECIPE_CHOICES["precision"])
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise InvalidArgumentTypeError(expected("seed", "a non-negative integer", self.seed))
        if self.seed < 0:  # seeds feed numpy's SeedSequence, which takes non-negative integers only
            raise InvalidArgumentError(expected("seed", "a non-negative integer", self.seed))

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


def recipe_text(train: dict[str, Any]) -> str:
    """`{"lr": [0.1, 0.5], "batch_size": 64}` -> `batch_size=64,lr=[0.1,0.5]`: the command line's form."""

    def text(v: Any) -> str:
        return "[" + ",".join(map(text, v)) + "]" if isinstance(v, (list, tuple)) else str(v)

    return ",".join(f"{k}={text(v)}" for k, v in sorted(train.items()))


def defense_label(loss: str, params: dict[str, Any], train: dict[str, Any]) -> str:
    """A defense's label, `ccl.config.DefenseSpec.label`: `dpsgd(epsilon=8)@batch_size=64,lr=0.5`. Here, beside
    `recipe_text`, so that the report labels a config.yaml entry without reading the config code."""
    label = loss
    if params:
        label += "(" + ",".join(f"{k}={v}" for k, v in sorted(params.items())) + ")"
    return label + ("@" + recipe_text(train) if train else "")


#: The values the recipe's text fields take (its fields' metadata: the command line offers the same).
_RECIPE_CHOICES = {f.name: f.metadata["choices"] for f in dataclasses.fields(Recipe) if "choices" in f.metadata}


@dataclass(frozen=True)
class Runtime:
    """How training runs; never part of what determines a model (changing it invalidates nothing)."""

    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    channels_last: bool | None = None  # None: on for image models on CUDA
    compile: bool = False  # torch.compile the model (CUDA; off by default)
    eval_every: int = 1  # epochs between member/non-member loss statistics in the log
    progress: bool = True
    threads: int | None = None  # CPU threads for torch; None: leave torch's setting (the CLI picks one)

    def __post_init__(self) -> None:
        if not isinstance(self.device, str):
            raise InvalidArgumentTypeError(expected("device", "a device name such as 'cpu' or 'cuda'", self.device))
        check_positive_int("eval_every", self.eval_every)
        if self.threads is not None:
            check_positive_int("threads", self.threads)

    def replace(self, **changes: Any) -> Runtime:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float]]
    resumed_from_epoch: int  # 0 when training started from scratch
    epsilon: float | None = None  # DP-SGD: the epsilon spent (at the defense's delta)
    dp_accounting: Any | None = None  # DP-SGD: the accountant's inputs and the epsilon spent (`DPAccounting`)


# ----------------------------------------------------------------------------------------------------------
# Small named helpers
# ----------------------------------------------------------------------------------------------------------
def lr_at(epoch: int, recipe: Recipe) -> float:
    """The learning rate of `epoch` (0-based) under the recipe's schedule."""
    if recipe.schedule == "constant":
        return recipe.lr
    if recipe.schedule == "multistep":
        passed = sum(epoch >= round(m * recipe.epochs) for m in recipe.milestones)
        return recipe.lr * recipe.lr_decay**passed
    return 0.5 * recipe.lr * (1 + math.cos(math.pi * epoch / recipe.epochs))


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return g


def autocast_dtype(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    precision = recipe.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def make_optimizer(params: Iterable[Tensor], recipe: Recipe) -> torch.optim.Optimizer:
    params = list(params)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Runs the block with `threads` intra-op CPU threads (None: unchanged), restoring the old number after."""
    if threads is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _check_data(name: str, data: Any) -> tuple[Tensor, Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise InvalidArgumentTypeError(expected(name, "a pair (x, y) of tensors", type(data).__name__))
    try:
        x, y = (torch.as_tensor(v) for v in data)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InvalidArgumentTypeError(expected(name, "a pair (x, y) of numeric arrays", str(err))) from None
    if x.shape[0] == 0:
        raise InvalidArgumentError(expected(name, "a non-empty split", "0 records"))
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise InvalidArgumentError(expected(f"{name} labels", f"shape ({x.shape[0]},) matching x", tuple(y.shape)))
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise InvalidArgumentTypeError(expected(f"{name} labels", "integer class indices", y.dtype))
    if not (x.is_floating_point() or x.dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)):
        raise InvalidArgumentTypeError(expected(f"{name} inputs", "a real-valued array", x.dtype))
    return x.float(), y.long()


def _num_classes(model: nn.Module, x: Tensor) -> int:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except (RuntimeError, ValueError, TypeError, IndexError) as err:
        raise InvalidArgumentError(
            f"The model cannot take inputs of shape {tuple(x.shape[1:])} (per record): {str(err).splitlines()[0]}"
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(out, Tensor) or out.ndim != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise InvalidArgumentError(f"The model must return logits (N, C); it returned {shape}.")
    return int(out.shape[1])


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    x: Tensor,
    *,
    batch_size: int = 1024,
    device: str | torch.device = "auto",
    flip_queries: bool = False,
) -> np.ndarray:
    """The model's logits on `x` in eval mode, float32 numpy `(N, C)`; with `flip_queries=True`, the original
    and the horizontally flipped image, `(N, 2, C)`. No augmentation unless asked for."""
    if flip_queries and x.ndim != 4:
        raise InvalidArgumentError(
            expected(
                "flip_queries",
                "False for non-image data (x of shape (N, C, H, W))",
                f"True, for x of shape {tuple(x.shape)}",
            )
        )
    device = resolve_device(device)
    model.eval()
    model.to(device)
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size].to(device, non_blocking=True)
        views = [xb, xb.flip(3)] if flip_queries else [xb]
        outs.append(torch.stack([model(v).float() for v in views], 1).cpu())
    logits = torch.cat(outs).numpy()
    return logits if flip_queries else logits[:, 0]


@torch.no_grad()
def loss_stats(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> dict[str, float]:
    """The mean and variance of the model's cross-entropy on `(x, y)` and its accuracy, in eval mode."""
    model.eval()
    losses, correct = [], 0
    for i in range(0, x.shape[0], batch_size):
        out = model(x[i : i + batch_size]).float()
        losses.append(F.cross_entropy(out, y[i : i + batch_size], reduction="none"))
        correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
    ce = torch.cat(losses).double()
    return {"loss_mean": ce.mean().item(), "loss_var": ce.var(unbiased=False).item(), "acc": correct / x.shape[0]}


def _member_stats(
    model: nn.Module, members: tuple[Tensor, Tensor], heldout: tuple[Tensor, Tensor] | None, batch_size: int
) -> dict[str, float]:
    """Mean and variance of the CE on members and non-members, and their accuracies (the log's key columns)."""
    stats = loss_stats(model, *members, 4 * batch_size)
    out = {"member_loss_mean": stats["loss_mean"], "member_loss_var": stats["loss_var"], "member_acc": stats["acc"]}
    if heldout is not None:
        stats = loss_stats(model, *heldout, 4 * batch_size)
        out.update(
            {
                "nonmember_loss_mean": stats["loss_mean"],
                "nonmember_loss_var": stats["loss_var"],
                "heldout_acc": stats["acc"],
            }
        )
    return out


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Loads a checkpoint written by `fit` or `fit_stacked` (with `weights_only=True`: no code runs from it)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
        state["history"] = json.loads(state.get("history", "[]"))
        state["recipe"] = json.loads(state["recipe"])
    except Exception as err:
        raise RunDirectoryError(
            f"Cannot load the checkpoint {path}: it is corrupt, truncated or not a ccl checkpoint of this version "
            f"({type(err).__name__}). Delete it to train that model again."
        ) from None
    return state


# ----------------------------------------------------------------------------------------------------------
# The one training loop, over one model or K stacked models
# ----------------------------------------------------------------------------------------------------------
class Models(Protocol):
    """What the loop needs of the models it trains: K of them, run on `(K, B, ...)` batches."""

    k: int

    def forward(self, xb: Tensor) -> Tensor:  # (K, B, ...) -> (K, B, C)
        ...

    def parameters(self) -> list[Tensor]: ...

    def train(self, mode: bool = True) -> Any: ...

    def weights_finite(self) -> Tensor:  # (K,) bool: parameters finite and their squared norm representable
        ...


class OneModel:
    """One `nn.Module` as a stack of K = 1 (the plain path: no `torch.func`, hooks and all)."""

    k = 1

    def __init__(self, model: nn.Module, forward: Callable[[Tensor], Tensor] | None = None) -> None:
        self.model = model
        self._forward = forward or model

    def forward(self, xb: Tensor) -> Tensor:
        return self._forward(xb[0])[None]

    def parameters(self) -> list[Tensor]:
        return list(self.model.parameters())

    def train(self, mode: bool = True) -> OneModel:
        self.model.train(mode)
        return self

    def weights_finite(self) -> Tensor:
        norms = [p.detach().float().square().sum() for p in self.model.parameters()]
        return torch.isfinite(torch.stack(norms).sum())[None] if norms else torch.ones(1, dtype=torch.bool)


@dataclass
class _EpochOutcome:
    loss: Tensor  # (K,) mean training loss
    acc: Tensor  # (K,) training accuracy
    bad_model: int  # -1: every loss finite
    bad_batch: int


def _train_epoch(
    models: Models,
    loss_fn,
    optimizer: torch.optim.Optimizer,
    scaler,
    x: Tensor,
    y: Tensor,
    member_idx: Tensor,
    seeds: list[int],
    epoch: int,
    *,
    recipe: Recipe,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    sampler: Callable[[torch.Generator, torch.device], list[Tensor] | None] | None = None,
) -> _EpochOutcome:
    """One pass of every model over its members `member_idx (K, m)`, each in its own seeded order (or the
    batches `sampler` draws from the epoch's generator, unless it returns None: DP-SGD's Poisson sampling,
    K = 1). Sums stay on the device, so a GPU syncs once per epoch, not per batch; on a CPU a bad loss stops
    before its step."""
    k, m = member_idx.shape
    gens = [epoch_generator(s, epoch, device) for s in seeds]
    torch.manual_seed(int(np.random.SeedSequence([seeds[0], epoch, 1]).generate_state(1)[0]))  # dropout etc.
    batches = sampler(gens[0], device) if sampler is not None else None
    if batches is None:
        orders = torch.stack([torch.randperm(m, generator=g, device=device) for g in gens])  # (K, m)
        if m % recipe.batch_size == 1 and m > 1:
            orders = orders[:, :-1]  # a batch of one record breaks BatchNorm; skipped this epoch (a random one)
        batches = [orders[:, i : i + recipe.batch_size] for i in range(0, orders.shape[1], recipe.batch_size)]
    models.train(True)
    per_sample = getattr(loss_fn, "per_sample", None) if k > 1 and getattr(loss_fn, "reduction", "") == "mean" else None
    total_loss = torch.zeros(k, device=device)
    correct = torch.zeros(k, dtype=torch.long, device=device)
    bad = torch.full((2,), -1, dtype=torch.long, device=device)  # (model, batch) of the first non-finite loss
    seen = 0
    for batch, positions in enumerate(batches):
        if positions.shape[1] == 0:  # an empty Poisson batch (probability (1 - q)^m): no step
            continue
        idx = member_idx.gather(1, positions)  # (K, b) dataset indices
        xb, yb = x[idx], y[idx]  # (K, b, ...), (K, b)
        if recipe.augment:
            xb = torch.stack([augment_batch(xb[j], gens[j]) for j in range(k)])
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = models.forward(xb)  # (K, b, C)
            try:
                if per_sample is not None:  # one call for the K batches: each model's loss is its batch's mean
                    losses = per_sample(out.reshape(-1, out.shape[-1]), yb.reshape(-1)).reshape(k, -1).mean(1)
                else:
                    losses = torch.stack([loss_fn(out[j], yb[j]) for j in range(k)])  # (K,)
            except ValueError:  # ccl's losses refuse non-finite logits: a model has diverged
                if bool(torch.isfinite(out).all()):
                    raise
                losses = torch.isfinite(out).flatten(1).all(1).float().log()  # -inf marks the diverged models
        finite = torch.isfinite(losses)
        if device.type == "cpu" and not bool(finite.all()):  # free on a CPU: stop before a bad step
            return _EpochOutcome(total_loss, correct.float(), int((~finite).nonzero()[0]), batch)
        first_bad = torch.where(finite.all(), -1, (~finite).int().argmax())
        bad = torch.where(bad[0] < 0, torch.stack([first_bad, torch.where(first_bad < 0, -1, batch)]), bad)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses.sum()).backward()
        scaler.step(optimizer)
        scaler.update()
        total_loss += losses.detach().float() * idx.shape[1]
        correct += (out.argmax(-1) == (yb.argmax(-1) if yb.is_floating_point() else yb)).sum(1)  # soft labels too
        seen += idx.shape[1]
    seen = max(seen, 1)
    bad_model, bad_batch = bad.tolist()
    return _EpochOutcome(total_loss / seen, correct.float() / seen, bad_model, bad_batch)


def _check_finite(models: Models, outcome: _EpochOutcome, epoch: int, names: list[str], checkpoint) -> None:
    """Raises `TrainingError` naming the model, the epoch (and batch) when its loss or its weights stopped being
    finite, and where the last good checkpoint is."""
    kept = (
        f"the last good checkpoint is {checkpoint}"
        if checkpoint and os.path.exists(checkpoint)
        else "no checkpoint was written"
    )
    if outcome.bad_model >= 0:
        raise TrainingError(
            f"The loss of {names[outcome.bad_model]} became non-finite at epoch {epoch} (0-based), batch "
            f"{outcome.bad_batch}; {kept}. Lower the learning rate (--lr) or check the data."
        )
    finite = models.weights_finite()
    if not bool(finite.all()):
        bad = int((~finite).nonzero()[0])
        raise TrainingError(
            f"The weights of {names[bad]} diverged at epoch {epoch} (0-based): they are no longer finite "
            f"(or their squared norm overflows float32); {kept}. Lower the learning rate (--lr) or check the data."
        )


def train_models(
    models: Models,
    loss_fn,
    x: Tensor,
    y: Tensor,
    member_idx: Tensor,
    *,
    recipe: Recipe,
    seeds: list[int],
    device: torch.device,
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
    on_epoch_end: Callable[[int, torch.optim.Optimizer, dict[str, Tensor]], bool | None] | None = None,
    names: list[str] | None = None,
    progress: bool = False,
    description: str = "train",
    checkpoint: str | os.PathLike | None = None,
    stop_after: int | None = None,
    hooks: DefenseHooks | None = None,
) -> None:
    """Trains `models` (K of one recipe, on `device`) on the records `member_idx (K, m)` of `(x, y)` from
    `start_epoch` to `recipe.epochs` (or `stop_after`), model j with `seeds[j]`. After each epoch
    `on_epoch_end(epoch, optimizer, {"loss", "acc"})` runs (checkpoints and logs go there); when it returns
    True, training stops there (a patience rule). A defense's `hooks` (one model only) wrap the optimizer, seed
    each epoch and may draw its batches. `y` may hold soft labels `(N, C)` for a loss that takes them. Raises
    `TrainingError` naming the model, the epoch and the batch when a loss or the weights stop being finite."""
    names = names or [f"model {j}" for j in range(models.k)]
    amp_dtype = autocast_dtype(recipe, device)
    optimizer = make_optimizer(models.parameters(), recipe)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    if hooks is not None and models.k != 1:
        raise InvalidArgumentError(expected("models", "one model with a defense's hooks", models.k))
    hooks = hooks or DefenseHooks()
    optimizer = hooks.optimizer(optimizer)
    if not hooks.mixed_precision:
        amp_dtype = None
    last = recipe.epochs if stop_after is None else min(recipe.epochs, stop_after)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=last, initial=start_epoch, desc=description, unit="epoch", leave=False)
    try:
        for epoch in range(start_epoch, last):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(epoch, recipe)
            if hasattr(loss_fn, "set_epoch"):
                loss_fn.set_epoch(epoch)
            hooks.start_epoch(optimizer, seed=seeds[0], epoch=epoch, device=device)
            outcome = _train_epoch(
                models, loss_fn, optimizer, scaler, x, y, member_idx, seeds, epoch,
                recipe=recipe, device=device, amp_dtype=amp_dtype, sampler=hooks.batches,
            )  # fmt: skip
            _check_finite(models, outcome, epoch, names, checkpoint)
            stop = on_epoch_end is not None and on_epoch_end(
                epoch, optimizer, {"loss": outcome.loss, "acc": outcome.acc}
            )
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(outcome.loss.mean()):.3f}", acc=f"{float(outcome.acc.mean()):.3f}")
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()


# ----------------------------------------------------------------------------------------------------------
# fit: one model
# ----------------------------------------------------------------------------------------------------------
def _check_labels(name: str, labels: Tensor, num_classes: int) -> None:
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise InvalidArgumentError(
            expected(
                f"{name} labels",
                f"class indices in [0, {num_classes}) (the model's outputs)",
                f"labels in [{int(labels.min())}, {int(labels.max())}]",
            )
        )


def fit(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    train: tuple[Tensor, Tensor],
    *,
    recipe: Recipe | None = None,
    runtime: Runtime | None = None,
    heldout: tuple[Tensor, Tensor] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
    resume: bool = True,
    description: str = "train",
    procedure: Procedure | None = None,
    reserve: tuple[Tensor, Tensor] | None = None,
) -> FitResult:
    """Trains `model` in place with `loss_fn` on `train = (x, y)`.

    Args:
        model: any classifier returning logits `(N, C)`.
        loss_fn: a loss of `ccl.losses` (or any `f(logits, target) -> scalar`); `set_epoch(epoch)` is called
            at the start of each epoch when it has one (RelaxLoss).
        train: `(x (N, ...), y (N,))`, the members.
        recipe: what determines the weights; `Recipe()` by default.
        runtime: device, progress bar, compile, log frequency; `Runtime()` by default.
        heldout: `(x, y)` never trained on, for held-out accuracy and the non-member loss statistics.
        checkpoint_dir: where `checkpoint.pt` is written (every `CHECKPOINT_EVERY_S` seconds and at the end);
            with `resume=True` an existing one
            is continued from (it must have been written with the same recipe; the runtime may differ).
        log_path: the JSONL log (default: `checkpoint_dir/log.jsonl` when `checkpoint_dir` is given).
        procedure: what a defense does to training beyond its loss (`ccl.defenses.Procedure`): DP-SGD (the
            returned model is the one trained, BatchNorm replaced by GroupNorm where Opacus needs it; the log
            records the epsilon spent), early stopping after a number of epochs or by patience, adversarial
            regularisation, distillation (the returned model is the student; the teacher trains first, into
            `checkpoint_dir/teacher`). The loop calls its hooks (`ccl._hooks`); see `ccl.defenses`.
        reserve: `(x, y)` the defender's reserve, records that no audited model trains on, for the defenses
            that learn from such data (`procedure.needs_reserve`): early stopping's validation split,
            adversarial regularisation's reference non-members, distillation's transfer set.

    Raises:
        InvalidArgumentError / InvalidArgumentTypeError: bad data (empty split, labels outside [0, C), shapes
            the model cannot take, augmentation of non-image data).
        TrainingError: a non-finite loss or diverged weights; the message names the epoch and batch.
    """
    recipe = recipe or Recipe()
    runtime = runtime or Runtime()
    if not isinstance(recipe, Recipe):
        raise InvalidArgumentTypeError(expected("recipe", "a ccl.training.Recipe", type(recipe).__name__))
    if not isinstance(runtime, Runtime):
        raise InvalidArgumentTypeError(expected("runtime", "a ccl.training.Runtime", type(runtime).__name__))
    x, y = _check_data("train", train)
    num_classes = _num_classes(model, x)
    _check_labels("train", y, num_classes)
    heldout = None if heldout is None else _check_split("heldout", heldout, x, num_classes)
    needs_reserve = procedure is not None and procedure.needs_reserve
    if needs_reserve and reserve is None:
        raise InvalidArgumentError(
            expected("reserve", "(x, y) records no audited model trains on, for this defense", None)
        )
    reserve = _check_split("reserve", reserve, x, num_classes) if needs_reserve else None
    return _fit(
        model, loss_fn, (x, y), recipe=recipe, runtime=runtime, heldout=heldout, checkpoint_dir=checkpoint_dir,
        log_path=log_path, resume=resume, description=description, procedure=procedure, reserve=reserve,
    )  # fmt: skip


def _check_split(name: str, data: Any, x: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Another split (held-out records, the reserve) checked like the training records and against them."""
    sx, sy = _check_data(name, data)
    _check_labels(name, sy, num_classes)
    if sx.shape[1:] != x.shape[1:]:
        raise InvalidArgumentError(
            expected(name, f"records of shape {tuple(x.shape[1:])} like train", tuple(sx.shape[1:]))
        )
    return sx, sy


def _on_device(setup: TrainingSetup, device: torch.device, *, recipe: Recipe, runtime: Runtime):
    """The setup with the model and every split on `device` (channels_last for images on CUDA unless the runtime
    says otherwise), and the records whose statistics the log reports as the members': those `prepare` named (a
    distilled student's: the teacher's members), else the training records (soft labels: their argmax)."""
    x = setup.train[0]
    images = x.ndim == 4
    if recipe.augment and not images:
        raise InvalidArgumentError(expected("augment", "False for non-image data (x of shape (N, C, H, W))", True))
    channels_last = runtime.channels_last if runtime.channels_last is not None else (images and device.type == "cuda")
    memory_format = torch.channels_last if channels_last and images else torch.contiguous_format

    def to_device(data: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor] | None:
        if data is None:
            return None
        return data[0].to(device).contiguous(memory_format=memory_format), data[1].to(device)

    setup.model.to(device=device, memory_format=memory_format)
    x, y = to_device(setup.train)
    members = to_device(setup.stats_members) or (x, y.argmax(-1) if y.is_floating_point() else y)
    placed = dataclasses.replace(
        setup, train=(x, y), reserve=to_device(setup.reserve), heldout=to_device(setup.heldout)
    )
    return placed, members


def _save_checkpoint(path: Path, model, optimizer, epochs: int, history: list[dict], identity: dict, hooks) -> None:
    """The checkpoint after `epochs` epochs, atomically: weights, optimizer, history, the recipe's identity and the
    defense's state."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epochs,
        "history": json.dumps(history),
        "recipe": json.dumps(identity),
        **hooks.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _resume(ckpt_path: Path | None, identity: dict, model: nn.Module, hooks: DefenseHooks, device: torch.device):
    """(start epoch, optimizer state, history) from the checkpoint at `ckpt_path` if there is one (the model's
    and the hooks' state are loaded into them), else a fresh start. A checkpoint of another recipe is refused."""
    if ckpt_path is None or not ckpt_path.exists():
        return 0, None, []
    state = load_checkpoint(ckpt_path, map_location=device)
    if state["recipe"] != json.loads(json.dumps(identity)):
        raise RunDirectoryError(
            f"The checkpoint {ckpt_path} was written with another recipe; use another directory or resume=False."
        )
    model.load_state_dict(state["model"])
    hooks.load_state_dict(state)
    return int(state["epoch"]), state["optimizer"], state["history"]


def _fit(
    model: nn.Module,
    loss_fn,
    train: tuple[Tensor, Tensor],
    *,
    recipe: Recipe,
    runtime: Runtime,
    heldout: tuple[Tensor, Tensor] | None,
    checkpoint_dir,
    log_path,
    resume: bool,
    description: str,
    procedure: Procedure | None,
    reserve: tuple[Tensor, Tensor] | None = None,
) -> FitResult:
    """`fit` on checked inputs (`train` may hold soft labels): the one loop, which calls the defense's hooks
    (`ccl._hooks`) and knows no defense."""
    identity = recipe.to_dict() if procedure is None else recipe.to_dict() | {"procedure": procedure.identity}
    procedure = procedure or Procedure()
    hooks, last = procedure.hooks(), procedure.last_epoch(recipe)
    num_classes = _num_classes(model, train[0])
    setup = TrainingSetup(
        model, loss_fn, train, reserve, heldout, recipe, runtime, checkpoint_dir, resume, description, num_classes
    )
    setup = hooks.prepare(setup)
    device = resolve_device(runtime.device)
    setup, members = _on_device(setup, device, recipe=recipe, runtime=runtime)
    model, loss_fn, (x, y), heldout = setup.model, setup.loss, setup.train, setup.heldout
    model, forward = hooks.wrap(model, setup)
    model = model.to(device)
    forward = forward or (torch.compile(model) if runtime.compile else model)
    loss_fn = hooks.wrap_loss(loss_fn, forward=forward, model=model, setup=setup)

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if log_path is None and checkpoint_dir is not None:
        log_path = Path(checkpoint_dir) / "log.jsonl"
    if checkpoint_dir is not None:
        remove_stale_temporaries(checkpoint_dir)
    start, optimizer_state, history = _resume(ckpt_path if resume else None, identity, model, hooks, device)

    def on_epoch_end(epoch: int, optimizer: torch.optim.Optimizer, stats: dict[str, Tensor]) -> bool:
        record = {
            "epoch": epoch + 1,
            "lr": lr_at(epoch, recipe),
            "train_loss": float(stats["loss"][0]),
            "train_acc": float(stats["acc"][0]),
            "seconds": time.perf_counter() - clock[0],
        }
        stop = hooks.end_epoch(epoch, model, record, setup)
        if (epoch + 1) % runtime.eval_every == 0 or epoch + 1 == last or stop:
            record.update(_member_stats(model, members, heldout, recipe.batch_size))
        history.append(record)
        if clock_ckpt.due(final=epoch + 1 >= last or stop):  # the log with it: both say how far training got
            if ckpt_path is not None:
                _save_checkpoint(ckpt_path, model, optimizer, epoch + 1, history, identity, hooks)
            if log_path is not None:
                write_text(log_path, "".join(json.dumps(r) + "\n" for r in history))
        clock[0] = time.perf_counter()
        return stop

    clock, clock_ckpt = [time.perf_counter()], CheckpointClock()
    with torch_threads(runtime.threads), warnings.catch_warnings():  # a defense's hooks may silence warnings
        every = torch.arange(x.shape[0], device=device)[None]  # (1, N): the one model trains on every record
        train_models(
            OneModel(model, forward), loss_fn, x, y, every,
            recipe=recipe, seeds=[recipe.seed], device=device, start_epoch=last if hooks.stopped else start,
            optimizer_state=optimizer_state, on_epoch_end=on_epoch_end, names=["the model"],
            progress=runtime.progress, description=setup.description, checkpoint=ckpt_path, stop_after=last,
            hooks=hooks,
        )  # fmt: skip
    hooks.release(model)
    model.eval()
    spent = hooks.privacy_spent(last)
    return FitResult(model, history, start, epsilon=None if spent is None else spent.epsilon, dp_accounting=spent)
