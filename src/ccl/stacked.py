"""Training several models of one recipe together, stacked with `torch.func` (the reference-model fast path).

K models with the same architecture and the same number of training records run in lockstep: their parameters
and BatchNorm buffers are stacked along a new leading axis, one `vmap`-ed forward computes all K outputs, and
one backward gives each model exactly the gradient of its own loss (the losses are summed; the models share no
parameters). Plain `torch.optim` optimizers are element-wise, so each slice of the stacked state evolves as
that model's own optimizer would. The epoch loop is `ccl.training.train_models`, the one `fit` runs: each model
draws its batches and augmentations from its own generator, seeded as `fit` seeds it, so a stacked model equals
the one `fit` trains up to floating-point reassociation in the batched matrix products (tested).

Whether to stack is the caller's choice, made from the recipe (see `ccl.audit.plan.stacking`), never from a
timing: the two paths differ in the last bits, so the choice is part of what determines a model.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from ._checks import expected
from ._io import atomic_path, remove_stale_temporaries
from .errors import InvalidArgumentError, RunDirectoryError
from .training import CheckpointClock, Recipe, Runtime, load_checkpoint, resolve_device, torch_threads, train_models

__all__ = ["MAX_STACK", "StackedModels", "fit_stacked", "predict_stacked"]

MAX_STACK = 16


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

    def parameters(self) -> list[Tensor]:
        return list(self.params.values())

    def train(self, mode: bool = True) -> StackedModels:
        self.base.train(mode)
        return self

    def weights_finite(self) -> Tensor:
        norms = torch.stack([p.detach().float().square().flatten(1).sum(1) for p in self.params.values()])
        return torch.isfinite(norms.sum(0))

    def state_dict(self, k: int) -> dict[str, Tensor]:
        return {n: t[k].detach().cpu().clone() for n, t in {**self.params, **self.buffers}.items()}


def _check_stack(modules: list, x: Tensor, members: list[np.ndarray], *, recipe: Recipe, seeds: list[int]) -> None:
    """`fit_stacked`'s inputs: one seed and one member array of one common size per module."""
    sizes = {len(m) for m in members}
    if len(sizes) != 1:
        raise InvalidArgumentError(
            expected("members", "index arrays of equal size (stacked training)", f"sizes {sorted(sizes)}")
        )
    if len(seeds) != len(modules) or len(members) != len(modules):
        raise InvalidArgumentError(
            expected("seeds", f"one seed and one member array per module ({len(modules)})", f"{len(seeds)} seeds")
        )
    if recipe.augment and x.ndim != 4:
        raise InvalidArgumentError(expected("augment", "False for non-image data (x of shape (N, C, H, W))", True))


def fit_stacked(
    modules: list[torch.nn.Module],
    loss_fn,
    x: Tensor,
    y: Tensor,
    members: list[np.ndarray],
    *,
    recipe: Recipe,
    seeds: list[int],
    runtime: Runtime | None = None,
    checkpoint: str | os.PathLike | None = None,
    stop_after: int | None = None,
) -> StackedModels:
    """Trains `modules[k]` on `(x[members[k]], y[members[k]])` with `recipe` and batch seed `seeds[k]`, all
    together. Equal member counts are required (the membership splits guarantee them). With `checkpoint`, the
    stacked state is saved every `CHECKPOINT_EVERY_S` seconds (`ccl.training`) and after the last epoch, and an
    existing one (same recipe and seeds) is continued."""
    runtime = runtime or Runtime()
    _check_stack(modules, x, members, recipe=recipe, seeds=seeds)
    device = resolve_device(runtime.device)
    stack = StackedModels(modules).to(device)
    x, y = x.to(device), y.to(device)
    member_idx = torch.as_tensor(np.stack(members), dtype=torch.long, device=device)  # (K, m)
    start, optimizer_state = 0, None
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        remove_stale_temporaries(os.path.dirname(checkpoint) or ".")
        if os.path.exists(checkpoint):
            state = load_checkpoint(checkpoint, map_location=device)
            if state["recipe"] != recipe.to_dict() or list(state.get("seeds", [])) != list(seeds):
                raise RunDirectoryError(f"The stacked checkpoint {checkpoint} was written for other models; delete it.")
            for n in stack.params:
                stack.params[n].data.copy_(state["params"][n])
            for n in stack.buffers:
                stack.buffers[n].copy_(state["buffers"][n])
            optimizer_state, start = state["optimizer"], int(state["epoch"])

    clock = CheckpointClock()
    last = stop_after if stop_after is not None else recipe.epochs

    def on_epoch_end(epoch: int, optimizer: torch.optim.Optimizer, stats: dict[str, Tensor]) -> None:
        if checkpoint is None or not clock.due(final=epoch + 1 >= last):
            return
        state = {
            "params": {n: p.detach() for n, p in stack.params.items()},
            "buffers": stack.buffers,
            "optimizer": optimizer.state_dict(),
            "epoch": epoch + 1,
            "recipe": json.dumps(recipe.to_dict()),
            "seeds": list(seeds),
        }
        with atomic_path(checkpoint) as tmp:
            torch.save(state, tmp)

    with torch_threads(runtime.threads):
        train_models(
            stack,
            loss_fn,
            x,
            y,
            member_idx,
            recipe=recipe,
            seeds=list(seeds),
            device=device,
            start_epoch=start,
            optimizer_state=optimizer_state,
            on_epoch_end=on_epoch_end,
            names=[f"stacked model {k}" for k in range(stack.k)],
            checkpoint=checkpoint,
            stop_after=stop_after,
        )
    stack.train(False)
    return stack


@torch.no_grad()
def predict_stacked(
    stack: StackedModels, x: Tensor, *, batch_size: int = 1024, flip_queries: bool = False, device: torch.device
) -> np.ndarray:
    """Logits `(K, N, C)` (or `(K, N, 2, C)` with flips) of all stacked models, in eval mode."""
    if flip_queries and x.ndim != 4:
        raise InvalidArgumentError(
            expected(
                "flip_queries",
                "False for non-image data (x of shape (N, C, H, W))",
                f"True, for x of shape {tuple(x.shape)}",
            )
        )
    stack.train(False)
    outs = []
    for i in range(0, x.shape[0], batch_size):
        xb = x[i : i + batch_size].to(device)
        views = [xb, xb.flip(3)] if flip_queries else [xb]
        outs.append(torch.stack([stack.forward(v, shared_input=True).float() for v in views], 2).cpu())
    logits = torch.cat(outs, 1).numpy()
    return logits if flip_queries else logits[:, :, 0]
