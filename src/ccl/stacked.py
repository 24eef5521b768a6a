"""Training several models of one recipe together, stacked with `torch.func` (the reference-model fast path).

K models with the same architecture and the same number of training records run in lockstep: their parameters
and BatchNorm buffers are stacked along a new leading axis, one `vmap`-ed forward computes all K outputs, and
one backward gives each model exactly the gradient of its own loss (the losses are summed; the models share no
parameters). Plain `torch.optim` optimizers are element-wise, so each slice of the stacked state evolves as
that model's own optimizer would. Each model draws its batches and augmentations from its own generator, seeded
as `ccl.training.fit` seeds it, so a stacked model equals the one `fit` trains, up to floating-point
reassociation in the batched matrix products (tested).

Whether stacking pays depends on the machine: on a GPU it fills the device with small models; on a CPU, where
one small model already keeps the cores busy, it may not. `use_stacked` measures both paths on a few steps
and picks the faster one ("auto"), unless told "on" or "off".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from ._io import atomic_path, remove_stale_temporaries
from .training import (
    TrainConfig,
    TrainingError,
    augment_batch,
    autocast_dtype,
    epoch_generator,
    lr_at,
    make_optimizer,
    resolve_device,
)

if TYPE_CHECKING:
    from .config import ExperimentConfig
    from .data import Dataset

__all__ = ["MAX_STACK", "StackedModels", "fit_stacked", "measure_speedup", "predict_stacked", "use_stacked"]

MAX_STACK = 16
_CHOICES: dict[tuple, bool] = {}  # calibration results of this process


class StackedModels:
    """K models of one architecture as stacked tensors, with a `vmap`-ed forward."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.params, self.buffers = stack_module_state(modules)  # each (K, ...); params require grad
        self.base = copy.deepcopy(modules[0]).to("meta")
        self.k = len(modules)

    def to(self, device: torch.device) -> StackedModels:
        self.params = {n: p.detach().to(device).requires_grad_() for n, p in self.params.items()}
        self.buffers = {n: b.to(device) for n, b in self.buffers.items()}
        return self

    def _call(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(self.base, (params, buffers), (x,))

    def forward(self, x: Tensor, *, shared_input: bool = False) -> Tensor:
        """`x (K, B, ...)` (or `(B, ...)` with `shared_input`) to logits `(K, B, C)`."""
        in_dims = (0, 0, None if shared_input else 0)
        return vmap(self._call, in_dims=in_dims, randomness="different")(self.params, self.buffers, x)

    def train(self, mode: bool = True) -> StackedModels:
        self.base.train(mode)
        return self

    def state_dict(self, k: int) -> dict[str, Tensor]:
        return {n: t[k].detach().cpu().clone() for n, t in {**self.params, **self.buffers}.items()}


def fit_stacked(
    modules: list[torch.nn.Module],
    loss_fn,
    x: Tensor,
    y: Tensor,
    members: list[np.ndarray],
    *,
    configs: list[TrainConfig],
    checkpoint: str | None = None,
) -> StackedModels:
    """Trains `modules[k]` on `(x[members[k]], y[members[k]])` with `configs[k]` (identical but for the seed),
    all together. Equal member counts are required (the membership splits guarantee them)."""
    sizes = {len(m) for m in members}
    if len(sizes) != 1:
        raise ValueError(f"Stacked training needs models with equal numbers of records; got sizes {sorted(sizes)}.")
    base_cfg = dataclasses.replace(configs[0], seed=0)
    if any(dataclasses.replace(c, seed=0) != base_cfg for c in configs):
        raise ValueError("Stacked training needs one recipe for all models (only the seeds may differ).")
    cfg = configs[0]
    device = resolve_device(cfg.device)
    amp_dtype = autocast_dtype(cfg, device)
    stack = StackedModels(modules).to(device)
    optimizer = make_optimizer(stack.params.values(), cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    x, y = x.to(device), y.to(device)
    member_idx = torch.as_tensor(np.stack(members), dtype=torch.long, device=device)  # (K, m)
    m = member_idx.shape[1]
    start = 0
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        remove_stale_temporaries(ckpt.parent)
        if ckpt.exists():
            state = torch.load(ckpt, map_location=device, weights_only=True)
            for n in stack.params:
                stack.params[n].data.copy_(state["params"][n])
            for n in stack.buffers:
                stack.buffers[n].copy_(state["buffers"][n])
            optimizer.load_state_dict(state["optimizer"])
            start = int(state["epoch"])
    for epoch in range(start, cfg.epochs):
        lr = lr_at(epoch, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if hasattr(loss_fn, "set_epoch"):
            loss_fn.set_epoch(epoch)
        gens = [epoch_generator(c.seed, epoch, device) for c in configs]
        orders = torch.stack([torch.randperm(m, generator=g, device=device) for g in gens])  # (K, m)
        if m % cfg.batch_size == 1 and m > 1:
            orders = orders[:, :-1]  # as fit: a batch of one record is skipped
        stack.train()
        for batch, i in enumerate(range(0, orders.shape[1], cfg.batch_size)):
            idx = member_idx.gather(1, orders[:, i : i + cfg.batch_size])  # (K, b) dataset indices
            xb, yb = x[idx], y[idx]  # (K, b, ...), (K, b)
            if cfg.augment:
                xb = torch.stack([augment_batch(xb[k], gens[k]) for k in range(stack.k)])
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = stack.forward(xb)  # (K, b, C)
                try:
                    losses = torch.stack([loss_fn(out[k], yb[k]) for k in range(stack.k)])  # (K,)
                except ValueError:  # ccl's losses refuse non-finite logits: a model has diverged
                    if bool(torch.isfinite(out).all()):
                        raise
                    losses = torch.isfinite(out).flatten(1).all(1).float().log()  # -inf marks the diverged models
            if not bool(torch.isfinite(losses).all()):
                bad = int((~torch.isfinite(losses)).nonzero()[0])
                raise TrainingError(
                    f"The loss of stacked model {bad} became non-finite at epoch {epoch} (0-based), "
                    f"batch {batch}; lower the learning rate or check the data."
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(losses.sum()).backward()
            scaler.step(optimizer)
            scaler.update()
        if checkpoint is not None:
            state = {
                "params": {n: p.detach() for n, p in stack.params.items()},
                "buffers": stack.buffers,
                "optimizer": optimizer.state_dict(),
                "epoch": epoch + 1,
            }
            with atomic_path(checkpoint) as tmp:
                torch.save(state, tmp)
    stack.train(False)
    return stack


@torch.no_grad()
def predict_stacked(
    stack: StackedModels, x: Tensor, *, batch_size: int = 1024, flip_queries: bool = False, device: torch.device
) -> np.ndarray:
    """Logits `(K, N, C)` (or `(K, N, 2, C)` with flips) of all stacked models, in eval mode."""
    stack.train(False)
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size].to(device)
        views = [xb, xb.flip(3)] if flip_queries else [xb]
        outs.append(torch.stack([stack.forward(v, shared_input=True).float() for v in views], 2).cpu())
    logits = torch.cat(outs, 1).numpy()
    return logits if flip_queries else logits[:, :, 0]


def _time_steps(step, *, min_seconds: float = 0.2, min_repeats: int = 3) -> float:
    """Seconds per call of `step`, after one warm-up call, over at least `min_seconds`."""
    step()
    t0 = time.perf_counter()
    n = 0
    while n < min_repeats or time.perf_counter() - t0 < min_seconds:
        step()
        n += 1
    return (time.perf_counter() - t0) / n


def measure_speedup(config: ExperimentConfig, dataset: Dataset, k: int) -> float:
    """Seconds per training step of k models one after another, divided by k models stacked (> 1: stacking
    is faster). Measured on a few real steps of the configured recipe."""
    cfg = config.train
    device = resolve_device(cfg.device)
    b = min(cfg.batch_size, len(dataset))
    xb = dataset.x[:b].to(device)
    yb = dataset.y[:b].to(device)
    loss_fn = config.defenses[0].build()
    singles = [config.build_model(dataset, seed=s).to(device) for s in range(k)]
    opts = [make_optimizer(mod.parameters(), cfg) for mod in singles]

    def sequential():
        for mod, opt in zip(singles, opts, strict=True):
            opt.zero_grad()
            loss_fn(mod(xb), yb).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    stack = StackedModels([config.build_model(dataset, seed=s) for s in range(k)]).to(device).train()
    sopt = make_optimizer(stack.params.values(), cfg)
    xs, ys = xb.expand(k, *xb.shape), yb.expand(k, *yb.shape)

    def stacked():
        sopt.zero_grad()
        out = stack.forward(xs)
        torch.stack([loss_fn(out[i], ys[i]) for i in range(k)]).sum().backward()
        sopt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return _time_steps(sequential) / _time_steps(stacked)


def use_stacked(config: ExperimentConfig, dataset: Dataset, num_models: int) -> bool:
    """Whether to train `num_models` reference models stacked: config "on"/"off", or "auto" (measured)."""
    if num_models < 2 or config.stacked == "off":
        return False
    if config.stacked == "on":
        return True
    k = min(num_models, MAX_STACK)
    key = (
        config.model,
        json.dumps(config.model_options, sort_keys=True),
        dataset.input_shape,
        dataset.num_classes,
        config.train.batch_size,
        config.train.device,
        k,
    )
    if key not in _CHOICES:
        _CHOICES[key] = measure_speedup(config, dataset, k) > 1.1
    return _CHOICES[key]
