"""The training engine: one readable `fit` for any classifier and any loss of `ccl.losses`.

What it guarantees:
- Deterministic: the shuffling and augmentation of epoch `e` come from a generator seeded with
  `(seed, e)`, so the same seed gives bit-identical weights on CPU, also across an interruption and resume.
- Resumable: a checkpoint (model, optimizer, epoch, history) is written atomically after every epoch and
  loaded with `weights_only=True`; `fit` continues from it. A non-finite loss stops training with an error that
  names the epoch and batch, and the last good checkpoint stays.
- Observable: a JSONL log with one line per epoch: train loss and accuracy, held-out accuracy, and the mean and
  variance of the cross-entropy on members (the training set) and non-members (held-out), the CCL paper's key
  quantity.
- Fast where it can be: data stays on the device; augmentation (random crop with 4-pixel padding, horizontal
  flip) runs on whole batches, only while training; on CUDA, bf16 autocast and channels_last by default.

Example:
    >>> data = ccl.data.load("digits")
    >>> model = ccl.models.create("mlp", num_classes=10, input_shape=data.input_shape, hidden=(256,), seed=0)
    >>> result = ccl.training.fit(model, ccl.losses.create("ccel"), (data.x, data.y),
    ...                           config=ccl.training.TrainConfig(epochs=20, lr=0.05))
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_choice, check_in_range, check_positive_int, expected
from ._io import atomic_path, remove_stale_temporaries, write_text

__all__ = [
    "FitResult",
    "TrainConfig",
    "TrainingError",
    "augment_batch",
    "autocast_dtype",
    "epoch_generator",
    "fit",
    "load_checkpoint",
    "lr_at",
    "make_optimizer",
    "predict_logits",
    "resolve_device",
]

CHECKPOINT = "checkpoint.pt"


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the epoch and batch."""


@dataclass
class TrainConfig:
    """The training recipe. Every field is part of what determines the trained model."""

    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" | "adam" | "adamw"
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "constant" | "multistep" | "cosine" (per epoch)
    milestones: tuple[float, ...] = (0.5, 0.75)  # multistep: fractions of `epochs` where lr *= lr_decay
    lr_decay: float = 0.1
    augment: bool = False  # random crop + flip on image batches, training only
    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "fp32" | "bf16" | "fp16"
    channels_last: bool | None = None  # None: on for image models on CUDA
    compile: bool = False  # torch.compile the model (CUDA; off by default)
    eval_every: int = 1  # epochs between member/non-member loss statistics in the log
    progress: bool = True

    def __post_init__(self) -> None:
        check_positive_int("epochs", self.epochs)
        check_positive_int("batch_size", self.batch_size)
        check_choice("optimizer", self.optimizer, ("sgd", "adam", "adamw"))
        check_in_range("lr", self.lr, low=0.0, low_inclusive=False)
        check_in_range("momentum", self.momentum, low=0.0, high=1.0, high_inclusive=False)
        check_in_range("weight_decay", self.weight_decay, low=0.0)
        check_choice("schedule", self.schedule, ("constant", "multistep", "cosine"))
        self.milestones = tuple(float(m) for m in self.milestones)
        for m in self.milestones:
            check_in_range("milestones", m, low=0.0, high=1.0)
        check_in_range("lr_decay", self.lr_decay, low=0.0, high=1.0, low_inclusive=False)
        check_choice("precision", self.precision, ("auto", "fp32", "bf16", "fp16"))
        check_positive_int("eval_every", self.eval_every)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise TypeError(expected("seed", "an integer", self.seed))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float]]
    resumed_from_epoch: int  # 0 when training started from scratch


# ----------------------------------------------------------------------------------------------------------
# Small named helpers
# ----------------------------------------------------------------------------------------------------------
def lr_at(epoch: int, config: TrainConfig) -> float:
    """The learning rate of `epoch` (0-based) under the configured schedule."""
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "multistep":
        passed = sum(epoch >= round(m * config.epochs) for m in config.milestones)
        return config.lr * config.lr_decay**passed
    return 0.5 * config.lr * (1 + math.cos(math.pi * epoch / config.epochs))


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]))
    return g


def augment_batch(x: Tensor, generator: torch.Generator, *, padding: int = 4) -> Tensor:
    """Random crop with zero padding and random horizontal flip of a batch `(B, C, H, W)`, on its device."""
    b, _, h, w = x.shape
    padded = F.pad(x, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), generator=generator, device=x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch_idx = torch.arange(b, device=x.device)[:, None, None, None]
    chan_idx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch_idx, chan_idx, rows, cols]
    flip = torch.rand(b, generator=generator, device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(3), out)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(expected("device", "an available device (no CUDA device is present)", name))
    return device


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def make_optimizer(params: Iterable[Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _check_data(name: str, data: Any) -> tuple[Tensor, Tensor]:
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise TypeError(expected(name, "a pair (x, y) of tensors", type(data).__name__))
    x, y = (torch.as_tensor(v) for v in data)
    if x.shape[0] == 0:
        raise ValueError(expected(name, "a non-empty split", "0 records"))
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(expected(f"{name} labels", f"shape ({x.shape[0]},) matching x", tuple(y.shape)))
    if y.is_floating_point() or y.dtype == torch.bool:
        raise TypeError(expected(f"{name} labels", "integer class indices", y.dtype))
    return x.float(), y.long()


def _num_classes(model: nn.Module, x: Tensor) -> int:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:2])
    except RuntimeError as err:
        raise ValueError(
            f"The model cannot take inputs of shape {tuple(x.shape[1:])} (per record): {str(err).splitlines()[0]}"
        ) from None
    finally:
        model.train(was_training)
    if out.ndim != 2:
        raise ValueError(f"The model must return logits (N, C); it returned shape {tuple(out.shape)}.")
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
    device = resolve_device(device) if isinstance(device, str) else device
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
def _loss_stats(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> dict[str, float]:
    model.eval()
    losses, correct = [], 0
    for i in range(0, x.shape[0], batch_size):
        out = model(x[i : i + batch_size]).float()
        losses.append(F.cross_entropy(out, y[i : i + batch_size], reduction="none"))
        correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
    ce = torch.cat(losses).double()
    return {"loss_mean": ce.mean().item(), "loss_var": ce.var(unbiased=False).item(), "acc": correct / x.shape[0]}


def _train_epoch(
    forward,
    model: nn.Module,
    loss_fn,
    optimizer: torch.optim.Optimizer,
    scaler,
    x: Tensor,
    y: Tensor,
    epoch: int,
    *,
    config: TrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> tuple[float, float, int]:
    """One pass over `(x, y)` in the epoch's seeded order. Returns the mean loss, the accuracy, and the first batch
    whose loss was not finite (-1: none). Sums stay on the device, so a GPU syncs once per epoch, not per batch."""
    n = x.shape[0]
    gen = epoch_generator(config.seed, epoch, device)
    torch.manual_seed(int(np.random.SeedSequence([config.seed, epoch, 1]).generate_state(1)[0]))  # dropout etc.
    order = torch.randperm(n, generator=gen, device=device)
    if n % config.batch_size == 1 and n > 1:
        order = order[:-1]  # a batch of one record breaks BatchNorm; it is skipped this epoch (a random one)
    model.train()
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    bad_batch = torch.full((), -1, dtype=torch.long, device=device)
    for batch, i in enumerate(range(0, order.numel(), config.batch_size)):
        idx = order[i : i + config.batch_size]
        xb, yb = x[idx], y[idx]
        if config.augment:
            xb = augment_batch(xb, gen)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = forward(xb)  # (B, C)
            try:
                loss = loss_fn(out, yb)
            except ValueError:  # ccl's losses refuse non-finite logits: training has diverged
                if bool(torch.isfinite(out).all()):
                    raise
                loss = None
        # On a CPU checking now is free: stop before a bad step. On a GPU the check waits for the epoch's end.
        if loss is None or (device.type == "cpu" and not math.isfinite(loss.item())):
            return math.nan, math.nan, int(bad_batch) if int(bad_batch) >= 0 else batch
        bad_batch = torch.where((bad_batch < 0) & ~torch.isfinite(loss), batch, bad_batch)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total_loss += loss.detach().float() * idx.numel()
        correct += (out.argmax(1) == yb).sum()
    seen = order.numel()
    return total_loss.item() / seen, correct.item() / seen, int(bad_batch)


def _member_stats(
    model: nn.Module, members: tuple[Tensor, Tensor], heldout: tuple[Tensor, Tensor] | None, batch_size: int
) -> dict[str, float]:
    """Mean and variance of the CE on members and non-members, and their accuracies (the log's key columns)."""
    stats = _loss_stats(model, *members, 4 * batch_size)
    out = {"member_loss_mean": stats["loss_mean"], "member_loss_var": stats["loss_var"], "member_acc": stats["acc"]}
    if heldout is not None:
        stats = _loss_stats(model, *heldout, 4 * batch_size)
        out.update(
            {
                "nonmember_loss_mean": stats["loss_mean"],
                "nonmember_loss_var": stats["loss_var"],
                "heldout_acc": stats["acc"],
            }
        )
    return out


def _save_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, history: list[dict], config: TrainConfig
) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "history": json.dumps(history),
        "config": json.dumps(config.to_dict()),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads a checkpoint written by `fit` (with `weights_only=True`: no code runs from the file)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"Cannot load the checkpoint {path}: it is corrupt, truncated or not a ccl checkpoint "
            f"({type(err).__name__}). Delete it to start over."
        ) from err
    state["history"] = json.loads(state["history"])
    state["config"] = json.loads(state["config"])
    return state


# ----------------------------------------------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------------------------------------------
def fit(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    train: tuple[Tensor, Tensor],
    *,
    config: TrainConfig | None = None,
    heldout: tuple[Tensor, Tensor] | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
    resume: bool = True,
    description: str = "train",
) -> FitResult:
    """Trains `model` in place with `loss_fn` on `train = (x, y)`.

    Args:
        model: any classifier returning logits `(N, C)`.
        loss_fn: a loss of `ccl.losses` (or any `f(logits, target) -> scalar`); `set_epoch(epoch)` is called
            at the start of each epoch when it has one (RelaxLoss).
        train: `(x (N, ...), y (N,))`, the members.
        config: the recipe; `TrainConfig()` by default.
        heldout: `(x, y)` never trained on, for held-out accuracy and the non-member loss statistics.
        checkpoint_dir: where `checkpoint.pt` is written after every epoch; with `resume=True` an existing one
            is continued from.
        log_path: the JSONL log (default: `checkpoint_dir/log.jsonl` when `checkpoint_dir` is given).

    Raises:
        ValueError / TypeError: bad data (empty split, labels outside [0, C), shapes the model cannot take).
        TrainingError: a non-finite loss; the message names the epoch and batch.
    """
    config = config or TrainConfig()
    x, y = _check_data("train", train)
    num_classes = _num_classes(model, x)
    for name, labels in (("train", y), ("heldout", None if heldout is None else torch.as_tensor(heldout[1]))):
        if labels is not None and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
            raise ValueError(
                expected(
                    f"{name} labels",
                    f"class indices in [0, {num_classes}) (the model's outputs)",
                    f"labels in [{int(labels.min())}, {int(labels.max())}]",
                )
            )
    if heldout is not None:
        hx, hy = _check_data("heldout", heldout)
        if hx.shape[1:] != x.shape[1:]:
            raise ValueError(expected("heldout", f"records of shape {tuple(x.shape[1:])} like train", hx.shape[1:]))

    device = resolve_device(config.device)
    amp_dtype = autocast_dtype(config, device)
    images = x.ndim == 4
    if config.augment and not images:
        raise ValueError(expected("augment", "False for non-image data (x of shape (N, C, H, W) needed)", True))
    channels_last = config.channels_last if config.channels_last is not None else (images and device.type == "cuda")
    memory_format = torch.channels_last if channels_last and images else torch.contiguous_format
    model.to(device=device, memory_format=memory_format)
    x, y = x.to(device).contiguous(memory_format=memory_format), y.to(device)
    if heldout is not None:
        hx, hy = hx.to(device).contiguous(memory_format=memory_format), hy.to(device)
    optimizer = make_optimizer(model.parameters(), config)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    forward = torch.compile(model) if config.compile else model

    ckpt_path = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
    if log_path is None and checkpoint_dir is not None:
        log_path = Path(checkpoint_dir) / "log.jsonl"
    history: list[dict] = []
    start = 0
    if checkpoint_dir is not None:
        remove_stale_temporaries(checkpoint_dir)
    if ckpt_path is not None and resume and ckpt_path.exists():
        state = load_checkpoint(ckpt_path)
        if state["config"] != json.loads(json.dumps(config.to_dict())):
            raise ValueError(
                f"The checkpoint {ckpt_path} was written with another recipe; use another directory or resume=False."
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, history = int(state["epoch"]), state["history"]

    bar = None
    if config.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.epochs, initial=start, desc=description, unit="epoch", leave=False)
    for epoch in range(start, config.epochs):
        t0 = time.perf_counter()
        lr = lr_at(epoch, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(epoch)
        train_loss, train_acc, bad_batch = _train_epoch(
            forward, model, loss_fn, optimizer, scaler, x, y, epoch, config=config, device=device, amp_dtype=amp_dtype
        )
        if bad_batch >= 0:
            raise TrainingError(
                f"The loss became non-finite at epoch {epoch} (0-based), batch {bad_batch}. The last good "
                f"checkpoint is {ckpt_path if ckpt_path and ckpt_path.exists() else 'none'}; lower the learning "
                "rate or check the data."
            )
        record = {
            "epoch": epoch + 1,
            "lr": lr,
            "train_loss": train_loss,
            "train_acc": train_acc,
            "seconds": time.perf_counter() - t0,
        }
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            record.update(_member_stats(model, (x, y), None if heldout is None else (hx, hy), config.batch_size))
        history.append(record)
        if ckpt_path is not None:
            _save_checkpoint(ckpt_path, model, optimizer, epoch + 1, history, config)
        if log_path is not None:
            write_text(log_path, "".join(json.dumps(r) + "\n" for r in history))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", acc=f"{train_acc:.3f}")
    if bar is not None:
        bar.close()
    model.eval()
    return FitResult(model, history, start)
