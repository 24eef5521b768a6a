"""`AttackInputs`: what every attack reads, validated once.

The audited samples are `N` records with labels; the target model's logits on them, and optionally the logits
of `K` reference (shadow) models on the same records with a mask saying which reference model trained on which
record (the LiRA/RMIA design, in which each record is a member of about half of the reference models; the
classic single-shadow split is `K = 1`). RMIA also compares each record with a population sample of `Z`
records that the target did not train on.

Shapes (`A` is an optional axis of augmented queries of the same record; leave it out when there is one):
    target_logits:                  (N, C) or (N, A, C)
    labels:                         (N,)
    reference_logits:               (K, N, C) or (K, N, A, C)
    reference_in:                   (K, N) bool
    population_target_logits:       (Z, C) or (Z, A, C)
    population_labels:              (Z,)
    population_reference_logits:    (K, Z, C) or (K, Z, A, C)
    population_reference_in:        (K, Z) bool, default all False
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .._checks import expected
from ..errors import CclError, InvalidArgumentError, InvalidArgumentTypeError

__all__ = ["AttackInputs", "NotEnoughReferencesError"]


class NotEnoughReferencesError(CclError, ValueError):
    """An attack needs more reference models (or IN/OUT observations per record) than were given."""


def _logits(name: str, value, leading: tuple[int, ...], *, like: tuple[int, int] | None = None) -> np.ndarray:
    """Checks logits of shape `leading + (C,)` or `leading + (A, C)`; with `like = (A, C)` of the target's
    logits, the same number of augmented queries and classes are required."""
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.floating):
        raise InvalidArgumentTypeError(expected(name, "floating-point logits", arr.dtype))
    ndim = len(leading)
    if arr.ndim not in (ndim + 1, ndim + 2) or arr.shape[:ndim] != leading:
        shapes = " or ".join(str(leading + tail) for tail in (("C",), ("A", "C")))
        raise InvalidArgumentError(expected(name, f"an array of shape {shapes}", f"shape {arr.shape}"))
    if like is not None:
        a, c = like
        if arr.shape[-1] != c:
            raise InvalidArgumentError(
                expected(name, f"logits over {c} classes like `target_logits`", f"{arr.shape[-1]} classes")
            )
        queries = arr.shape[-2] if arr.ndim == ndim + 2 else 1
        if queries != a:
            raise InvalidArgumentError(
                expected(
                    name,
                    f"logits of {a} augmented {'query' if a == 1 else 'queries'} per record like `target_logits`",
                    f"{queries} (shape {arr.shape})",
                )
            )
    if not np.all(np.isfinite(arr)):
        raise InvalidArgumentError(expected(name, "finite values", "an array containing NaN or inf"))
    if arr.ndim == ndim + 1:
        arr = arr[..., None, :]  # add the augmentation axis: (..., 1, C)
    return arr.astype(np.float64, copy=False)


def _labels(name: str, value, n: int, c: int) -> np.ndarray:
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgumentTypeError(expected(name, "integer class indices", arr.dtype))
    if arr.shape != (n,):
        raise InvalidArgumentError(expected(name, f"an array of shape ({n},)", f"shape {arr.shape}"))
    if n and (arr.min() < 0 or arr.max() >= c):
        raise InvalidArgumentError(
            expected(name, f"class indices in [0, {c})", f"values in [{arr.min()}, {arr.max()}]")
        )
    return arr.astype(np.int64, copy=False)


def _mask(name: str, value, shape: tuple[int, int]) -> np.ndarray:
    arr = np.asarray(value)
    if arr.shape != shape:
        raise InvalidArgumentError(expected(name, f"a boolean array of shape {shape}", f"shape {arr.shape}"))
    if arr.dtype != bool:
        if not np.isin(arr, (0, 1)).all():
            raise InvalidArgumentError(expected(name, "booleans (or 0/1)", f"values {np.unique(arr)[:5]}"))
        arr = arr.astype(bool)
    return arr


@dataclass(frozen=True)
class AttackInputs:
    """Model outputs for an audit; see the module docstring for shapes. Arrays are stored in float64 with an
    explicit augmentation axis `A` (1 when absent)."""

    target_logits: np.ndarray
    labels: np.ndarray
    reference_logits: np.ndarray | None = None
    reference_in: np.ndarray | None = None
    population_target_logits: np.ndarray | None = None
    population_labels: np.ndarray | None = None
    population_reference_logits: np.ndarray | None = None
    population_reference_in: np.ndarray | None = field(default=None)

    def __post_init__(self) -> None:
        tl = np.asarray(self.target_logits)
        if tl.ndim not in (2, 3):
            raise InvalidArgumentError(
                expected("target_logits", "an array of shape (N, C) or (N, A, C)", f"shape {tl.shape}")
            )
        n = tl.shape[0]
        tl = _logits("target_logits", tl, (n,))
        like = tl.shape[-2:]  # (A, C): every other model output must have as many queries and classes
        c = like[1]
        set_ = object.__setattr__
        set_(self, "target_logits", tl)
        set_(self, "labels", _labels("labels", self.labels, n, c))
        if self.reference_logits is not None and self.reference_in is None:
            raise InvalidArgumentError(
                expected("reference_in", "a boolean array (K, N) with `reference_logits` (pass both or neither)", None)
            )
        if self.reference_logits is None and self.reference_in is not None:
            raise InvalidArgumentError(
                expected("reference_logits", "logits (K, N, [A,] C) with `reference_in` (pass both or neither)", None)
            )
        if self.reference_logits is not None:
            rl = np.asarray(self.reference_logits)
            k = rl.shape[0] if rl.ndim else 0
            set_(self, "reference_logits", _logits("reference_logits", rl, (k, n), like=like))
            set_(self, "reference_in", _mask("reference_in", self.reference_in, (k, n)))
        if self.population_target_logits is None:
            for name in ("population_labels", "population_reference_logits", "population_reference_in"):
                if getattr(self, name) is not None:
                    raise InvalidArgumentError(
                        expected("population_target_logits", f"given with `{name}` (the population's records)", None)
                    )
            return
        pt = np.asarray(self.population_target_logits)
        z = pt.shape[0] if pt.ndim else 0
        set_(self, "population_target_logits", _logits("population_target_logits", pt, (z,), like=like))
        if self.population_labels is None:
            raise InvalidArgumentError(
                expected("population_labels", "given with `population_target_logits`", self.population_labels)
            )
        set_(self, "population_labels", _labels("population_labels", self.population_labels, z, c))
        if self.population_reference_logits is not None:
            if self.reference_logits is None:
                raise InvalidArgumentError(
                    expected("reference_logits", "given with `population_reference_logits`", None)
                )
            k = self.num_references
            set_(
                self,
                "population_reference_logits",
                _logits("population_reference_logits", self.population_reference_logits, (k, z), like=like),
            )
            pin = self.population_reference_in
            set_(
                self,
                "population_reference_in",
                np.zeros((k, z), bool) if pin is None else _mask("population_reference_in", pin, (k, z)),
            )
        elif self.population_reference_in is not None:
            raise InvalidArgumentError(
                expected("population_reference_logits", "given with `population_reference_in`", None)
            )

    @property
    def num_samples(self) -> int:
        return self.target_logits.shape[0]

    @property
    def num_references(self) -> int:
        return 0 if self.reference_logits is None else self.reference_logits.shape[0]

    def require_references(self, attack: str, minimum: int = 1) -> None:
        if self.num_references < minimum:
            raise NotEnoughReferencesError(
                f"Attack {attack!r} needs at least {minimum} reference model(s), but got {self.num_references}: "
                "pass `reference_logits` and `reference_in`."
            )

    def require_population(self, attack: str) -> None:
        if self.population_target_logits is None or self.population_reference_logits is None:
            missing = (
                "population_target_logits" if self.population_target_logits is None else ("population_reference_logits")
            )
            raise InvalidArgumentError(
                f"Attack {attack!r} compares each record with a population sample, but `{missing}` is missing: "
                "pass `population_target_logits`, `population_labels` and `population_reference_logits` (records "
                "the target did not train on)."
            )
