"""Datasets, downloads and splits: parsers on fixture files written in the exact upstream formats."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import ccl
from ccl.data import datasets as ds
from ccl.data.download import ChecksumError, DownloadError, RemoteFile


# ------------------------------------------------------------------ offline datasets and user data
def test_digits_and_synthetic():
    d = ccl.data.load("digits")
    assert (len(d), d.num_classes, d.input_shape) == (1797, 10, (64,))
    assert d.x.dtype == torch.float32 and float(d.x.max()) <= 1.0
    assert ccl.data.load("digits", as_image=True).input_shape == (1, 8, 8)
    s1 = ccl.data.load("synthetic", num_samples=300, num_classes=4, seed=3)
    s2 = ccl.data.load("synthetic", num_samples=300, num_classes=4, seed=3)
    assert torch.equal(s1.x, s2.x) and torch.equal(s1.y, s2.y)
    assert not torch.equal(s1.x, ccl.data.load("synthetic", num_samples=300, num_classes=4, seed=4).x)
    assert set(s1.y.tolist()) == {0, 1, 2, 3}


def test_npz_and_arrays(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, X=np.random.default_rng(0).normal(size=(20, 3)), y=np.arange(20) % 4)
    d = ccl.data.load(str(path))
    assert (len(d), d.num_classes, d.input_shape) == (20, 4, (3,))
    assert ccl.data.load("npz", path=path).num_classes == 4
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ccl.data.DataError, match="bad.npz"):
        ccl.data.load(str(bad))
    np.savez(tmp_path / "nolabels.npz", X=np.zeros((3, 2)))
    with pytest.raises(ccl.data.DataError, match="'X' and 'y'"):
        ccl.data.load(str(tmp_path / "nolabels.npz"))
    with pytest.raises(ccl.data.DataError, match="`y`.*\\(3,\\)"):
        ccl.data.from_arrays(np.zeros((3, 2)), np.zeros(4, int))
    with pytest.raises(ccl.data.DataError, match="`y`.*labels in \\[0, 2\\)"):
        ccl.data.from_arrays(np.zeros((3, 2)), np.array([0, 1, 5]), num_classes=2)
    with pytest.raises(ccl.data.DataError, match="`X`.*empty"):
        ccl.data.from_arrays(np.zeros((0, 2)), np.zeros(0, int))


def test_every_registered_dataset_says_how_it_is_preprocessed(tmp_path):
    for name in ccl.data.available():  # the downloaded ones without a download: their parsers are tested below
        assert len(ccl.data.preprocessing(name)) > 40, name
    # the words match the code: digits are scikit-learn's 0..16 pixels divided by 16
    from sklearn.datasets import load_digits

    digits = ccl.data.load("digits")
    assert digits.preprocessing == ccl.data.preprocessing("digits")
    assert "0-16, divided by 16 to [0, 1]" in digits.preprocessing
    assert torch.equal(digits.x, torch.tensor(load_digits().data / 16.0, dtype=torch.float32))
    assert ccl.data.load("synthetic", num_samples=10).preprocessing == ccl.data.preprocessing("synthetic")
    np.savez(tmp_path / "mine.npz", X=np.ones((4, 2)), y=np.arange(4) % 2)
    mine = ccl.data.load(str(tmp_path / "mine.npz"))
    assert mine.preprocessing == ccl.data.preprocessing("npz") == ccl.data.preprocessing(tmp_path / "mine.npz")
    assert "--standardize off" in mine.preprocessing and "supplied target" in mine.preprocessing
    assert "exactly as given" in ccl.data.from_arrays(np.ones((4, 2)), np.arange(4) % 2).preprocessing
    if importlib.util.find_spec("pandas") is not None:
        (tmp_path / "mine.csv").write_text("a,label\n1,x\n2,y\n")
        assert ccl.data.load(str(tmp_path / "mine.csv"), label="label").preprocessing == ccl.data.preprocessing("csv")
    if importlib.util.find_spec("PIL") is not None:
        from PIL import Image

        (tmp_path / "photos" / "cat").mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "photos" / "cat" / "1.png")
        folder = ccl.data.load(f"{tmp_path / 'photos'}/")
        assert folder.preprocessing == ccl.data.preprocessing("image_folder")
    with pytest.raises(ValueError, match="Unknown dataset 'digit'.*Did you mean 'digits'"):
        ccl.data.preprocessing("digit")


def test_report_list_prints_each_datasets_preprocessing(capsys):
    from ccl import cli

    assert cli.main(["report", "--list"]) == 0
    listing = " ".join(capsys.readouterr().out.split())  # the descriptions are wrapped over lines
    for name in ccl.data.available():
        assert f"preprocessing: {ccl.data.preprocessing(name)}" in listing, name


def test_unknown_dataset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="Unknown dataset 'cifar-10'.*cifar10.*Did you mean 'cifar10'"):
        ccl.data.load("cifar-10")


# ------------------------------------------------------------------ fixtures in the upstream formats
def _tgz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _cifar_archive(tmp_path: Path, name: str, per_batch: int = 6) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    members, xs, ys = {}, [], []
    if name == "cifar10":
        root, batches, key, classes = (
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
            "labels",
            10,
        )
    else:
        root, batches, key, classes = "cifar-100-python", ["train", "test"], "fine_labels", 100
    for b in batches:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)  # R plane, G plane, B plane, row-major
        labels = rng.integers(0, classes, per_batch).tolist()
        d = {"batch_label": b, "data": data, key: labels}
        if name == "cifar100":
            d["coarse_labels"] = [v // 5 for v in labels]
        members[f"{root}/{b}"] = pickle.dumps(d, protocol=2)
        xs.append(data)
        ys.append(labels)
    members[f"{root}/{'batches.meta' if name == 'cifar10' else 'meta'}"] = pickle.dumps({"label_names": []})
    archive = _tgz(tmp_path / ds.REMOTE[name].filename, members)
    return archive, np.concatenate(xs), np.concatenate(ys)


def _point_at(monkeypatch, name: str, archive: Path, algorithm: str | None = "md5"):
    """The real download code, fed from a local file:// URL instead of the network."""
    digest = hashlib.new(algorithm, archive.read_bytes()).hexdigest() if algorithm else None
    remote = RemoteFile(archive.name, (archive.as_uri(),), algorithm, digest)
    monkeypatch.setitem(ds.REMOTE, name, remote)
    return remote


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_download_verify_and_parse(tmp_path, monkeypatch, name):
    src = tmp_path / "src"
    src.mkdir()
    archive, raw, labels = _cifar_archive(src, name)
    _point_at(monkeypatch, name, archive)
    cache = tmp_path / "cache"
    d = ccl.data.load(name, cache=cache)
    assert (cache / archive.name).exists()
    assert d.input_shape == (3, 32, 32) and len(d) == len(labels)
    np.testing.assert_array_equal(d.y.numpy(), labels)
    mean, std = ds._CIFAR_STATS[name]
    # pixel (row 1, col 2) of image 0, green channel: offset 1024 + 32 * 1 + 2 in the row-major planes
    expected = (raw[0, 1024 + 32 + 2] / 255.0 - mean[1]) / std[1]
    assert float(d.x[0, 1, 1, 2]) == pytest.approx(expected, rel=1e-5)
    assert d.extra["num_train"] == len(labels) - (6 if name == "cifar10" else 6)
    assert d.preprocessing == ccl.data.preprocessing(name)
    assert f"mean {mean} and std {std}" in d.preprocessing and "divided by 255" in d.preprocessing


def test_wrong_checksum_is_refused_and_leaves_nothing(tmp_path, monkeypatch):
    archive, _, _ = _cifar_archive(tmp_path, "cifar10")
    remote = _point_at(monkeypatch, "cifar10", archive)
    monkeypatch.setitem(ds.REMOTE, "cifar10", RemoteFile(remote.filename, remote.urls, "md5", "0" * 32))
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError, match="md5.*0000"):
        ccl.data.load("cifar10", cache=cache)
    assert not any(cache.iterdir()) if cache.exists() else True  # no half-written or unverified file


def test_corrupt_cached_file_is_refused_with_its_path(tmp_path, monkeypatch):
    archive, _, _ = _cifar_archive(tmp_path, "cifar10")
    _point_at(monkeypatch, "cifar10", archive)
    cache = tmp_path / "cache"
    ccl.data.load("cifar10", cache=cache)
    cached = cache / archive.name
    cached.write_bytes(cached.read_bytes()[:100])  # truncated
    with pytest.raises(ChecksumError, match=str(cached)):
        ccl.data.load("cifar10", cache=cache)


def test_download_failure_says_what_to_fetch_and_where(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "cifar-10-python.tar.gz"
    monkeypatch.setitem(ds.REMOTE, "cifar10", RemoteFile(missing.name, (missing.as_uri(),), "md5", "c58f"))
    with pytest.raises(DownloadError, match=r"Fetch it by hand from .*cifar-10-python.tar.gz.*put it at") as err:
        ccl.data.load("cifar10", cache=tmp_path / "cache")
    assert str(tmp_path / "cache") in str(err.value)
    monkeypatch.setenv("CCL_DATA_DIR", str(tmp_path / "env-cache"))
    with pytest.raises(DownloadError, match="env-cache"):
        ccl.data.load("cifar10", download=False)


def test_purchase_texas_location_parsers(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    # Purchase100: CSV, label 1..100 first, then 600 binary features
    purchase = np.c_[rng.integers(1, 101, 7), rng.integers(0, 2, (7, 600))]
    csv = "\n".join(",".join(str(v) for v in row) for row in purchase) + "\n"
    _point_at(monkeypatch, "purchase100", _tgz(src / "dataset_purchase.tgz", {"dataset_purchase": csv.encode()}), None)
    # Texas100: texas/100/feats (binary CSV) and texas/100/labels (1..100)
    feats = rng.integers(0, 2, (5, 6169))
    labels = rng.integers(1, 101, 5)
    texas = {
        "texas/100/feats": ("\n".join(",".join(map(str, r)) for r in feats) + "\n").encode(),
        "texas/100/labels": ("\n".join(map(str, labels)) + "\n").encode(),
    }
    _point_at(monkeypatch, "texas100", _tgz(src / "dataset_texas.tgz", texas), None)
    # Location30: file bangkok, the label a quoted string "1".."30", then 446 binary features
    loc = np.c_[rng.integers(1, 31, 4), rng.integers(0, 2, (4, 446))]
    loc_csv = "\n".join(f'"{r[0]}",' + ",".join(map(str, r[1:])) for r in loc) + "\n"
    _point_at(monkeypatch, "location30", _tgz(src / "dataset_location.tgz", {"bangkok": loc_csv.encode()}), "sha256")

    cache = tmp_path / "cache"
    with pytest.warns(UserWarning, match="no published checksum; pinned"):
        p = ccl.data.load("purchase100", cache=cache)
    np.testing.assert_array_equal(p.y.numpy(), purchase[:, 0] - 1)
    np.testing.assert_array_equal(p.x.numpy(), purchase[:, 1:])
    assert (p.num_classes, p.input_shape) == (100, (600,))
    assert (cache / "dataset_purchase.tgz.sha256").exists()
    with pytest.warns(UserWarning):
        t = ccl.data.load("texas100", cache=cache)
    np.testing.assert_array_equal(t.y.numpy(), labels - 1)
    assert t.input_shape == (6169,)
    loc_d = ccl.data.load("location30", cache=cache)
    np.testing.assert_array_equal(loc_d.y.numpy(), loc[:, 0] - 1)
    assert (loc_d.num_classes, loc_d.input_shape) == (30, (446,))
    for name, loaded in (("purchase100", p), ("texas100", t), ("location30", loc_d)):
        assert loaded.preprocessing == ccl.data.preprocessing(name)
        assert "not scaled" in loaded.preprocessing and "--standardize on" in loaded.preprocessing

    # a second load reads the parsed cache, keyed by the archive's digest; a corrupted one is refused with its path
    assert torch.equal(ccl.data.load("purchase100", cache=cache).x, p.x)
    (parsed,) = cache.glob("purchase100.*.parsed.npz")
    digest = ccl.data.download.file_digest(cache / "dataset_purchase.tgz", "sha256")
    assert parsed.name == f"purchase100.{digest[:16]}.parsed.npz"
    good = parsed.read_bytes()
    parsed.write_bytes(good[:50])
    with pytest.raises(ccl.data.DataError, match="purchase100.*parsed.npz.*corrupt"):
        ccl.data.load("purchase100", cache=cache)
    # an edited value in the cache is refused, never used
    with np.load(io.BytesIO(good)) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["X"][0, 0] = 1 - arrays["X"][0, 0]
    with open(parsed, "wb") as fh:
        np.savez(fh, **arrays)
    with pytest.raises(ccl.data.DataError, match="does not match the digest"):
        ccl.data.load("purchase100", cache=cache)
    # a location30 archive replaced by another verified one is parsed again, not read from the old cache
    loc2 = np.c_[rng.integers(1, 31, 6), rng.integers(0, 2, (6, 446))]
    csv2 = "\n".join(f'"{r[0]}",' + ",".join(map(str, r[1:])) for r in loc2) + "\n"
    (src / "v2").mkdir()
    new = _tgz(src / "v2" / "dataset_location.tgz", {"bangkok": csv2.encode()})
    _point_at(monkeypatch, "location30", new, "sha256")  # the loader pins the new archive's digest
    (cache / "dataset_location.tgz").write_bytes(new.read_bytes())
    np.testing.assert_array_equal(ccl.data.load("location30", cache=cache).y.numpy(), loc2[:, 0] - 1)
    # the pinned digest now guards the archive: a changed archive is refused
    (cache / "dataset_purchase.tgz").write_bytes(b"something else")
    with pytest.raises(ChecksumError, match="dataset_purchase.tgz"):
        ccl.data.load("purchase100", cache=cache)


def test_malformed_archive_member_is_reported(tmp_path, monkeypatch):
    _point_at(monkeypatch, "location30", _tgz(tmp_path / "dataset_location.tgz", {"other": b"1,2"}), "sha256")
    with pytest.raises(ccl.data.DataError, match="does not contain 'bangkok'"):
        ccl.data.load("location30", cache=tmp_path / "cache")


# ------------------------------------------------------------------ splits
def test_membership_split_is_disjoint_balanced_and_deterministic(tmp_path):
    split = ccl.data.membership_split(1001, num_references=8, seed=7, population_fraction=0.2)
    members, nonmembers = split.target_members, split.target_nonmembers
    assert not np.intersect1d(members, nonmembers).size
    assert not np.intersect1d(split.pool, split.population).size
    assert len(members) == len(nonmembers) == split.pool.size // 2
    assert (split.reference_in.sum(1) == split.pool.size // 2).all()  # equal training-set sizes
    assert len(np.union1d(split.pool, split.population)) == 1001
    assert (split.reference_in.sum(0) == 4).all()  # every record IN for exactly half of the models
    assert 0.45 < split.reference_in.mean() < 0.55
    again = ccl.data.membership_split(1001, num_references=8, seed=7, population_fraction=0.2)
    for f in ("pool", "target_in", "reference_in", "population"):
        np.testing.assert_array_equal(getattr(split, f), getattr(again, f))
    other = ccl.data.membership_split(1001, num_references=8, seed=8, population_fraction=0.2)
    assert not np.array_equal(split.target_in, other.target_in)
    # raising K keeps the first models' members
    bigger = split.with_references(16)
    np.testing.assert_array_equal(bigger.reference_in[:8], split.reference_in)
    np.testing.assert_array_equal(bigger.target_in, split.target_in)
    # saved and reloaded bit for bit
    split.save(tmp_path / "split.npz")
    loaded = ccl.data.MembershipSplit.load(tmp_path / "split.npz")
    for f in ("pool", "target_in", "reference_in", "population"):
        np.testing.assert_array_equal(getattr(split, f), getattr(loaded, f))
    assert (loaded.seed, loaded.num_records) == (7, 1001)


def test_shadow_split_is_four_disjoint_parts():
    parts = ccl.data.shadow_split(1000, seed=0)
    assert [len(v) for v in parts.values()] == [250] * 4
    all_idx = np.concatenate(list(parts.values()))
    assert len(np.unique(all_idx)) == 1000
