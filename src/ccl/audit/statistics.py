"""Per-model statistics measured where the weights exist: each model's distance to the decision boundary and its
loss-gradient norm on every pool record (the `label_only_boundary` and `gradient` attacks, `ccl.attacks.statistic`).

They cannot be recomputed from stored logits, so they are measured once, right after a model is trained (or a
supplied checkpoint is loaded), and stored with its outputs in the model cache (`boundary_distance`,
`gradient_norm`, each `(P,)`, and `boundary_queries`, the query budget of the distances). Only an audit that names
one of these attacks in `--attacks` measures them: they cost more than a forward pass (see README), and a cached
model that lacks a statistic the audit needs (or measured it with another query budget) is trained again rather
than mixed with models measured otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping

import numpy as np
import torch
from torch.func import functional_call

from ..attacks import create as create_attack
from ..attacks.boundary import boundary_distances
from ..attacks.gradient import gradient_norms

__all__ = [
    "BOUNDARY_SEED",
    "STATISTIC_ATTACKS",
    "ModelAccess",
    "StackedAccess",
    "missing_statistics",
    "model_statistics",
    "needed_statistics",
]

#: attack name -> the statistic it reads
STATISTIC_ATTACKS = {"label_only_boundary": "boundary_distance", "gradient": "gradient_norm"}
#: the random directions of the boundary search (every model of every audit searches the same ones)
BOUNDARY_SEED = 0xB0D


def needed_statistics(attacks: Collection[str] | None) -> tuple[str, ...]:
    """The statistics the named attacks read (none by default: `attacks=None` runs what the setup supports)."""
    return tuple(sorted({STATISTIC_ATTACKS[a] for a in attacks or () if a in STATISTIC_ATTACKS}))


def _boundary_queries() -> int:
    return create_attack("label_only_boundary").queries


def missing_statistics(stored: Mapping[str, np.ndarray], needs: Collection[str]) -> list[str]:
    """The statistics of `needs` that the stored arrays lack (or measured with another query budget)."""
    missing = [s for s in needs if s not in stored]
    if "boundary_distance" in needs and "boundary_distance" not in missing:
        if "boundary_queries" not in stored or int(np.asarray(stored["boundary_queries"])) != _boundary_queries():
            missing.append("boundary_distance")
    return missing


def model_statistics(
    needs: Collection[str],
    *,
    num_models: int,
    predict_each: Callable[[torch.Tensor], torch.Tensor],
    functional: Callable[[int], tuple[Callable, dict, dict]],
    x: torch.Tensor,
    y: torch.Tensor,
) -> dict[str, np.ndarray]:
    """`{statistic: (K, P)}` for K models on the pool records `x (P, ...)` with labels `y (P,)`.

    Args:
        needs: the statistics to measure ("boundary_distance", "gradient_norm").
        num_models: K.
        predict_each: `(K, B, ...)` points, one batch per model -> `(K, B)` predicted labels.
        functional: model k -> `(call, params, buffers)` for `ccl.attacks.gradient.gradient_norms`.
    """
    out: dict[str, np.ndarray] = {}
    x = x.float().cpu()
    if "boundary_distance" in needs:
        queries = _boundary_queries()
        out["boundary_distance"] = boundary_distances(
            predict_each, x, y.numpy(), queries=queries, num_models=num_models, seed=BOUNDARY_SEED
        )
        out["boundary_queries"] = np.full(num_models, queries, dtype=np.int64)
    if "gradient_norm" in needs:
        out["gradient_norm"] = np.stack([gradient_norms(*functional(k), x, y) for k in range(num_models)])
    return out


class ModelAccess:
    """What the audit asks of one trained model (in eval mode, on `device`): its logits on a shared batch, its
    labels on one batch per model (`K = 1`), and its functional form for per-example gradients."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model, self.device, self.num_models = model.eval().to(device), device, 1

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (1, B, C)
        return self.model(x.to(self.device))[None]

    def predict_each(self, x: torch.Tensor) -> torch.Tensor:  # (1, B, ...) -> (1, B)
        return self.model(x[0].to(self.device)).argmax(-1)[None]

    def functional(self, k: int):
        def call(params, buffers, x):
            return functional_call(self.model, (params, buffers), (x,))

        return call, dict(self.model.named_parameters()), dict(self.model.named_buffers())


class StackedAccess:
    """`ModelAccess` for K stacked models (`ccl.stacked.StackedModels`)."""

    def __init__(self, stack, device: torch.device) -> None:
        self.stack, self.device, self.num_models = stack.train(False), device, stack.k

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:  # (B, ...) -> (K, B, C)
        return self.stack.forward(x.to(self.device), shared_input=True)

    def predict_each(self, x: torch.Tensor) -> torch.Tensor:  # (K, B, ...) -> (K, B)
        return self.stack.forward(x.to(self.device)).argmax(-1)

    def functional(self, k: int):
        params = {n: p[k] for n, p in self.stack.params.items()}
        return self.stack._call, params, {n: b[k] for n, b in self.stack.buffers.items()}
