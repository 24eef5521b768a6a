"""`nn.Module` wrappers over `ccl.losses.functional`: drop-in replacements for `nn.CrossEntropyLoss`.

Options are validated once, when the loss is built; the call validates the batch.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .._checks import check_choice, check_in_range, check_positive_int
from . import functional as F

__all__ = [
    "ConfidencePenaltyLoss",
    "ConvexConcaveLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "LabelSmoothingLoss",
    "RelaxLoss",
]


class _Loss(nn.Module):
    def __init__(self, *, reduction: str) -> None:
        super().__init__()
        self.reduction = check_choice("reduction", reduction, F.REDUCTIONS)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items())

    def per_sample(self, logits: Tensor, target: Tensor) -> Tensor:
        """`(N,)` per-sample losses, whatever `reduction` says: with `reduction="mean"` the loss of a batch is
        their mean, so the stacked trainer scores K models' batches in one call."""
        saved = self.reduction
        self.reduction = "none"
        try:
            return self.forward(logits, target)
        finally:
            self.reduction = saved

    def _options(self) -> dict:
        return {"reduction": self.reduction}


class CrossEntropyLoss(_Loss):
    """Cross-entropy, validated and computed in float32 (the undefended baseline)."""

    def __init__(self, *, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(logits, target, reduction=self.reduction)


class FocalLoss(_Loss):
    """Focal loss `(1 - p_y)**gamma * (-log p_y)`; `gamma=0` is cross-entropy."""

    def __init__(self, *, gamma: float, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        self.gamma = check_in_range("gamma", gamma, low=0.0)

    def _options(self) -> dict:
        return {"gamma": self.gamma, **super()._options()}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.focal_loss(logits, target, gamma=self.gamma, reduction=self.reduction)


class ConvexConcaveLoss(_Loss):
    """Convex-Concave Loss `beta * (alpha * convex + (1 - alpha) * concave(p_y))` (Liu et al., ICML 2024).

    See `ccl.losses.functional.convex_concave_loss` for the arguments. A callable `concave` is checked
    (decreasing and concave on [0, 1]) here, once.

    Example:
        >>> loss_fn = ConvexConcaveLoss(alpha=0.5, concave="exp")  # CCEL
        >>> loss = loss_fn(model(x), y)  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        alpha: float = 0.5,
        concave: str | Callable[[Tensor], Tensor] = "exp",
        convex: str = "ce",
        gamma: float = 2.0,
        beta: float = 1.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        self.alpha = check_in_range("alpha", alpha, low=0.0, high=1.0)
        self.beta = check_in_range("beta", beta, low=0.0, low_inclusive=False)
        self.convex = check_choice("convex", convex, F.CONVEX_TERMS)
        self.gamma = check_in_range("gamma", gamma, low=0.0)
        self.concave = concave
        self._concave_fn = F.resolve_concave(concave)

    def _options(self) -> dict:
        opts = {"alpha": self.alpha, "concave": self.concave, "convex": self.convex, "beta": self.beta}
        if self.convex == "focal":
            opts["gamma"] = self.gamma
        return {**opts, **super()._options()}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        F._validate(logits, target, self.reduction)
        return F._convex_concave(
            logits, target, self.alpha, self._concave_fn, self.convex, self.gamma, self.beta, self.reduction
        )


class LabelSmoothingLoss(_Loss):
    """Cross-entropy with label smoothing `smoothing` (0.1 is the usual baseline)."""

    def __init__(self, *, smoothing: float = 0.1, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        self.smoothing = check_in_range("smoothing", smoothing, low=0.0, high=1.0)

    def _options(self) -> dict:
        return {"smoothing": self.smoothing, **super()._options()}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.label_smoothing_loss(logits, target, smoothing=self.smoothing, reduction=self.reduction)


class ConfidencePenaltyLoss(_Loss):
    """`CE - beta * H(p)` (Pereyra et al., 2017); 0.1 is the usual baseline."""

    def __init__(self, *, beta: float = 0.1, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        self.beta = check_in_range("beta", beta, low=0.0)

    def _options(self) -> dict:
        return {"beta": self.beta, **super()._options()}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.confidence_penalty_loss(logits, target, beta=self.beta, reduction=self.reduction)


class RelaxLoss(_Loss):
    """RelaxLoss (Chen, Yu, Fritz, ICLR 2022); see `ccl.losses.functional.relax_loss`.

    Its step type depends on the epoch. The training loop tells it with `set_epoch(epoch)` at the start of
    every epoch (`ccl.training.fit` does this for any loss that has `set_epoch`, the same convention as
    `DistributedSampler.set_epoch`). Until then the epoch is 0.

    Example:
        >>> loss_fn = RelaxLoss(alpha=0.8, upper=0.3)
        >>> for epoch in range(epochs):  # doctest: +SKIP
        ...     loss_fn.set_epoch(epoch)
        ...     for x, y in loader:
        ...         loss_fn(model(x), y).backward()
    """

    def __init__(
        self, *, alpha: float = 1.0, upper: float = 1.0, variant: str = "tabular", reduction: str = "mean"
    ) -> None:
        super().__init__(reduction=check_choice("reduction", reduction, ("mean",)))
        self.alpha = check_in_range("alpha", alpha, low=0.0, low_inclusive=False)
        self.upper = check_in_range("upper", upper, low=0.0, high=1.0, low_inclusive=False)
        self.variant = check_choice("variant", variant, F.RELAX_VARIANTS)
        self.epoch = 0

    #: RelaxLoss acts on the batch's mean loss (gradient ascent below alpha): it has no per-sample form.
    per_sample = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_positive_int("epoch", epoch, minimum=0)

    def _options(self) -> dict:
        return {"alpha": self.alpha, "upper": self.upper, "variant": self.variant, "epoch": self.epoch}

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return F.relax_loss(logits, target, alpha=self.alpha, epoch=self.epoch, upper=self.upper, variant=self.variant)
