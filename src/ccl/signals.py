"""Per-sample membership signals from a model's logits and the true labels.

All signals are computed in float64 from `log_softmax`, stably: `scaled_logit` and `modified_entropy` use
`log(1 - p_k)` from a masked `logsumexp` wherever `p_k` may round to 1.

Inputs are logits `(..., C)` and labels broadcastable to `(...)` (numpy arrays or torch tensors); outputs are
numpy float64 arrays of shape `(...)`. A leading model axis or a trailing augmentation axis is fine:
`logits (K, N, A, C)` with `labels (N, 1)` broadcasts.

References:
    Yeom et al. 2018 (loss); Song & Mittal, USENIX Security 2021 (confidence, entropy, modified entropy);
    Carlini et al., S&P 2022 (the scaled logit used by LiRA).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._checks import expected
from .errors import InvalidArgumentError, InvalidArgumentTypeError

__all__ = ["confidence", "entropy", "loss", "modified_entropy", "scaled_logit", "scaled_logit_float64", "SIGNALS"]


def _tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    arr = np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InvalidArgumentTypeError(expected(name, "a numeric array", arr.dtype))
    return torch.as_tensor(arr)


def _inputs(logits: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    z = _tensor("logits", logits)
    y = _tensor("labels", labels)
    if z.ndim < 2:
        raise InvalidArgumentError(expected("logits", "an array of shape (..., C)", f"shape {tuple(z.shape)}"))
    if not (z.is_floating_point()):
        raise InvalidArgumentTypeError(expected("logits", "floating-point values", z.dtype))
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InvalidArgumentTypeError(expected("labels", "integer class indices", y.dtype))
    z = z.to(torch.float64).cpu()
    y = y.to(torch.int64).cpu()
    try:
        batch_shape = torch.broadcast_shapes(z.shape[:-1], y.shape)
    except RuntimeError:
        raise InvalidArgumentError(
            expected("labels", f"a shape broadcastable to the logits' {tuple(z.shape[:-1])}", tuple(y.shape))
        ) from None
    if batch_shape != z.shape[:-1]:
        raise InvalidArgumentError(
            expected("labels", f"a shape broadcastable to {tuple(z.shape[:-1])}", tuple(y.shape))
        )
    c = z.shape[-1]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        raise InvalidArgumentError(
            expected("labels", f"class indices in [0, {c})", f"values in [{int(y.min())}, {int(y.max())}]")
        )
    if not bool(torch.isfinite(z).all()):
        raise InvalidArgumentError(expected("logits", "finite values", "an array containing NaN or inf"))
    return z, y.expand(z.shape[:-1])


def _log_p_y_and_rest(z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lse = torch.logsumexp(z, -1)
    z_y = z.gather(-1, y[..., None]).squeeze(-1)
    rest = torch.logsumexp(z.scatter(-1, y[..., None], -torch.inf), -1)
    return z_y - lse, rest - lse


def loss(logits: Any, labels: Any) -> np.ndarray:
    """Cross-entropy `-log p_y`."""
    z, y = _inputs(logits, labels)
    return (-_log_p_y_and_rest(z, y)[0]).numpy()


def confidence(logits: Any, labels: Any) -> np.ndarray:
    """`p_y`, the probability of the true class."""
    z, y = _inputs(logits, labels)
    return _log_p_y_and_rest(z, y)[0].exp().numpy()


def entropy(logits: Any, labels: Any | None = None) -> np.ndarray:
    """Prediction entropy `H(p) = -sum_k p_k log p_k` (the label is not used)."""
    z, _ = _inputs(logits, torch.zeros(1, dtype=torch.int64) if labels is None else labels)
    log_p = z.log_softmax(-1)
    return (-(log_p.exp() * log_p).sum(-1)).numpy()


def _log_one_minus_p(z: torch.Tensor) -> torch.Tensor:
    """`log(1 - p_k)` for every class: `log1p(-p)` where `p_k <= 1/2`, a masked logsumexp for the top class."""
    log_p = z.log_softmax(-1)
    out = torch.log(-torch.expm1(log_p))  # exact enough where p_k is not close to 1
    top = z.argmax(-1, keepdim=True)
    rest = torch.logsumexp(z.scatter(-1, top, -torch.inf), -1, keepdim=True) - torch.logsumexp(z, -1, keepdim=True)
    return out.scatter(-1, top, rest)


def modified_entropy(logits: Any, labels: Any) -> np.ndarray:
    """Song & Mittal's `Mentr = -(1 - p_y) log p_y - sum_{k != y} p_k log(1 - p_k)`; low for members."""
    z, y = _inputs(logits, labels)
    log_p = z.log_softmax(-1)
    log_1mp = _log_one_minus_p(z)
    log_p_y = log_p.gather(-1, y[..., None]).squeeze(-1)
    log_1mp_y = log_1mp.gather(-1, y[..., None]).squeeze(-1)
    others = -(log_p.exp() * log_1mp).scatter(-1, y[..., None], 0.0).sum(-1)
    return (-log_1mp_y.exp() * log_p_y + others).numpy()


def scaled_logit(logits: Any, labels: Any) -> np.ndarray:
    """LiRA's `phi = log p_y - log(1 - p_y)`, from logits without forming `p_y`."""
    z, y = _inputs(logits, labels)
    log_p_y, log_rest = _log_p_y_and_rest(z, y)
    return (log_p_y - log_rest).numpy()


def scaled_logit_float64(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`scaled_logit` of float64 numpy logits `(..., C)` that are already validated (finite, labels in range),
    as `z_y - logsumexp_{k != y} z_k`: one temporary of the logits' size and no thread pool, for callers that
    go through large arrays a chunk at a time (LiRA). Equal to `scaled_logit` to float rounding.

    Example:
        >>> scaled_logit_float64(np.array([[2.0, 0.0, 0.0]]), np.array([0]))  # log(p / (1 - p)), p = e^2 / (e^2 + 2)
        array([1.30685282])
    """
    y = np.broadcast_to(labels, logits.shape[:-1])[..., None]  # (..., 1)
    z_y = np.take_along_axis(logits, y, -1)[..., 0]  # (...)
    rest = logits.copy()  # (..., C)
    np.put_along_axis(rest, y, -np.inf, -1)
    top = rest.max(-1)  # (...) the largest other logit, so that exp() below is at most 1
    np.subtract(rest, top[..., None], out=rest)
    np.exp(rest, out=rest)
    return z_y - top - np.log(rest.sum(-1))


SIGNALS = {
    "loss": loss,
    "confidence": confidence,
    "entropy": entropy,
    "modified_entropy": modified_entropy,
    "scaled_logit": scaled_logit,
}
