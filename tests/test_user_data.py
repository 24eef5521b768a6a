"""Auditing your own model on your own data: tables (.csv, .parquet), image folders, and architectures imported
from "package.module:function"; every file is written by the test."""

from __future__ import annotations

import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch
from torch import nn

import ccl
from ccl.data import images as image_data
from ccl.errors import DataError, InvalidArgumentError, InvalidArgumentTypeError, MissingDependencyError

# ------------------------------------------------------------------ tables
# 4 rows: numeric columns, a categorical column whose values appear out of sorted order, an identifier to drop,
# and a string label.
CSV = """\
age,color,score,id,outcome
30,red,1.5,a17,yes
40,blue,2.5,b02,no
50,red,-1,c33,maybe
60,green,0,d40,yes
"""
# features: age, color=blue, color=green, color=red (sorted values, in the column's place), score
EXPECTED_X = np.array(
    [
        [30, 0, 0, 1, 1.5],
        [40, 1, 0, 0, 2.5],
        [50, 0, 0, 1, -1.0],
        [60, 0, 1, 0, 0.0],
    ],
    dtype=np.float32,
)
EXPECTED_Y = np.array([2, 1, 0, 2])  # classes sorted: maybe -> 0, no -> 1, yes -> 2
OPTIONS = {"label": "outcome", "categorical": ["color"], "drop": ["id"]}


def _check_table(d):
    assert d.x.dtype == torch.float32 and d.y.dtype == torch.int64
    np.testing.assert_array_equal(d.x.numpy(), EXPECTED_X)
    np.testing.assert_array_equal(d.y.numpy(), EXPECTED_Y)
    assert (len(d), d.num_classes, d.input_shape) == (4, 3, (5,))
    assert d.extra["classes"] == ["maybe", "no", "yes"]
    assert d.extra["features"] == ["age", "color=blue", "color=green", "color=red", "score"]


@pytest.fixture
def csv_file(tmp_path):
    pytest.importorskip("pandas")
    path = tmp_path / "patients.csv"
    path.write_text(CSV)
    return path


def test_csv_loads_to_the_expected_arrays(csv_file):
    d = ccl.data.load_table(csv_file, **OPTIONS)
    _check_table(d)
    assert d.name == "patients" and d.source == str(csv_file)
    # the same file through the registry: a name ending in .csv, and the registered name `csv` with path=
    _check_table(ccl.data.load(str(csv_file), **OPTIONS))
    _check_table(ccl.data.load("csv", path=str(csv_file), **OPTIONS))
    assert "label" in ccl.data.parameters("csv") and "csv" in ccl.data.available()


def test_parquet_loads_to_the_same_arrays(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    frame = pd.DataFrame(
        {
            "age": [30, 40, 50, 60],
            "color": ["red", "blue", "red", "green"],
            "score": [1.5, 2.5, -1.0, 0.0],
            "id": ["a17", "b02", "c33", "d40"],
            "outcome": ["yes", "no", "maybe", "yes"],
        }
    )
    path = tmp_path / "patients.parquet"
    frame.to_parquet(path)
    _check_table(ccl.data.load(str(path), **OPTIONS))
    _check_table(ccl.data.load("parquet", path=path, **OPTIONS))


def test_numeric_labels_map_in_numeric_order_and_booleans_are_numbers(tmp_path):
    pytest.importorskip("pandas")
    path = tmp_path / "n.csv"
    path.write_text("flag,x,y\nTrue,1,10\nFalse,2,9\nTrue,3,100\n")
    d = ccl.data.load(str(path), label="y")
    assert d.extra["classes"] == [9, 10, 100]  # numerically, not as text ("10" < "100" < "9")
    np.testing.assert_array_equal(d.y.numpy(), [1, 0, 2])
    np.testing.assert_array_equal(d.x.numpy(), [[1, 1], [0, 2], [1, 3]])


def test_table_errors_name_the_column(csv_file, tmp_path):
    with pytest.raises(DataError, match=r"patients\.csv has no label column 'label'.*'age', 'color'.*'outcome'"):
        ccl.data.load(str(csv_file), label="label")
    # a text column not declared categorical: named, with the fix
    with pytest.raises(DataError, match=r"'id' \(e\.g\. 'a17'\) are not numeric.*categorical=\['id'\]"):
        ccl.data.load(str(csv_file), label="outcome", categorical=["color"])
    with pytest.raises(DataError, match=r"'color'.*'id'.*categorical=\['color', 'id'\]"):
        ccl.data.load(str(csv_file), label="outcome")
    with pytest.raises(DataError, match=r"categorical column\(s\) 'colour' are not in the file"):
        ccl.data.load(str(csv_file), label="outcome", categorical=["colour"], drop=["id"])
    with pytest.raises(InvalidArgumentTypeError, match="`categorical`.*list of column names"):
        ccl.data.load(str(csv_file), label="outcome", categorical="color", drop=["id"])
    with pytest.raises(InvalidArgumentTypeError, match="`label`.*name of the label column.*True"):  # YAML's `yes`
        ccl.data.load(str(csv_file), label=True)
    with pytest.raises(InvalidArgumentError, match="needs the option label="):
        ccl.data.load("csv", path=str(csv_file))
    with pytest.raises(InvalidArgumentError, match=r"Unknown dataset option 'lable'.*patients\.csv"):
        ccl.data.load(str(csv_file), lable="outcome")
    # missing values: the column and the count, never filled in
    nan = tmp_path / "nan.csv"
    nan.write_text("a,b,c\n1,,x\n2,5,\n3,,y\nNA,1,x\n")
    missing = r"nan\.csv: column 'a' has 1 missing value \(the first on line 5\); column 'b' has 2 missing values"
    with pytest.raises(DataError, match=missing):
        ccl.data.load(str(nan), label="c")
    # ... unless the column is dropped; the label column's missing value still counts
    with pytest.raises(DataError, match=r"column 'c' has 1 missing value \(the first on line 3\)") as err:
        ccl.data.load(str(nan), label="c", drop=["b"])
    assert "'b'" not in str(err.value)
    with pytest.raises(DataError, match=r"absent\.csv"):
        ccl.data.load(str(tmp_path / "absent.csv"), label="c")


def test_missing_pandas_names_the_extra(csv_file, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ccl\[tables\]'"):
        ccl.data.load(str(csv_file), label="outcome")


# ------------------------------------------------------------------ image folders
def _write_images(root, Image):
    """2 classes x 3 solid-colour images of different sizes; class 'cat' in PNG, class 'dog' mixed."""
    (root / "dog").mkdir(parents=True)
    (root / "cat").mkdir()
    (root / "notes.txt").write_text("not a class")
    for i, size in enumerate([(10, 20), (40, 30), (32, 32)]):
        Image.new("RGB", size, (255, 0, 102)).save(root / "cat" / f"{i}.png")
    Image.new("RGB", (50, 25), (0, 255, 51)).save(root / "dog" / "a.png")
    Image.new("RGB", (16, 16), (0, 255, 51)).save(root / "dog" / "b.jpg", quality=95)
    Image.new("L", (7, 9), 51).save(root / "dog" / "c.JPEG", quality=95)  # grayscale file, loaded as RGB
    (root / "dog" / ".hidden.png").write_bytes(b"skipped")
    (root / "dog" / "readme.md").write_text("skipped")


def test_image_folder_shapes_labels_and_scaling(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "photos"
    _write_images(root, Image)
    d = ccl.data.load_image_folder(root)
    assert (len(d), d.num_classes, d.input_shape, tuple(d.x.shape)) == (6, 2, (3, 32, 32), (6, 3, 32, 32))
    assert d.x.dtype == torch.float32 and d.y.tolist() == [0, 0, 0, 1, 1, 1]
    assert d.extra["classes"] == ["cat", "dog"]
    assert d.extra["files"] == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/a.png", "dog/b.jpg", "dog/c.JPEG"]
    # PNG is lossless: exactly the colour / 255, in (C, H, W) order
    for i in range(3):
        np.testing.assert_allclose(d.x[i, :, 5, 7].numpy(), [1.0, 0.0, 0.4], atol=1e-6)
    np.testing.assert_allclose(d.x[3, :, 0, 0].numpy(), [0.0, 1.0, 0.2], atol=1e-6)
    np.testing.assert_allclose(d.x[4].mean((1, 2)).numpy(), [0.0, 1.0, 0.2], atol=0.03)  # JPEG: lossy
    np.testing.assert_allclose(d.x[5].numpy(), 0.2, atol=0.03)  # grey replicated to 3 channels
    assert float(d.x.min()) >= 0.0 and float(d.x.max()) <= 1.0
    # registered name with path=, a name ending in "/", grayscale and another size (height, width)
    g = ccl.data.load("image_folder", path=root, size=(8, 12), grayscale=True)
    assert tuple(g.x.shape) == (6, 1, 8, 12) and g.input_shape == (1, 8, 12)
    np.testing.assert_allclose(g.x[0].numpy(), (0.299 * 255 + 0.114 * 102) / 255, atol=0.01)  # Pillow's L
    assert torch.equal(ccl.data.load(str(root) + "/").x, d.x)
    assert image_data.folder_digest(root) == image_data.folder_digest(root)
    # a 16-bit grayscale PNG is scaled from 0..65535 (Pillow's own 8-bit conversion would clip it to 1.0)
    deep = tmp_path / "deep" / "only"
    deep.mkdir(parents=True)
    Image.fromarray(np.full((6, 6), 32768, dtype=np.uint16)).save(deep / "x.png")
    np.testing.assert_allclose(ccl.data.load_image_folder(deep.parent, size=(3, 3)).x.numpy(), 0.5, atol=1e-4)


def test_image_folder_errors_name_the_folder_or_file(tmp_path, monkeypatch):
    Image = pytest.importorskip("PIL.Image")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "x.png")
    with pytest.raises(DataError, match=r"flat has no class subfolders.*holds 1 image\(s\) directly"):
        ccl.data.load("image_folder", path=flat)
    root = tmp_path / "photos"
    _write_images(root, Image)
    digest = image_data.folder_digest(root)
    (root / "empty").mkdir()
    (root / "empty" / "x.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=r"empty holds no PNG or JPEG image.*x\.gif"):
        ccl.data.load_image_folder(root)
    (root / "empty" / "x.gif").unlink()
    (root / "empty").rmdir()
    assert image_data.folder_digest(root) == digest
    (root / "cat" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert image_data.folder_digest(root) != digest
    with pytest.raises(DataError, match=r"Cannot read the image .*cat/1\.png"):
        ccl.data.load_image_folder(root)
    with pytest.raises(DataError, match=r"No such folder: .*absent"):
        ccl.data.load(str(tmp_path / "absent") + "/")
    with pytest.raises(InvalidArgumentTypeError, match="`size`.*\\(height, width\\)"):
        ccl.data.load_image_folder(root, size=32)
    with pytest.raises(InvalidArgumentError, match="needs the option path="):
        ccl.data.load("image_folder")
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ccl\[images\]'"):
        ccl.data.load_image_folder(root)


# ------------------------------------------------------------------ your own architecture
USER_MODULE = '''
"""A user's models."""
import torch
from torch import nn

CONSTANT = 3


def build(*, num_classes, input_shape, seed, hidden=16):
    """A one-hidden-layer MLP."""
    build.calls.append(dict(num_classes=num_classes, input_shape=input_shape, seed=seed, hidden=hidden))
    return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


build.calls = []


class Net(nn.Module):
    def __init__(self, num_classes, input_shape):  # no seed: its weights are still seeded
        super().__init__()
        self.fc = nn.Linear(input_shape[0], num_classes)


def not_a_model(*, num_classes, input_shape, seed):
    return "a string"


def broken(*, num_classes, input_shape, seed):
    raise ValueError("hidden must be positive")
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    name = f"user_models_{uuid.uuid4().hex[:8]}"  # a fresh module each test: nothing cached in sys.modules
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_user_model_is_imported_called_and_seeded(user_module):
    name = f"{user_module}:build"
    assert ccl.models.is_user_model(name) and not ccl.models.is_user_model("mlp")
    state = torch.random.get_rng_state()
    m1 = ccl.models.create(name, num_classes=3, input_shape=(4,), seed=7, hidden=8)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    m2 = ccl.models.create(name, num_classes=3, input_shape=[4], seed=7, hidden=8)
    m3 = ccl.models.create(name, num_classes=3, input_shape=(4,), seed=8, hidden=8)
    assert all(torch.equal(a, b) for a, b in zip(_weights(m1), _weights(m2), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(_weights(m1), _weights(m3), strict=True))
    assert m1(torch.zeros(5, 4)).shape == (5, 3) and m1[1].out_features == 8
    calls = sys.modules[user_module].build.calls
    assert calls[0] == {"num_classes": 3, "input_shape": (4,), "seed": 7, "hidden": 8}
    a = ccl.models.create(f"{user_module}:Net", num_classes=2, input_shape=(5,), seed=1)
    b = ccl.models.create(f"{user_module}:Net", num_classes=2, input_shape=(5,), seed=1)
    assert torch.equal(a.fc.weight, b.fc.weight)
    assert ccl.models.describe(name) == ("A one-hidden-layer MLP.", {"hidden": 16})
    digest = ccl.models.user_model_sha256(name)
    assert isinstance(digest, str) and len(digest) == 64


def test_bad_user_model_paths_give_one_clear_error(user_module):
    cases = {
        "no_such_package_xyz.models:build": r"Cannot import the module 'no_such_package_xyz\.models'.*PYTHONPATH",
        f"{user_module}:buld": rf"module '{user_module}' .* has no attribute 'buld'.*callables: .*build",
        f"{user_module}:CONSTANT": rf"'CONSTANT' in the module '{user_module}' is a int, not a function",
        f"{user_module}:not_a_model": r"returned a builtins\.str, not a torch\.nn\.Module",
        f"{user_module}:broken": r"Cannot build model .*broken.*hidden must be positive",
        f"{user_module}:": r"`model`.*'package\.module:function'",
    }
    for path, message in cases.items():
        with pytest.raises(InvalidArgumentError, match=message):
            ccl.models.create(path, num_classes=2, input_shape=(3,), seed=0)
    with pytest.raises(InvalidArgumentError, match="cannot be called with the keywords.*width"):
        ccl.models.create(f"{user_module}:build", num_classes=2, input_shape=(3,), seed=0, width=3)
