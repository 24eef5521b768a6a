"""Your own tabular data: a `.csv` or `.parquet` file with one record a row and one column holding the label.

Exactly what `load_table` does, in this order (nothing else: no imputation, no scaling, no row is dropped):

1. Reads the file with pandas (`pandas.read_csv`; `pandas.read_parquet` with pyarrow). For a CSV, empty cells
   and pandas' default missing markers (`NA`, `NaN`, `null`, `None`, `n/a`, ...) are missing values.
2. Removes the `drop` columns, unread.
3. Refuses missing values in every remaining column (the error names each column and how many it misses).
4. Maps the `label` column to `0..C-1` in the sorted order of its distinct values (numbers numerically, strings
   alphabetically); the sorted values are kept in `Dataset.extra["classes"]`, so class `k` is `classes[k]`.
5. One-hot encodes each `categorical` column (`pandas.get_dummies`): one 0/1 column per distinct value, in the
   sorted order of the values, named `column=value`; the block takes the column's place.
6. Requires every other column to be numeric (integers, floats, booleans as 0/1) and finite.

The features are the remaining columns in the file's order, as float32 `(N, D)`; their names are kept in
`Dataset.extra["features"]`. They are not standardised here: the audit pipeline does it (`standardize`), with
statistics of the audit pool only.

pandas (and pyarrow for Parquet) are optional: `pip install 'ccl[tables]'`.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checks import expected
from ..errors import DataError, InvalidArgumentError, InvalidArgumentTypeError, MissingDependencyError
from .datasets import _USER_TABLE, Dataset

__all__ = ["PREPROCESSING", "SUFFIXES", "load_csv", "load_parquet", "load_table"]

SUFFIXES = (".csv", ".parquet")
_INSTALL = "pip install 'ccl[tables]'"

#: What `load_table` and the audit do to a table, in words (`Dataset.preprocessing`; the module's docstring in short).
PREPROCESSING = (
    "The label column mapped to 0..C-1 in the sorted order of its values; the drop columns removed; each "
    "categorical column one-hot encoded (one 0/1 column per value, sorted); every other column as float32 exactly "
    f"as in the file (missing values refused, nothing imputed or scaled). {_USER_TABLE}."
)


def _import_pandas(path: Path, fmt: str) -> Any:
    try:
        import pandas as pd
    except ImportError as err:
        raise MissingDependencyError(f"Reading {path} needs pandas: {_INSTALL}.") from err
    if fmt == "parquet":
        try:
            import pyarrow  # noqa: F401  (pandas' Parquet engine)
        except ImportError as err:
            raise MissingDependencyError(f"Reading the Parquet file {path} needs pyarrow: {_INSTALL}.") from err
    return pd


def _column_list(name: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidArgumentTypeError(expected(name, "a list of column names such as ['color']", value))
    if not all(_is_column_name(v) for v in value):
        raise InvalidArgumentTypeError(expected(name, "a list of column names (strings)", value))
    names = [str(v) for v in value]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(expected(name, "distinct column names", value))
    return names


def _is_column_name(value: Any) -> bool:
    # an int too: a header "2020" read back from YAML (`--data-option label=2020`) is the column "2020"
    return (
        isinstance(value, str) and value != "" or isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    )


def _names(columns: Sequence[str]) -> str:
    return ", ".join(repr(c) for c in columns)


def _sorted(values: list[Any]) -> list[Any]:
    try:
        return sorted(values)
    except TypeError:  # mixed types in one column: order by their text, still deterministic
        return sorted(values, key=lambda v: (type(v).__name__, str(v)))


def _row(fmt: str, index: int) -> str:
    """Where record `index` (from 0) is: its line in a CSV file (the header is line 1), else its row."""
    return f"on line {index + 2}" if fmt == "csv" else f"in row {index} (counting from 0)"


def _short(value: Any) -> str:
    text = repr(_plain(value))
    return text if len(text) <= 40 else text[:37] + "..."


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value (JSON-friendly metadata)."""
    return value.item() if isinstance(value, np.generic) else value


def _read(path: Path, fmt: str) -> tuple[Any, Any]:
    """(the pandas module, the table read from `path`)."""
    pd = _import_pandas(path, fmt)
    if not path.exists():
        raise DataError(f"No such file: {path}")
    if not path.is_file():
        raise DataError(f"{path} is not a file; a table is one .csv or .parquet file.")
    try:
        if fmt == "csv":
            frame = pd.read_csv(path)
        else:
            frame = pd.read_parquet(path, engine="pyarrow")
    except Exception as err:  # pandas/pyarrow raise many kinds (ParserError, ArrowInvalid, UnicodeDecodeError...)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        kind = "CSV" if fmt == "csv" else "Parquet"
        raise DataError(f"Cannot read {path} as a {kind} file ({first}); is it corrupt or truncated?") from None
    frame.columns = [str(c) for c in frame.columns]
    header = _csv_header(path) if fmt == "csv" else list(frame.columns)  # pandas renames a CSV's "a, a" "a, a.1"
    duplicated = sorted({c for c in header if header.count(c) > 1})
    if duplicated:
        raise DataError(f"{path} has more than one column named {_names(duplicated)}; rename them.")
    return pd, frame


def _csv_header(path: Path) -> list[str]:
    """The column names of a CSV file's header row, as written (pandas has read the file already)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        return next(csv.reader(fh), [])


def _check_columns(path: Path, columns: list, label: str, categorical: list, drop: list) -> None:
    """The label, categorical and dropped columns exist, and do not overlap."""
    if label not in columns:
        raise DataError(f"{path} has no label column {label!r}; its columns are: {_names(columns)}.")
    for name, listed in (("categorical", categorical), ("drop", drop)):
        unknown = [c for c in listed if c not in columns]
        if unknown:
            raise DataError(
                f"{path}: the {name} column(s) {_names(unknown)} are not in the file; its columns are: "
                f"{_names(columns)}."
            )
        if label in listed:
            raise InvalidArgumentError(expected(name, f"columns other than the label column {label!r}", listed))
    both = [c for c in categorical if c in drop]
    if both:
        raise InvalidArgumentError(expected("categorical", "columns that are not also in `drop`", both))


def _check_complete(path: Path, fmt: str, frame) -> None:
    """No missing value anywhere: ccl does not impute."""
    missing = {c: int(n) for c, n in frame.isna().sum().items() if n}
    if missing:
        where = "; ".join(
            f"column {c!r} has {n} missing value{'s' if n > 1 else ''} (the first "
            f"{_row(fmt, int(np.flatnonzero(frame[c].isna().to_numpy())[0]))})"
            for c, n in missing.items()
        )
        raise DataError(
            f"{path}: {where}. ccl does not fill in missing values: fill or remove those rows, or leave the "
            "column out with drop=[...]."
        )


def _check_numeric(pd, path: Path, frame, label: str, categorical: list) -> None:
    """Every feature column that is not one-hot encoded is numeric (or boolean)."""
    not_numeric = [
        c
        for c in frame.columns
        if c != label
        and c not in categorical
        and not (
            pd.api.types.is_bool_dtype(frame[c])
            or (pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_complex_dtype(frame[c]))
        )
    ]
    if not_numeric:
        examples = ", ".join(f"{c!r} (e.g. {_short(frame[c].iloc[0])})" for c in not_numeric)
        raise DataError(
            f"{path}: the column(s) {examples} are not numeric. One-hot encode them with "
            f"categorical={not_numeric!r}, or leave them out with drop={not_numeric!r}."
        )


def _features(pd, path: Path, fmt: str, frame, label: str, categorical: list) -> tuple[np.ndarray | None, list[str]]:
    """The float32 feature matrix (categorical columns one-hot, in sorted order) and the features' names;
    None when there is no feature column."""
    blocks: list[np.ndarray] = []
    features: list[str] = []
    for c in frame.columns:
        if c == label:
            continue
        if c in categorical:
            values = frame[c].astype(object)
            categories = _sorted(values.unique().tolist())
            dummies = pd.get_dummies(values, dtype=np.float32).reindex(columns=categories, fill_value=0.0)
            blocks.append(dummies.to_numpy(dtype=np.float32))
            features += [f"{c}={v}" for v in categories]
            continue
        col = frame[c].to_numpy(dtype=np.float64)
        bad = ~np.isfinite(col)
        if bad.any():
            raise DataError(
                f"{path}: column {c!r} holds {int(bad.sum())} infinite value(s) (the first "
                f"{_row(fmt, int(np.flatnonzero(bad)[0]))}); expected finite numbers."
            )
        if np.abs(col).max(initial=0.0) > np.finfo(np.float32).max:
            raise DataError(f"{path}: column {c!r} holds values too large for float32 (|x| > 3.4e38).")
        blocks.append(col.astype(np.float32)[:, None])
        features.append(c)
    return (np.concatenate(blocks, axis=1) if blocks else None), features


def _load(path: str | os.PathLike, fmt: str, label: Any, categorical: Any, drop: Any) -> Dataset:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentTypeError(expected("path", f"the path of a .{fmt} file", path))
    path = Path(path).expanduser()
    if not _is_column_name(label):
        raise InvalidArgumentTypeError(expected("label", "the name of the label column (a string)", label))
    label = str(label)
    categorical = _column_list("categorical", categorical)
    drop = _column_list("drop", drop)
    pd, frame = _read(path, fmt)
    _check_columns(path, list(frame.columns), label, categorical, drop)
    frame = frame.drop(columns=drop)
    if len(frame) == 0:
        raise DataError(f"{path} has no rows.")
    _check_complete(path, fmt, frame)
    classes = _sorted(frame[label].unique().tolist())
    index = {v: k for k, v in enumerate(classes)}
    y = np.fromiter((index[v] for v in frame[label].tolist()), dtype=np.int64, count=len(frame))
    _check_numeric(pd, path, frame, label, categorical)
    x, features = _features(pd, path, fmt, frame, label, categorical)
    if x is None:
        raise DataError(f"{path} has no feature columns besides the label {label!r} (after drop={drop!r}).")
    return Dataset(
        path.stem,
        torch.from_numpy(np.ascontiguousarray(x)),
        torch.from_numpy(y),
        len(classes),
        (x.shape[1],),
        str(path),
        {"label": label, "classes": [_plain(v) for v in classes], "features": features},
        preprocessing=PREPROCESSING,
    )


def load_table(
    path: str | os.PathLike,
    *,
    label: str,
    categorical: list[str] | None = None,
    drop: list[str] | None = None,
) -> Dataset:
    """A user dataset from a `.csv` or `.parquet` file (by its suffix); see the module's docstring for exactly
    what is done to it.

    Args:
        path: the file; one record a row, a header row naming the columns (CSV).
        label: the column holding the class; its sorted distinct values become classes `0..C-1`
            (`Dataset.extra["classes"]` keeps them).
        categorical: columns to one-hot encode (sorted values, one `column=value` feature each). Any other
            column that is not numeric is an error.
        drop: columns to leave out (identifiers, free text, ...).

    Raises:
        DataError: the file is missing or unreadable, `label` or a listed column is not in it, a value is
            missing, or a column is neither numeric nor listed in `categorical`.
        MissingDependencyError: pandas (or pyarrow, for Parquet) is not installed.
    """
    suffix = Path(os.fspath(path)).suffix.lower() if isinstance(path, (str, os.PathLike)) else ""
    if suffix not in SUFFIXES:
        raise InvalidArgumentError(expected("path", "a file ending in .csv or .parquet", path))
    return _load(path, suffix[1:], label, categorical, drop)


def load_csv(
    path: str | os.PathLike,
    *,
    label: str,
    categorical: list[str] | None = None,
    drop: list[str] | None = None,
) -> Dataset:
    """`load_table` for a CSV file whatever its suffix (the registered dataset `csv`, with `path=`)."""
    return _load(path, "csv", label, categorical, drop)


def load_parquet(
    path: str | os.PathLike,
    *,
    label: str,
    categorical: list[str] | None = None,
    drop: list[str] | None = None,
) -> Dataset:
    """`load_table` for a Parquet file whatever its suffix (the registered dataset `parquet`, with `path=`)."""
    return _load(path, "parquet", label, categorical, drop)
