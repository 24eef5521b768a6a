"""Which torch device a run uses: one rule for training, the audit and the label-only attacks' queries."""

from __future__ import annotations

import torch

from ._checks import expected
from .errors import InvalidArgumentError

__all__ = ["resolve_device"]


def resolve_device(name: str | torch.device) -> torch.device:
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidArgumentError(
            expected("device", "auto, cpu, cuda, cuda:N or another torch device", name)
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidArgumentError(expected("device", "an available device (no CUDA device is present)", name))
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise InvalidArgumentError(expected("device", f"a CUDA index below {torch.cuda.device_count()}", name))
    if device.type not in ("cpu", "cuda", "mps"):
        raise InvalidArgumentError(expected("device", "auto, cpu, cuda or cuda:N", name))
    return device
