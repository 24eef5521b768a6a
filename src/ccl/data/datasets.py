"""Datasets as tensors with metadata: offline ones shipped with a dependency, real benchmarks downloaded on
first use (verified by checksum, parsed from the exact upstream formats), and user data.

Every loader returns a `Dataset` whose `x` is float32 `(N, *input_shape)` and `y` int64 `(N,)` in
`[0, num_classes)`. Benchmarks with an official train/test split (CIFAR) are returned as one pool, train then
test, as the membership-inference literature does: the membership split decides who is a member.

Each loader also says, in `Dataset.preprocessing`, exactly what it did to the records and what the audit does
to them next (`--standardize`): a model trained elsewhere is only audited soundly when it was trained on records
preprocessed the same way, and a mismatch (raw digits 0-16 against ccl's digits in [0, 1]) changes its losses
without a word. The texts below are read from the code they sit next to; keep them exact when it changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checks import check_in_range, check_positive_int, expected
from .._io import atomic_path
from ..errors import DataError
from .download import RemoteFile, fetch, file_digest

__all__ = ["PREPROCESSING", "DataError", "Dataset", "from_arrays", "load_npz", "make_synthetic"]

# per-channel statistics of the CIFAR training sets, the usual normalisation
_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


# What the audit does to a table of features after loading (`ccl.data.transforms.standardize`, called by
# `ccl.audit.pipeline` when `ExperimentConfig.standardizes`): the same words for every dataset it applies to.
_ZSCORE = (
    "each feature minus its mean, divided by its standard deviation, both over that seed's audit pool (never "
    "the population; a constant feature is only centred)"
)
_USER_TABLE = (
    f"ccl audit, compare and train then standardise the features per seed (--standardize auto): {_ZSCORE}; not "
    "for a supplied target, which is queried on the features as they are; --standardize off keeps them as they are"
)
_REGISTERED_TABLE = f"Not standardised by default; --standardize on standardises them per seed: {_ZSCORE}"
_IMAGES = "--standardize has no effect on images"


def _cifar(name: str, title: str, labels: str) -> str:
    mean, std = _CIFAR_STATS[name]
    return (
        "The python archive's uint8 pixels 0-255 as (3, 32, 32) RGB, divided by 255 to [0, 1], then normalised per "
        f"channel with the {title} training set's statistics, (x - mean) / std with mean {mean} and std {std}, on "
        f"all 60,000 images (train then test); float32; {labels} as given. {_IMAGES}."
    )


#: What each loader of this module does to its records, by registered name (`Dataset.preprocessing`).
PREPROCESSING = {
    "digits": (
        "scikit-learn's load_digits: 8x8 images of integer pixel values 0-16, divided by 16 to [0, 1], float32, "
        "as 64 features (as_image=True: reshaped to (1, 8, 8)); labels 0-9 as given. "
        f"{_REGISTERED_TABLE}; with as_image=True, {_IMAGES}."
    ),
    "synthetic": (
        "Features drawn from N(0, 1), float32, not scaled; labels argmax(x W + noise * eps) (seeded). "
        f"{_REGISTERED_TABLE}."
    ),
    "npz": (
        "The file's X cast to float32 exactly as stored (it must be finite), y to int64 (integer labels from 0). "
        f"For an X of shape (N, D), {_USER_TABLE}. An X of more dimensions (images) is left as stored."
    ),
    "cifar10": _cifar("cifar10", "CIFAR-10", "labels 0-9"),
    "cifar100": _cifar("cifar100", "CIFAR-100", "the fine labels 0-99"),
    "purchase100": (
        "dataset_purchase: the first column, the label 1-100, minus 1 to 0-99; the other 600 columns (binary 0/1 "
        f"in the published file) as float32 exactly as in the file, not scaled. {_REGISTERED_TABLE}."
    ),
    "texas100": (
        "texas/100/feats: the 6,169 columns (binary 0/1 in the published file) as float32 exactly as in the file, "
        "not scaled; "
        f"texas/100/labels: 1-100 minus 1 to 0-99. {_REGISTERED_TABLE}."
    ),
    "location30": (
        'bangkok: the first column, the quoted label "1"-"30", minus 1 to 0-29; the other 446 columns (binary 0/1 '
        f"in the published file) as float32 exactly as in the file, not scaled. {_REGISTERED_TABLE}."
    ),
}


@dataclass(frozen=True)
class Dataset:
    """A pool of labelled records. `x`: float32 `(N, *input_shape)`; `y`: int64 `(N,)` in `[0, num_classes)`.

    `preprocessing` says, in words, what the loader did to the records of `source` to make `x` and `y`, and what
    `ccl audit` does to them next: a model trained elsewhere must have been trained on records made the same way.
    """

    name: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    source: str
    extra: dict[str, Any] = field(default_factory=dict)
    preprocessing: str = ""

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(np.asarray(index), dtype=torch.long)
        return self.x[idx], self.y[idx]


def _numeric(name: str, value: Any) -> torch.Tensor:
    """`value` as a tensor; strings, objects and ragged lists are refused with the array's name."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        arr = np.asarray(value)
    except ValueError as err:  # a ragged nested list
        raise DataError(
            expected(name, "a rectangular array of numbers", f"an array numpy cannot build ({err})")
        ) from None
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataError(expected(name, "an array of numbers", f"an array of dtype {arr.dtype}"))
    return torch.as_tensor(arr)


def from_arrays(
    x: Any, y: Any, *, name: str = "arrays", num_classes: int | None = None, source: str = "user arrays"
) -> Dataset:
    """A `Dataset` from arrays (numpy or torch): `x (N, ...)` numbers, `y (N,)` integer labels from 0."""
    x_arr, y_arr = _numeric("X", x), _numeric("y", y)
    if x_arr.ndim < 2:
        raise DataError(expected("X", "an array of shape (N, features...)", f"shape {tuple(x_arr.shape)}"))
    if y_arr.ndim != 1 or y_arr.shape[0] != x_arr.shape[0]:
        raise DataError(expected("y", f"an array of shape ({x_arr.shape[0]},) matching X", tuple(y_arr.shape)))
    if y_arr.is_floating_point():
        if not torch.equal(y_arr, y_arr.round()):
            raise DataError(expected("y", "integer class labels", "non-integer values"))
    if y_arr.dtype == torch.bool or y_arr.is_complex():
        raise DataError(expected("y", "integer class labels", y_arr.dtype))
    if x_arr.shape[0] == 0:
        raise DataError(expected("X", "at least one record", "an empty array"))
    x_arr = x_arr.to(torch.float32)
    if not bool(torch.isfinite(x_arr).all()):
        raise DataError(expected("X", "finite numbers", "an array with NaN or inf"))
    y_arr = y_arr.to(torch.int64)
    k = int(y_arr.max()) + 1 if num_classes is None else int(num_classes)
    if int(y_arr.min()) < 0 or int(y_arr.max()) >= k:
        raise DataError(expected("y", f"labels in [0, {k})", f"labels in [{int(y_arr.min())}, {int(y_arr.max())}]"))
    what = "X cast to float32 exactly as given (it must be finite), y to int64 (integer labels from 0)"
    return Dataset(name, x_arr, y_arr, k, tuple(x_arr.shape[1:]), source, preprocessing=f"{what}.")


def load_npz(path: str | os.PathLike, *, num_classes: int | None = None) -> Dataset:
    """A user dataset from a `.npz` file holding arrays `X` and `y`."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"No such file: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            if "X" not in f or "y" not in f:
                raise DataError(f"{path} must hold arrays 'X' and 'y', but holds {sorted(f.files)}.")
            x, y = f["X"], f["y"]
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"Cannot read {path} as a .npz file ({err}); is it corrupt or truncated?") from None
    try:
        dataset = from_arrays(x, y, name=path.stem, num_classes=num_classes, source=str(path))
    except DataError as err:
        raise DataError(f"{path}: {err}") from None
    return dataclasses.replace(dataset, preprocessing=PREPROCESSING["npz"])


# ----------------------------------------------------------------------------------------------------------
# Offline datasets
# ----------------------------------------------------------------------------------------------------------
def load_digits(*, as_image: bool = False) -> Dataset:
    """scikit-learn's bundled handwritten digits: 1,797 records, 64 features in [0, 1], 10 classes."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as err:
        raise DataError("The 'digits' dataset ships with scikit-learn: pip install 'ccl[data]'.") from err
    d = sk_load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    if as_image:
        x = x.reshape(-1, 1, 8, 8)
    return Dataset(
        "digits",
        x,
        torch.tensor(d.target, dtype=torch.int64),
        10,
        tuple(x.shape[1:]),
        "scikit-learn load_digits",
        preprocessing=PREPROCESSING["digits"],
    )


def make_synthetic(
    *, num_samples: int = 1000, num_features: int = 20, num_classes: int = 5, noise: float = 2.0, seed: int = 0
) -> Dataset:
    """A seeded tabular task that overfits readily: `y = argmax(x W + noise * eps)`, `x, W, eps ~ N(0, 1)`.

    With the default noise, a linear Bayes classifier reaches about 65% accuracy while an MLP fits its training
    set perfectly: the gap that membership inference feeds on.
    """
    n = check_positive_int("num_samples", num_samples, minimum=2)
    d = check_positive_int("num_features", num_features)
    c = check_positive_int("num_classes", num_classes, minimum=2)
    check_in_range("noise", noise, low=0.0)
    seed = check_positive_int("seed", seed, minimum=0)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, c, generator=g)
    y = (x @ w + float(noise) * torch.randn(n, c, generator=g)).argmax(1)
    source = f"synthetic(seed={seed}, noise={noise})"
    return Dataset("synthetic", x, y, c, (d,), source, preprocessing=PREPROCESSING["synthetic"])


# ----------------------------------------------------------------------------------------------------------
# Downloaded benchmarks
# ----------------------------------------------------------------------------------------------------------
_PRIVACYTRUSTLAB = "https://github.com/privacytrustlab/datasets/raw/master/"

REMOTE = {
    "cifar10": RemoteFile(
        "cifar-10-python.tar.gz",
        ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
        "md5",
        "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": RemoteFile(
        "cifar-100-python.tar.gz",
        ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",),
        "md5",
        "eb9058c3a382ffc7106e4002c42a8d85",
    ),
    "purchase100": RemoteFile("dataset_purchase.tgz", (_PRIVACYTRUSTLAB + "dataset_purchase.tgz",)),
    "texas100": RemoteFile("dataset_texas.tgz", (_PRIVACYTRUSTLAB + "dataset_texas.tgz",)),
    "location30": RemoteFile(
        "dataset_location.tgz",
        (_PRIVACYTRUSTLAB + "dataset_location.tgz",),
        "sha256",
        "927203f85a868f8ee17a0ded1dc61699efe602167beabe34fbf45b4b1de94b33",
    ),
}


def _member(archive: tarfile.TarFile, path: Path, name: str) -> bytes:
    for m in archive.getmembers():
        if m.isfile() and (m.name == name or m.name.endswith("/" + name)):
            fh = archive.extractfile(m)
            assert fh is not None
            return fh.read()
    raise DataError(f"{path} does not contain {name!r}; is it the right archive?")


def _open_archive(path: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(path, "r:gz")
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"Cannot open {path} as a .tar.gz archive ({err}); it is corrupt or truncated.") from err


def _unpickle(raw: bytes, path: Path, name: str) -> dict:
    # The CIFAR archives are pickles by design; we only read them after their md5 matched the published one.
    try:
        return pickle.loads(raw, encoding="latin1")  # noqa: S301
    except Exception as err:
        raise DataError(f"Cannot read {name!r} in {path} ({err}).") from err


def load_cifar(name: str, *, cache: str | os.PathLike | None = None, download: bool = True) -> Dataset:
    """CIFAR-10 or CIFAR-100 from the python archives: 60,000 images `(3, 32, 32)`, train then test."""
    path = fetch(REMOTE[name], cache=cache, download=download)
    members, label_key = (
        ([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels")
        if name == "cifar10"
        else (["train", "test"], "fine_labels")
    )
    xs, ys = [], []
    try:
        with _open_archive(path) as archive:
            for member in members:
                batch = _unpickle(_member(archive, path, member), path, member)
                batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
                xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(batch[label_key], dtype=np.int64))
    except (tarfile.TarError, EOFError, OSError, KeyError) as err:
        raise DataError(f"Cannot read {path} ({err}); it is corrupt or truncated.") from err
    x = torch.from_numpy(np.concatenate(xs)).float().div_(255.0)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in _CIFAR_STATS[name])
    x = (x - mean) / std
    num_classes = 10 if name == "cifar10" else 100
    n_train = sum(len(y) for y in ys[:-1])
    return Dataset(
        name,
        x,
        torch.from_numpy(np.concatenate(ys)),
        num_classes,
        (3, 32, 32),
        str(path),
        {"num_train": n_train},
        preprocessing=PREPROCESSING[name],
    )


def _parse_csv(raw: bytes, path: Path, member: str, *, expected_columns: int | None = None) -> np.ndarray:
    text = raw.decode("utf-8", errors="strict").replace('"', "")
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float32, ndmin=2)
    except ValueError as err:
        raise DataError(f"Cannot parse {member!r} in {path} as comma-separated numbers ({err}).") from err
    if expected_columns is not None and table.shape[1] != expected_columns:
        raise DataError(f"{member!r} in {path} has {table.shape[1]} columns; expected {expected_columns}.")
    return table


def _cached_parse(name: str, path: Path, parse) -> tuple[np.ndarray, np.ndarray]:
    """Parses an archive once and caches the arrays next to it (written atomically), keyed by the archive's
    SHA-256 (`<name>.<digest[:16]>.parsed.npz`: a replaced archive never reuses an old parse) and holding the
    SHA-256 of its own arrays (an edited or damaged cache is refused with its path, never used)."""
    cached = path.with_name(f"{name}.{file_digest(path, 'sha256')[:16]}.parsed.npz")
    if cached.exists():
        try:
            with np.load(cached, allow_pickle=False) as f:
                x, y, stored = f["X"], f["y"], str(f["content_sha256"])
        except Exception as err:
            raise DataError(f"The parsed cache {cached} is corrupt or truncated ({err}); delete it.") from err
        if _arrays_digest(x, y) != stored:
            raise DataError(f"The parsed cache {cached} does not match the digest it was written with; delete it.")
        return x, y
    x, y = parse()
    with atomic_path(cached) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, X=x, y=y, content_sha256=np.asarray(_arrays_digest(x, y)))
    return x, y


def _arrays_digest(x: np.ndarray, y: np.ndarray) -> str:
    digest = hashlib.sha256()
    for a in (x, y):
        digest.update(f"{a.dtype}{a.shape}".encode())
        digest.update(np.ascontiguousarray(a).tobytes())
    return digest.hexdigest()


def _labels_from_one(y: np.ndarray, path: Path, num_classes: int) -> np.ndarray:
    if y.min() < 1 or y.max() > num_classes or not np.all(y == np.round(y)):
        raise DataError(f"Labels in {path} should be integers 1..{num_classes}; got {y.min():g}..{y.max():g}.")
    return y.astype(np.int64) - 1


def load_tabular(
    name: str, *, cache: str | os.PathLike | None = None, download: bool = True, sha256: str | None = None
) -> Dataset:
    """Purchase100, Texas100 or Location30 from the archives used across the membership-inference literature."""
    path = fetch(REMOTE[name], cache=cache, download=download, sha256=sha256)

    def parse() -> tuple[np.ndarray, np.ndarray]:
        with _open_archive(path) as archive:
            if name == "purchase100":
                table = _parse_csv(
                    _member(archive, path, "dataset_purchase"), path, "dataset_purchase", expected_columns=601
                )
                return table[:, 1:], _labels_from_one(table[:, 0], path, 100)
            if name == "location30":
                table = _parse_csv(_member(archive, path, "bangkok"), path, "bangkok", expected_columns=447)
                return table[:, 1:], _labels_from_one(table[:, 0], path, 30)
            feats = _parse_csv(_member(archive, path, "texas/100/feats"), path, "texas/100/feats")
            labels = _parse_csv(_member(archive, path, "texas/100/labels"), path, "texas/100/labels")
            if labels.shape[0] != feats.shape[0]:
                raise DataError(f"{path}: {feats.shape[0]} feature rows but {labels.shape[0]} labels.")
            return feats, _labels_from_one(labels[:, 0], path, 100)

    x, y = _cached_parse(name, path, parse)
    num_classes = 30 if name == "location30" else 100
    return Dataset(
        name,
        torch.from_numpy(x.astype(np.float32)),
        torch.from_numpy(y.astype(np.int64)),
        num_classes,
        (x.shape[1],),
        str(path),
        preprocessing=PREPROCESSING[name],
    )
