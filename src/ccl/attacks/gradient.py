"""Per-example gradient norms: the white-box signal of Nasr, Shokri and Houmansadr (S&P 2019).

Training drives the loss gradient of each training record toward zero, so with the weights in hand the norm of
the gradient of a record's loss with respect to every weight, `||grad_w CE(f_w(x), y)||_2`, is smaller for members
than for non-members (Nasr et al. found it the most informative white-box feature). Recent audits scale it, as LiRA
scales confidences, before fitting Gaussians per record: the attack (`ccl.attacks.statistic`) uses its logarithm.

The norms are computed with `torch.func`: `vmap` over `grad` of one record's loss, `batch_size` records at a
time, so the memory is that of `batch_size` copies of the weights' gradient. The model is evaluated in eval mode
(BatchNorm with its running statistics, no dropout): the gradient of the model that answers queries.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .._checks import check_positive_int

__all__ = ["BATCH_SIZE", "gradient_norms", "gradient_norms_of", "gradient_norms_slow"]

#: records per vmap-ed batch (memory: this many copies of the weights' gradient)
BATCH_SIZE = 128


def gradient_norms(
    call: Callable[[dict[str, Tensor], dict[str, Tensor], Tensor], Tensor],
    params: dict[str, Tensor],
    buffers: dict[str, Tensor],
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = BATCH_SIZE,
) -> np.ndarray:
    """`(N,)` float64: the L2 norm over every parameter of the gradient of each record's cross-entropy.

    Args:
        call: `(params, buffers, x (B, ...)) -> logits (B, C)`, a functional model (`torch.func.functional_call`).
        params: the weights the gradient is taken with respect to (on the device `x` is moved to).
        buffers: the model's buffers (BatchNorm statistics).
        x: `(N, ...)` records; `y`: `(N,)` labels.
        batch_size: records per vmap-ed step.
    """
    batch_size = check_positive_int("batch_size", batch_size)
    device = next(iter(params.values())).device
    params = {n: p.detach() for n, p in params.items()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = call(p, buffers, xi[None])
        return nn.functional.cross_entropy(logits, yi[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device)
        yb = y[start : start + batch_size].to(device).long()
        grads = per_example(params, xb, yb)  # name -> (B, *shape)
        # squares summed in the gradients' own precision per tensor (a float64 copy of every per-example gradient
        # doubled the memory traffic), then added up in float64
        sq = sum(torch.linalg.vector_norm(g.flatten(1), dim=1).double().square() for g in grads.values())
        out.append(sq.sqrt().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


def gradient_norms_of(model: nn.Module, x: Tensor, y: Tensor, *, batch_size: int = BATCH_SIZE) -> np.ndarray:
    """`gradient_norms` of an `nn.Module` (in eval mode, restored afterwards), on the device of its weights."""
    was_training = model.training
    model.eval()
    try:
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())

        def call(p: dict[str, Tensor], b: dict[str, Tensor], xb: Tensor) -> Tensor:
            return functional_call(model, (p, b), (xb,))

        return gradient_norms(call, params, buffers, x, y, batch_size=batch_size)
    finally:
        model.train(was_training)


def gradient_norms_slow(model: nn.Module, x: Tensor, y: Tensor) -> np.ndarray:
    """The same norms from one `backward` per record: the obviously-correct reference for tests."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for xi, yi in zip(x, y, strict=True):
            model.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(xi[None]), yi[None].long()).backward()
            out.append(sum(float(p.grad.double().square().sum()) for p in model.parameters() if p.grad is not None))
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return np.sqrt(np.asarray(out, dtype=np.float64))
