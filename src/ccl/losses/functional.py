"""Pure-function losses: logits `(N, C)` and integer targets `(N,)`, like `torch.nn.functional.cross_entropy`.

All probabilities come from `log_softmax` computed in float32 (also under fp16/bf16 autocast), and every term
is written in log space so that logits up to |1e4| give finite losses and gradients.

References:
    Liu, Feng, Zhuang, Cao, Wei. "Mitigating Privacy Risk in Membership Inference by Convex-Concave Loss",
    ICML 2024 (arXiv 2402.05453).
    Lin et al. "Focal Loss for Dense Object Detection", ICCV 2017.
    Pereyra et al. "Regularizing Neural Networks by Penalizing Confident Output Distributions", 2017.
    Chen, Yu, Fritz. "RelaxLoss: Defending Membership Inference Attacks without Losing Utility", ICLR 2022.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import (
    check_choice,
    check_finite_result,
    check_in_range,
    check_logits_targets,
    check_positive_int,
    expected,
)

REDUCTIONS = ("none", "mean", "sum")
CONCAVE_TERMS = ("exp", "quadratic")
CONVEX_TERMS = ("ce", "focal")
RELAX_VARIANTS = ("tabular", "cifar")

__all__ = [
    "confidence_penalty_loss",
    "concave_exp",
    "concave_quadratic",
    "convex_concave_loss",
    "cross_entropy",
    "focal_loss",
    "label_smoothing_loss",
    "relax_loss",
    "resolve_concave",
]


# --------------------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------------------
_TINY = torch.finfo(torch.float32).tiny


def _ce(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample `-log p_y` `(N,)` in float32 from PyTorch's fused log_softmax + nll (one pass each way)."""
    return F.cross_entropy(logits.float(), target, reduction="none")


def _focal(ce: Tensor, gamma: float) -> Tensor:
    """`(1 - p_y)**gamma * ce` from the per-sample CE. `1 - p_y = -expm1(-ce)` is accurate for small CE; the clamp
    keeps the gradient finite where `1 - p_y` rounds to 0 and `gamma < 1` (the loss and its gradient are ~0
    there)."""
    if gamma == 0:
        return ce
    return (-torch.expm1(-ce)).clamp_min(_TINY) ** gamma * ce


class _LossOfLogits(torch.autograd.Function):
    """A per-sample loss `l(log p_y)` of the logits `(N, C)`, forward and backward in one autograd node, with the
    slope `dl/dlog p_y` given in closed form by `value_and_slope`.

    Forward: one `log_softmax` over `(N, C)`, a gather, and the `(N, 1)` value and slope. Backward:
    `dl/dlogits = dl/dlog p_y * (onehot - softmax)`, through the kernel PyTorch's own cross-entropy backward uses
    (`_log_softmax_backward_data` of a one-hot gradient), so the `(N, C)` work is that of `F.cross_entropy`,
    and the reduction's factor is folded into the slope. First derivatives only.

    Speed (benchmarks/ccl_loss.py, benchmarks/RESULTS.md): on a CPU this one node measured the same as the
    three-node form it replaced (`F.cross_entropy(reduction="none")` and a closed-form node on `(N,)`) and as
    plain autograd of the formula, 1.18-1.25x `F.cross_entropy` at (4096, 100). What is left is not `(N, C)`
    work but a fixed cost per call: about twenty dispatches of small `(N,)` operations, the Python node and
    the input checks, 2-5 us each.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, value_and_slope, reduction: str):  # (N, C), (N, 1)
        log_p = torch.log_softmax(logits, dim=1)  # (N, C)
        log_p_y = log_p.gather(1, index)  # (N, 1)
        n = log_p_y.shape[0]
        value, slope = value_and_slope(log_p_y, 1.0 / max(n, 1) if reduction == "mean" else 1.0)  # (N, 1) each
        ctx.save_for_backward(log_p, index, slope)
        if reduction == "none":
            return value.view(n)
        return value.mean() if reduction == "mean" else value.sum()

    @staticmethod
    def backward(ctx, grad: Tensor):  # grad: () or (N,)
        log_p, index, slope = ctx.saved_tensors
        upstream = slope * (grad if grad.ndim == 0 else grad[:, None])  # (N, 1): dloss/dlog p_y
        grad_log_p = torch.zeros_like(log_p).scatter_(1, index, upstream)  # (N, C), one-hot rows
        return torch._log_softmax_backward_data(grad_log_p, log_p, 1, log_p.dtype), None, None, None


def _apply(logits: Tensor, target: Tensor, value_and_slope, reduction: str) -> Tensor:
    """The loss, reduced, through the fused node in float32; non-finite results are traced back to the logits.

    `value_and_slope(log_p_y, scale)` maps `log p_y (N, 1)` to the per-sample loss `(N, 1)` and `scale` times its
    derivative in `log p_y` (`scale` is `1/N` for the mean: the reduction's factor, folded into the slope)."""
    out = _LossOfLogits.apply(logits.float(), target.long()[:, None], value_and_slope, reduction)
    check_finite_result(out, logits)
    return out


def _focal_value_and_slope(ce: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """`q**gamma * ce` and its derivative in `ce`, `q**gamma * (gamma * p * ce / q + 1)`, with
    `q = 1 - p = -expm1(-ce)` (accurate for small CE). Where `q` rounds to 0 both are ~0; the clamp keeps them
    finite for `gamma < 1`."""
    if gamma == 0:
        return ce, torch.ones_like(ce)
    minus_q = torch.expm1(-ce)
    p = minus_q + 1
    q = minus_q.neg_().clamp_min_(_TINY)
    q_gamma = q.pow(gamma)
    slope = torch.div(ce, q).mul_(p).mul_(gamma).add_(1).mul_(q_gamma)
    return q_gamma.mul_(ce), slope


def _focal_of_log_p(log_p_y: Tensor, scale: float, gamma: float) -> tuple[Tensor, Tensor]:
    """Focal loss and `scale` times its derivative in `log p_y` (minus the derivative in `ce = -log p_y`)."""
    value, slope = _focal_value_and_slope(log_p_y.neg(), gamma)
    return value, slope.mul_(-scale)


def _ccl_value_and_slope(
    log_p_y: Tensor, scale: float, alpha: float, concave: str, convex: str, gamma: float, beta: float
) -> tuple[Tensor, Tensor]:
    """CCL `beta * (alpha * conv + (1 - alpha) * f(p))` and `scale` times its derivative in `log p_y`, where
    `p = exp(log p_y)` and `dp/dlog p_y = p`: for "exp", `f = -e^p`, `f' = -e^p`; for "quadratic",
    `f = -p - p^2/2`, `f' = -(1 + p)`; `d ce/dlog p_y = -1`. Written with few element-wise passes: on a CPU each
    pass over `(N,)` costs several microseconds whatever its arithmetic, about what the `(N, C)` kernels cost."""
    p = log_p_y.exp()
    if concave == "exp":
        minus_f = p.exp()  # -f(p) = e^p
        minus_f_slope = p.mul_(minus_f)  # -f'(p) p
    else:
        minus_f = torch.addcmul(p, p, p, value=0.5)
        minus_f_slope = p.addcmul_(p, p)  # p + p^2 (reads p before writing it: element-wise)
    if convex == "ce":  # -(alpha * log p_y + (1 - alpha) * -f) = alpha * ce + (1 - alpha) * f
        value = torch.lerp(minus_f, log_p_y, alpha).mul_(-beta)
        slope = minus_f_slope.mul_(-beta * (1 - alpha) * scale).sub_(beta * alpha * scale)
        return value, slope
    conv_value, conv_slope = _focal_value_and_slope(log_p_y.neg(), gamma)  # slope in ce
    value = torch.add(minus_f.mul_(alpha - 1), conv_value, alpha=alpha).mul_(beta)
    slope = minus_f_slope.mul_(1 - alpha).add_(conv_slope, alpha=alpha).mul_(-beta * scale)
    return value, slope


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _finish(loss: Tensor, logits: Tensor, reduction: str) -> Tensor:
    out = _reduce(loss, reduction)
    check_finite_result(out, logits)
    return out


def _validate(logits: Tensor, target: Tensor, reduction: str) -> None:
    check_choice("reduction", reduction, REDUCTIONS)
    check_logits_targets(logits, target)


# --------------------------------------------------------------------------------------------------------------
# Convex losses
# --------------------------------------------------------------------------------------------------------------
def cross_entropy(logits: Tensor, target: Tensor, *, reduction: str = "mean") -> Tensor:
    """Cross-entropy `-log p_y`, validated and computed in float32.

    Example:
        >>> cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
        tensor(0.1269)
    """
    _validate(logits, target, reduction)
    loss = F.cross_entropy(logits.float(), target, reduction=reduction)  # PyTorch's fused kernel, as it is
    check_finite_result(loss, logits)
    return loss


def focal_loss(logits: Tensor, target: Tensor, *, gamma: float, reduction: str = "mean") -> Tensor:
    """Focal loss `(1 - p_y)**gamma * (-log p_y)` (Lin et al., 2017). `gamma=0` is cross-entropy."""
    gamma = check_in_range("gamma", gamma, low=0.0)
    _validate(logits, target, reduction)
    return _apply(logits, target, lambda log_p_y, scale: _focal_of_log_p(log_p_y, scale, gamma), reduction)


# --------------------------------------------------------------------------------------------------------------
# Concave terms
# --------------------------------------------------------------------------------------------------------------
def concave_exp(p: Tensor) -> Tensor:
    """CCEL's concave term `-exp(p)`: decreasing and concave on [0, 1]."""
    return -torch.exp(p)


def concave_quadratic(p: Tensor) -> Tensor:
    """CCQL's concave term `-p - p**2 / 2`: decreasing and concave on [0, 1]."""
    return -p - 0.5 * p * p


_CONCAVE = {"exp": concave_exp, "quadratic": concave_quadratic}


def resolve_concave(concave: str | Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """Returns the concave term for a name, or checks a user callable `f(p)`.

    A callable must be decreasing and concave on [0, 1]; it is checked on a grid of 201 points in float64
    (strictly negative first differences, second differences <= a small tolerance).

    Raises:
        ValueError: for an unknown name, or a callable that is not decreasing and concave on [0, 1].
    """
    if isinstance(concave, str):
        if concave not in _CONCAVE:
            raise ValueError(expected("concave", f"one of {CONCAVE_TERMS} or a callable f(p)", concave))
        return _CONCAVE[concave]
    if not callable(concave):
        raise TypeError(expected("concave", f"one of {CONCAVE_TERMS} or a callable f(p)", concave))
    grid = torch.linspace(0.0, 1.0, 201, dtype=torch.float64)
    try:
        values = concave(grid)
    except Exception as err:  # the user's callable failed: say so, with the reason
        raise ValueError(f"The `concave` callable failed on a tensor of probabilities in [0, 1]: {err}") from err
    if not isinstance(values, Tensor) or values.shape != grid.shape:
        raise ValueError(expected("concave", "a callable returning a tensor of the same shape as its input", concave))
    values = values.double()
    if not bool(torch.isfinite(values).all()):
        raise ValueError(expected("concave", "a callable finite on [0, 1]", concave))
    first = values.diff()
    second = first.diff()
    scale = values.abs().max().clamp_min(1.0)
    if not bool((first < 0).all()):
        p = grid[1:][first >= 0][0].item()
        raise ValueError(
            expected(
                "concave",
                "a callable that is strictly decreasing on [0, 1]",
                f"{concave!r}, which does not decrease near p={p:.3f}",
            )
        )
    if not bool((second <= 1e-9 * scale).all()):
        p = grid[1:-1][second > 1e-9 * scale][0].item()
        raise ValueError(
            expected("concave", "a callable that is concave on [0, 1]", f"{concave!r}, which is convex near p={p:.3f}")
        )
    return concave


# --------------------------------------------------------------------------------------------------------------
# Convex-Concave Loss
# --------------------------------------------------------------------------------------------------------------
def convex_concave_loss(
    logits: Tensor,
    target: Tensor,
    *,
    alpha: float = 0.5,
    concave: str | Callable[[Tensor], Tensor] = "exp",
    convex: str = "ce",
    gamma: float = 2.0,
    beta: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Convex-Concave Loss `beta * (alpha * convex + (1 - alpha) * concave(p_y))` (Liu et al., ICML 2024).

    Args:
        logits: `(N, C)` unnormalised scores.
        target: `(N,)` integer class indices in [0, C).
        alpha: weight of the convex term in [0, 1]; `alpha=1` is the convex loss alone.
        concave: "exp" (CCEL, `-exp(p_y)`), "quadratic" (CCQL, `-p_y - p_y**2/2`), or a callable `f(p)`
            decreasing and concave on [0, 1].
        convex: "ce" or "focal" (uses `gamma`).
        gamma: focusing parameter of the focal convex term; ignored for "ce".
        beta: overall scale. For SGD, scaling the loss by beta is the same as multiplying the learning rate by
            beta and dividing the weight decay by beta: comparisons against CE are fair only at beta=1.
        reduction: "none" | "mean" | "sum".

    Returns:
        `(N,)` for reduction "none", else a scalar.

    Example:
        >>> logits, target = torch.tensor([[2.0, 0.0]]), torch.tensor([0])
        >>> convex_concave_loss(logits, target, alpha=1.0)  # equals cross-entropy
        tensor(0.1269)
    """
    alpha = check_in_range("alpha", alpha, low=0.0, high=1.0)
    beta = check_in_range("beta", beta, low=0.0, low_inclusive=False)
    check_choice("convex", convex, CONVEX_TERMS)
    gamma = check_in_range("gamma", gamma, low=0.0)
    f = resolve_concave(concave)
    _validate(logits, target, reduction)
    return _convex_concave(logits, target, alpha, f, convex, gamma, beta, reduction)


def _convex_concave(
    logits: Tensor,
    target: Tensor,
    alpha: float,
    f: Callable[[Tensor], Tensor],
    convex: str,
    gamma: float,
    beta: float,
    reduction: str,
) -> Tensor:
    """Per-sample CCL on validated input; `f` is an already checked concave term. The built-in terms take the
    fused path; a user's callable goes through autograd."""
    builtin = next((name for name, term in _CONCAVE.items() if f is term), None)
    if builtin is not None:
        return _apply(
            logits,
            target,
            lambda log_p_y, scale: _ccl_value_and_slope(log_p_y, scale, alpha, builtin, convex, gamma, beta),
            reduction,
        )
    ce = _ce(logits, target)  # (N,)
    convex_term = ce if convex == "ce" else _focal(ce, gamma)
    return _finish(beta * (alpha * convex_term + (1.0 - alpha) * f(torch.exp(-ce))), logits, reduction)


# --------------------------------------------------------------------------------------------------------------
# Regularised baselines
# --------------------------------------------------------------------------------------------------------------
def label_smoothing_loss(logits: Tensor, target: Tensor, *, smoothing: float = 0.1, reduction: str = "mean") -> Tensor:
    """Cross-entropy against `(1 - smoothing) * onehot + smoothing / C` (the definition of PyTorch's option)."""
    smoothing = check_in_range("smoothing", smoothing, low=0.0, high=1.0)
    _validate(logits, target, reduction)
    loss = F.cross_entropy(logits.float(), target, reduction="none", label_smoothing=smoothing)
    return _finish(loss, logits, reduction)


def confidence_penalty_loss(logits: Tensor, target: Tensor, *, beta: float = 0.1, reduction: str = "mean") -> Tensor:
    """`CE - beta * H(p)` (Pereyra et al., 2017): penalises confident, low-entropy predictions."""
    beta = check_in_range("beta", beta, low=0.0)
    _validate(logits, target, reduction)
    log_p = logits.float().log_softmax(dim=1)  # (N, C)
    nll = -log_p.gather(1, target[:, None]).squeeze(1)
    entropy = -(log_p.exp() * log_p).sum(dim=1)
    return _finish(nll - beta * entropy, logits, reduction)


def relax_loss(
    logits: Tensor,
    target: Tensor,
    *,
    alpha: float,
    epoch: int,
    upper: float = 1.0,
    variant: str = "tabular",
    reduction: str = "mean",
) -> Tensor:
    """RelaxLoss (Chen, Yu, Fritz, ICLR 2022) for one batch at a given epoch.

    With `L` the batch's mean cross-entropy:

    - even epochs: `|L - alpha|`, i.e. gradient ascent on CE when `L < alpha`;
    - odd epochs: `L` while `L > alpha`; otherwise posterior flattening, a cross-entropy against soft targets
      that keep the true class at `min(p_y, upper)` and spread the rest uniformly over the other classes
      (the soft targets are constants: no gradient flows through them).

    `variant` selects how posterior flattening is applied, as the two public codebases differ:
    "tabular" (Purchase/Texas code) uses the soft-target CE on every sample; "cifar" (CIFAR code) uses it only on
    misclassified samples and subtracts the hard-label CE of all samples.

    RelaxLoss is a batch-level objective, so only `reduction="mean"` is defined.

    Args:
        alpha: target loss level (> 0), e.g. 0.8 for Purchase, 1.0 for CIFAR-10 ResNet-20.
        epoch: the current epoch (0-based); its parity chooses the step type.
        upper: cap on the true-class soft target, in (0, 1].
    """
    alpha = check_in_range("alpha", alpha, low=0.0, low_inclusive=False)
    upper = check_in_range("upper", upper, low=0.0, high=1.0, low_inclusive=False)
    epoch = check_positive_int("epoch", epoch, minimum=0)
    check_choice("variant", variant, RELAX_VARIANTS)
    check_choice("reduction", reduction, ("mean",))
    check_logits_targets(logits, target)
    ce = _ce(logits, target)  # (N,)
    batch_loss = ce.mean()
    check_finite_result(batch_loss, logits)
    if epoch % 2 == 0:
        return (batch_loss - alpha).abs()
    if batch_loss.item() > alpha:
        return batch_loss
    log_p = logits.float().log_softmax(dim=1)  # (N, C)
    num_classes = logits.shape[1]
    with torch.no_grad():
        p_y = log_p.gather(1, target[:, None]).exp().clamp(max=upper)  # (N, 1)
        soft = ((1.0 - p_y) / (num_classes - 1)).expand(-1, num_classes).clone()
        soft.scatter_(1, target[:, None], p_y)  # (N, C), rows sum to 1
    soft_ce = -(soft * log_p).sum(dim=1)  # (N,)
    if variant == "tabular":
        return soft_ce.mean()
    misclassified = (logits.argmax(dim=1) != target).float()
    return (misclassified * soft_ce - ce).mean()
