"""What every defense module shares: the `Defense` record its factory returns and the check of its `loss=`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .. import losses
from .._checks import expected
from .._hooks import Procedure
from ..errors import InvalidArgumentError

__all__ = ["Defense", "per_sample_loss"]


@dataclass(frozen=True)
class Defense:
    """A defense: the loss the model trains with, and what it does beyond the loss."""

    loss: nn.Module
    procedure: Procedure


def per_sample_loss(defense: str, loss: str) -> nn.Module:
    """The loss named `loss` for a defense that needs a per-sample one (every loss but RelaxLoss)."""
    if loss not in losses.available() or loss == "relaxloss":
        valid = [n for n in losses.available() if n != "relaxloss"]
        raise InvalidArgumentError(expected("loss", f"a per-sample loss of {defense}: one of {', '.join(valid)}", loss))
    return losses.create(loss)
