"""Losses: the Convex-Concave Loss family and the baseline defenses, as functions and `nn.Module`s.

Example:
    >>> import ccl
    >>> loss_fn = ccl.losses.create("ccel", alpha=0.5)
    >>> ccl.losses.available()
    ['ccel', 'ccql', 'ce', 'confidence_penalty', 'focal', 'label_smoothing', 'relaxloss']
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .._registry import Registry
from . import functional
from .modules import (
    ConfidencePenaltyLoss,
    ConvexConcaveLoss,
    CrossEntropyLoss,
    FocalLoss,
    LabelSmoothingLoss,
    RelaxLoss,
)

__all__ = [
    "describe",
    "ConfidencePenaltyLoss",
    "ConvexConcaveLoss",
    "CrossEntropyLoss",
    "FocalLoss",
    "LabelSmoothingLoss",
    "RelaxLoss",
    "available",
    "create",
    "functional",
    "parameters",
]

_REGISTRY: Registry[nn.Module] = Registry("loss")
_REGISTRY.register("ce", CrossEntropyLoss, doc="cross-entropy, the undefended baseline")
_REGISTRY.register("focal", FocalLoss, defaults={"gamma": 2.0}, doc="focal loss (gamma=2)")
_REGISTRY.register(
    "ccel", ConvexConcaveLoss, defaults={"concave": "exp"}, doc="Convex-Concave Loss with -exp(p_y) (alpha=0.5)"
)
_REGISTRY.register(
    "ccql",
    ConvexConcaveLoss,
    defaults={"concave": "quadratic"},
    doc="Convex-Concave Loss with -p_y - p_y^2/2 (alpha=0.5)",
)
_REGISTRY.register("label_smoothing", LabelSmoothingLoss, doc="label smoothing (smoothing=0.1)")
_REGISTRY.register("confidence_penalty", ConfidencePenaltyLoss, doc="CE - beta * entropy (beta=0.1)")
_REGISTRY.register("relaxloss", RelaxLoss, doc="RelaxLoss (alpha=1.0; set_epoch each epoch)")


def create(name: str, **params: Any) -> nn.Module:
    """Builds a registered loss by name, e.g. `create("ccel", alpha=0.8)`.

    Raises:
        ValueError: for an unknown name (the message lists the valid ones) or an unknown parameter.
    """
    return _REGISTRY.create(name, **params)


def available() -> list[str]:
    """The names `create` accepts."""
    return _REGISTRY.available()


def parameters(name: str) -> list[str]:
    """The parameter names a registered loss accepts."""
    return _REGISTRY.parameters(name)


def describe(name: str) -> tuple[str, dict]:
    """(one-line description, {parameter: default}) of a registered name."""
    return _REGISTRY.describe(name)
