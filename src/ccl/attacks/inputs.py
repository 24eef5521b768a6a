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

Optional inputs of the label-only attacks (`ccl.attacks.label_only`): the predicted labels of the target (and
of the reference models) on `Q` perturbed copies of each record, for each kind of perturbation
(`ccl.attacks.label_only.perturbed_queries`):
    target_perturbed_labels:        (N, Q) int, on augmented copies (crop + flip; noise on tabular records)
    reference_perturbed_labels:     (K, N, Q) int, the same for the reference models
    target_noise_labels:            (N, Q') int, on copies with Gaussian noise of increasing scale
    reference_noise_labels:         (K, N, Q') int, the same for the reference models

Optional inputs of the statistic attacks (`ccl.attacks.statistic`): one number per model and record, measured
where the weights exist (the distance to the decision boundary, from labels only; the loss gradient's norm):
    target_boundary_distance:       (N,) float >= 0
    reference_boundary_distance:    (K, N) float >= 0
    target_gradient_norm:           (N,) float >= 0
    reference_gradient_norm:        (K, N) float >= 0

Optional inputs of QMIA (`ccl.attacks.qmia`): the records' features (their inputs, flattened):
    features:                       (N, d) float
    population_features:            (Z, d) float
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


def _predicted_labels(name: str, value, leading: tuple[int, ...], c: int, *, queries: int | None = None) -> np.ndarray:
    """Checks predicted labels of shape `leading + (Q,)` (with `queries`, Q must equal it)."""
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidArgumentTypeError(expected(name, "integer predicted labels", arr.dtype))
    tail = "Q" if queries is None else queries
    if arr.ndim != len(leading) + 1 or arr.shape[:-1] != leading or arr.shape[-1] < 1:
        raise InvalidArgumentError(expected(name, f"an array of shape {leading + (tail,)}", f"shape {arr.shape}"))
    if queries is not None and arr.shape[-1] != queries:
        raise InvalidArgumentError(
            expected(name, f"{queries} queries per record like the target's", f"{arr.shape[-1]} (shape {arr.shape})")
        )
    if arr.size and (arr.min() < 0 or arr.max() >= c):
        raise InvalidArgumentError(
            expected(name, f"class indices in [0, {c})", f"values in [{arr.min()}, {arr.max()}]")
        )
    return arr.astype(np.int64, copy=False)


def _features(name: str, value, n: int, *, d: int | None = None) -> np.ndarray:
    """Checks finite features `(n, d)` (with `d`, the same width as `features`)."""
    arr = np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidArgumentTypeError(expected(name, "real-valued features", arr.dtype))
    width = "d" if d is None else d
    if arr.ndim != 2 or arr.shape[0] != n or (d is not None and arr.shape[1] != d) or arr.shape[1] < 1:
        raise InvalidArgumentError(
            expected(name, f"an array of shape ({n}, {width}) (flatten each record)", f"shape {arr.shape}")
        )
    if not np.all(np.isfinite(arr)):
        raise InvalidArgumentError(expected(name, "finite values", "an array containing NaN or inf"))
    return arr.astype(np.float64, copy=False)


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
    target_perturbed_labels: np.ndarray | None = None
    reference_perturbed_labels: np.ndarray | None = None
    target_noise_labels: np.ndarray | None = None
    reference_noise_labels: np.ndarray | None = None
    target_boundary_distance: np.ndarray | None = None
    reference_boundary_distance: np.ndarray | None = None
    target_gradient_norm: np.ndarray | None = None
    reference_gradient_norm: np.ndarray | None = None
    features: np.ndarray | None = None
    population_features: np.ndarray | None = None

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
        self._check_label_only_and_features(n, c)
        self._check_statistics(n)
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

    def _check_label_only_and_features(self, n: int, c: int) -> None:
        """Validates the optional inputs of the label-only attacks and of QMIA."""
        set_ = object.__setattr__
        k = self.num_references
        for target, reference in (
            ("target_perturbed_labels", "reference_perturbed_labels"),
            ("target_noise_labels", "reference_noise_labels"),
        ):
            tv, rv = getattr(self, target), getattr(self, reference)
            if tv is None:
                if rv is not None:
                    raise InvalidArgumentError(expected(target, f"given with `{reference}`", None))
                continue
            tv = _predicted_labels(target, tv, (n,), c)
            set_(self, target, tv)
            if rv is not None:
                if self.reference_logits is None:
                    raise InvalidArgumentError(
                        expected("reference_logits", f"given with `{reference}` (with `reference_in`)", None)
                    )
                set_(self, reference, _predicted_labels(reference, rv, (k, n), c, queries=tv.shape[1]))
        if self.features is not None:
            set_(self, "features", _features("features", self.features, n))
        if self.population_features is not None:
            if self.features is None:
                raise InvalidArgumentError(expected("features", "given with `population_features`", None))
            if self.population_target_logits is None:
                raise InvalidArgumentError(
                    expected("population_target_logits", "given with `population_features`", None)
                )
            pt = np.asarray(self.population_target_logits)
            z = pt.shape[0] if pt.ndim else 0
            set_(
                self,
                "population_features",
                _features("population_features", self.population_features, z, d=self.features.shape[1]),
            )

    def _check_statistics(self, n: int) -> None:
        """Validates the optional per-model statistics (finite, non-negative; the references' with theirs)."""
        k = self.num_references
        for stat in ("boundary_distance", "gradient_norm"):
            for name, shape in ((f"target_{stat}", (n,)), (f"reference_{stat}", (k, n))):
                value = getattr(self, name)
                if value is None:
                    continue
                if name.startswith("reference") and self.reference_logits is None:
                    raise InvalidArgumentError(expected("reference_logits", f"given with `{name}`", None))
                arr = np.asarray(value)
                if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
                    raise InvalidArgumentTypeError(expected(name, "real numbers", arr.dtype))
                if arr.shape != shape:
                    raise InvalidArgumentError(expected(name, f"an array of shape {shape}", f"shape {arr.shape}"))
                if not np.all(np.isfinite(arr)) or (arr.size and arr.min() < 0):
                    raise InvalidArgumentError(expected(name, "finite non-negative values", "other values"))
                object.__setattr__(self, name, arr.astype(np.float64, copy=False))

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

    def require_inputs(self, attack: str, names: tuple[str, ...], hint: str) -> None:
        """Raises an error naming the first of the optional inputs `names` that is missing."""
        for name in names:
            if getattr(self, name) is None:
                raise InvalidArgumentError(f"Attack {attack!r} needs `{name}`, which is missing: {hint}")

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
