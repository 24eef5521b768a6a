"""Validation helpers shared by the public API.

Every message follows one template: "Expected argument `name` to be <what>, but got <value>." so that a user
sees which argument was wrong, what it held and what was expected, before any computation starts.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from .errors import InvalidArgumentError, InvalidArgumentTypeError


def expected(name: str, what: str, got: Any) -> str:
    """Formats the one error message template used across ccl."""
    return f"Expected argument `{name}` to be {what}, but got {got!r}."


def unknown_name(kind: str, name: Any, valid: Iterable[str]) -> str:
    """Message for a registry miss: lists the valid names and suggests the closest one."""
    valid = sorted(valid)
    plural = kind + ("es" if kind.endswith("s") else "s")
    msg = f"Unknown {kind} {name!r}. Valid {plural}: {', '.join(valid)}."
    close = difflib.get_close_matches(str(name), valid, n=1)
    if close:
        msg += f" Did you mean {close[0]!r}?"
    return msg


def check_in_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Checks that `value` is a finite real number within the given bounds and returns it as float."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InvalidArgumentTypeError(expected(name, "a real number", value))
    value = float(value)
    lo = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
    hi = "inf)" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
    what = "a finite number" if low is None and high is None else f"a finite number in {lo}, {hi}"
    bad = not math.isfinite(value)
    if low is not None:
        bad |= value < low if low_inclusive else value <= low
    if high is not None:
        bad |= value > high if high_inclusive else value >= high
    if bad:
        raise InvalidArgumentError(expected(name, what.strip(), value))
    return value


def check_positive_int(name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidArgumentTypeError(expected(name, f"an integer >= {minimum}", value))
    if value < minimum:
        raise InvalidArgumentError(expected(name, f"an integer >= {minimum}", value))
    return int(value)


def check_choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise InvalidArgumentError(expected(name, "one of " + ", ".join(repr(c) for c in choices), value))
    return value


def check_logits_targets(logits: Any, target: Any) -> None:
    """Validates a classification batch before any computation: logits `(N, C)` floating, targets `(N,)` integer
    in [0, C). Costs one pass over the N targets; finiteness of the logits is checked on the result instead
    (`check_finite_result`), which is N times cheaper than a pass over the logits."""
    if not isinstance(logits, torch.Tensor):
        raise InvalidArgumentTypeError(expected("logits", "a torch.Tensor of shape (N, C)", type(logits).__name__))
    if not isinstance(target, torch.Tensor):
        raise InvalidArgumentTypeError(expected("target", "a torch.Tensor of shape (N,)", type(target).__name__))
    if logits.ndim != 2:
        raise InvalidArgumentError(expected("logits", "a 2-D tensor of shape (N, C)", f"shape {tuple(logits.shape)}"))
    if not logits.is_floating_point():
        raise InvalidArgumentTypeError(expected("logits", "a floating-point tensor", logits.dtype))
    if logits.shape[1] < 2:
        raise InvalidArgumentError(
            expected("logits", "a tensor with at least 2 classes (C >= 2)", f"C={logits.shape[1]}")
        )
    if target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise InvalidArgumentError(
            expected("target", f"a 1-D tensor of shape ({logits.shape[0]},) matching logits", tuple(target.shape))
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise InvalidArgumentTypeError(
            expected("target", "an integer tensor of class indices (e.g. torch.long)", target.dtype)
        )
    if target.numel():
        low, high = torch.stack(torch.aminmax(target)).tolist()  # one device-to-host copy
        if low < 0 or high >= logits.shape[1]:
            bad = low if low < 0 else high
            raise InvalidArgumentError(
                expected("target", f"class indices in [0, {logits.shape[1]})", f"a target of {bad}")
            )


def check_finite_result(result: torch.Tensor, logits: torch.Tensor) -> None:
    """Raises the logits error when a loss came out non-finite because the logits held NaN or inf."""
    finite = math.isfinite(result.item()) if result.ndim == 0 else bool(torch.isfinite(result).all())
    if not finite:
        if not bool(torch.isfinite(logits).all()):
            raise InvalidArgumentError(expected("logits", "finite values", "a tensor containing NaN or inf"))
        if result.ndim == 0 and logits.shape[0] == 0:
            raise InvalidArgumentError(expected("logits", 'a non-empty batch with reduction="mean"', "0 records"))
        raise FloatingPointError("The loss is not finite although the logits are; please report this as a bug.")
