"""Datasets (a registry), downloads verified by checksum, and membership splits.

Example:
    >>> data = ccl.data.load("digits")
    >>> split = ccl.data.membership_split(len(data), num_references=16, seed=0)
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

from .._registry import Registry
from ..errors import InvalidArgumentError
from .datasets import DataError, Dataset, from_arrays, load_cifar, load_digits, load_npz, load_tabular, make_synthetic
from .download import ChecksumError, DownloadError, cache_dir
from .splits import MembershipSplit, membership_split, shadow_split

__all__ = [
    "describe",
    "ChecksumError",
    "DataError",
    "Dataset",
    "DownloadError",
    "MembershipSplit",
    "available",
    "cache_dir",
    "from_arrays",
    "load",
    "membership_split",
    "parameters",
    "shadow_split",
]

_REGISTRY: Registry[Dataset] = Registry("dataset")
_REGISTRY.register("digits", load_digits, doc="scikit-learn's digits, 1,797 x 64, 10 classes (offline)")
_REGISTRY.register("synthetic", make_synthetic, doc="seeded tabular task that overfits readily (offline)")
_REGISTRY.register("npz", load_npz, doc="your own .npz with arrays X and y (path=...)")
for _name, _doc in (
    ("cifar10", "CIFAR-10, 60,000 x (3, 32, 32), 10 classes"),
    ("cifar100", "CIFAR-100, 60,000 x (3, 32, 32), 100 classes"),
):
    _REGISTRY.register(_name, partial(load_cifar, _name), doc=_doc + " (downloaded)")
for _name, _doc in (
    ("purchase100", "Purchase100, 197,324 x 600 binary, 100 classes"),
    ("texas100", "Texas100, 67,330 x 6,169 binary, 100 classes"),
    ("location30", "Location30, 5,010 x 446 binary, 30 classes"),
):
    _REGISTRY.register(_name, partial(load_tabular, _name), doc=_doc + " (downloaded)")


def load(name: str, **options: Any) -> Dataset:
    """Loads a registered dataset, e.g. `load("digits")`, `load("cifar10", cache="~/data")`,
    `load("npz", path="mine.npz")`. A name ending in `.npz` is read as a file."""
    if isinstance(name, (str, os.PathLike)) and str(name).endswith(".npz"):
        valid = [p for p in _REGISTRY.parameters("npz") if p != "path"]
        for key in options:
            if key not in valid:
                raise InvalidArgumentError(
                    f"Unknown dataset option {key!r} for the .npz file {name}; it takes: {', '.join(valid)}."
                )
        return load_npz(name, **options)
    return _REGISTRY.create(name, **options)


def parameters(name: str) -> list[str]:
    """The options a registered dataset's loader takes."""
    return _REGISTRY.parameters(name)


def available() -> list[str]:
    """The names `load` accepts."""
    return _REGISTRY.available()


def describe(name: str) -> tuple[str, dict]:
    """(one-line description, {parameter: default}) of a registered name."""
    return _REGISTRY.describe(name)
