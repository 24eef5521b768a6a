"""Datasets (a registry), downloads verified by checksum, and membership splits.

Example:
    >>> data = ccl.data.load("digits")
    >>> split = ccl.data.membership_split(len(data), num_references=16, seed=0)
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

from .._checks import unknown_name
from .._registry import Registry
from ..errors import InvalidArgumentError
from . import images, tables
from .datasets import (
    PREPROCESSING,
    DataError,
    Dataset,
    from_arrays,
    load_cifar,
    load_digits,
    load_npz,
    load_tabular,
    make_synthetic,
)
from .download import ChecksumError, DownloadError, cache_dir
from .images import load_image_folder
from .splits import MembershipSplit, membership_split, shadow_split
from .tables import load_csv, load_parquet, load_table

__all__ = [
    "describe",
    "ChecksumError",
    "DataError",
    "Dataset",
    "DownloadError",
    "MembershipSplit",
    "available",
    "cache_dir",
    "file_kind",
    "from_arrays",
    "load",
    "load_image_folder",
    "load_table",
    "membership_split",
    "parameters",
    "preprocessing",
    "shadow_split",
]

_REGISTRY: Registry[Dataset] = Registry("dataset")
_REGISTRY.register("digits", load_digits, doc="scikit-learn's digits, 1,797 x 64, 10 classes (offline)")
_REGISTRY.register("synthetic", make_synthetic, doc="seeded tabular task that overfits readily (offline)")
_REGISTRY.register("npz", load_npz, doc="your own .npz with arrays X and y (path=...)")
_REGISTRY.register("csv", load_csv, doc="your own .csv table (path=..., label=<column>; pandas)")
_REGISTRY.register("parquet", load_parquet, doc="your own .parquet table (path=..., label=<column>; pandas, pyarrow)")
_REGISTRY.register(
    "image_folder", load_image_folder, doc="your own PNG/JPEG images, one subfolder per class (path=...; Pillow)"
)
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

# what each loader does to its records, also `Dataset.preprocessing` of what it loads: a listing needs no download
_PREPROCESSING = {
    **PREPROCESSING,
    "csv": tables.PREPROCESSING,
    "parquet": tables.PREPROCESSING,
    "image_folder": images.PREPROCESSING,
}


def file_kind(name: Any) -> str | None:
    """The registered loader a dataset name that is a path stands for: "npz", "csv" or "parquet" (by its
    suffix), "image_folder" (a name ending in "/"), or None for a registered name."""
    if not isinstance(name, (str, os.PathLike)):
        return None
    text = os.fspath(name)
    if text.endswith(("/", os.sep)):
        return "image_folder"
    if text.endswith(".npz"):
        return "npz"
    for suffix in (".csv", ".parquet"):  # any case: DATA.CSV is common
        if text.lower().endswith(suffix):
            return suffix[1:]
    return None


_REQUIRED = {"csv": ("path", "label"), "parquet": ("path", "label"), "image_folder": ("path",)}


def load(name: str, **options: Any) -> Dataset:
    """Loads a registered dataset, e.g. `load("digits")`, `load("cifar10", cache="~/data")`,
    `load("npz", path="mine.npz")`, `load("csv", path="mine.csv", label="outcome")`,
    `load("image_folder", path="photos")`. A name ending in `.npz`, `.csv` or `.parquet` is read as that
    file, and a name ending in `/` as an image folder: `load("mine.csv", label="outcome")`, `load("photos/")`."""
    kind = file_kind(name)
    if kind is not None:
        valid = [p for p in _REGISTRY.parameters(kind) if p != "path"]
        what = "image folder" if kind == "image_folder" else f".{kind} file"
        for key in options:
            if key not in valid:
                raise InvalidArgumentError(
                    f"Unknown dataset option {key!r} for the {what} {name}; it takes: {', '.join(valid)}."
                )
        options = {**options, "path": name}
    elif isinstance(name, str) and name in _REQUIRED:
        kind = name
    for key in _REQUIRED.get(kind, ()) if kind is not None else ():
        if key not in options:
            value = "<the label column>" if key == "label" else "<your file or folder>"
            raise InvalidArgumentError(
                f"The dataset {name} needs the option {key}={value} (on the command line: --data-option {key}=...)."
            )
    return _REGISTRY.create(kind or name, **options)


def parameters(name: str) -> list[str]:
    """The options a registered dataset's loader takes."""
    return _REGISTRY.parameters(name)


def available() -> list[str]:
    """The names `load` accepts."""
    return _REGISTRY.available()


def describe(name: str) -> tuple[str, dict]:
    """(one-line description, {parameter: default}) of a registered name."""
    return _REGISTRY.describe(name)


def preprocessing(name: str | os.PathLike) -> str:
    """What `load(name)` does to the records, and what `ccl audit` does to them next, in words: the
    `Dataset.preprocessing` of what it loads, known without loading (or downloading) it.

    Example:
        >>> ccl.data.preprocessing("digits")[:80]
        "scikit-learn's load_digits: 8x8 images of integer pixel values 0-16, divided by "
    """
    kind = file_kind(name) or name
    if kind not in _PREPROCESSING:
        raise InvalidArgumentError(unknown_name("dataset", name, _PREPROCESSING))
    return _PREPROCESSING[kind]
