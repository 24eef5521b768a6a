"""Your own images: a folder with one subfolder per class, each holding PNG or JPEG files.

    photos/
        cat/ 001.png 002.jpg ...
        dog/ 001.jpeg ...

Exactly what `load_image_folder` does: the classes are the subfolder names in sorted order (class `k` is
`Dataset.extra["classes"][k]`); in each, the files ending in `.png`, `.jpg` or `.jpeg` (any case) are read in
sorted order of their names (hidden files and folders, starting with `.`, and other files are skipped; nested
folders are not searched). Each image is converted to RGB (or to grayscale, `L`, with `grayscale=True`; an
alpha channel is dropped), resized to `size = (height, width)` with bilinear interpolation (aspect ratio not
kept), and scaled from 0..255 to [0, 1]. Records are `(C, H, W)` float32, `C = 3` (RGB) or 1 (grayscale), in
the order class by class, file by file; `Dataset.extra["files"]` lists their paths relative to the folder.
No normalisation by channel statistics is done.

Pillow is optional: `pip install 'ccl[images]'`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._checks import expected
from ..errors import DataError, InvalidArgumentError, InvalidArgumentTypeError, MissingDependencyError
from .datasets import Dataset

__all__ = ["IMAGE_SUFFIXES", "PREPROCESSING", "folder_digest", "image_files", "load_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_INSTALL = "pip install 'ccl[images]'"

#: What `load_image_folder` does to the images, in words (`Dataset.preprocessing`; the module's docstring in short).
PREPROCESSING = (
    "Each PNG/JPEG converted to RGB (grayscale=True: L; an alpha channel dropped), resized to size=(H, W) "
    "(default 32x32) with bilinear interpolation, aspect ratio not kept, and its pixel values 0-255 divided by 255 "
    "to [0, 1] (a 16-bit grayscale PNG: 0-65535 divided by 65535); float32 (C, H, W); no per-channel "
    "normalisation; labels 0..C-1 in the sorted order of the class folders. --standardize has no effect on images."
)


def _import_pil(path: Path) -> Any:
    try:
        from PIL import Image
    except ImportError as err:
        raise MissingDependencyError(f"Reading the images in {path} needs Pillow: {_INSTALL}.") from err
    return Image


def _folder(path: Any) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise InvalidArgumentTypeError(expected("path", "the path of a folder with one subfolder per class", path))
    folder = Path(path).expanduser()
    if not folder.exists():
        raise DataError(f"No such folder: {folder}")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; expected a folder with one subfolder of images per class.")
    return folder


def image_files(path: str | os.PathLike) -> list[tuple[str, list[Path]]]:
    """[(class name, [its image files])] in the order `load_image_folder` reads them; checks the layout.

    Raises:
        DataError: `path` is not a folder, has no class subfolders, or a class subfolder holds no PNG/JPEG.
    """
    folder = _folder(path)
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        loose = [f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        hint = f" It holds {len(loose)} image(s) directly: move them into their class's subfolder." if loose else ""
        raise DataError(
            f"{folder} has no class subfolders; expected one subfolder per class holding its images, e.g. "
            f"{folder / 'cat' / '001.png'}.{hint}"
        )
    out = []
    for d in classes:
        visible = sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith("."))
        images = [f for f in visible if f.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            others = [f.name for f in visible]
            found = f"; it holds {len(others)} other file(s), e.g. {others[:3]}" if others else ""
            raise DataError(
                f"The class folder {d} holds no PNG or JPEG image ({', '.join(IMAGE_SUFFIXES)}){found}. "
                "Add images or remove the folder."
            )
        out.append((d.name, images))
    return out


def folder_digest(path: str | os.PathLike) -> str:
    """SHA-256 of exactly what `load_image_folder` reads: every class name, file name and file content, in
    order. Any change to an image, a renamed file or class, or an added/removed image changes it (an identity
    for caches; other files in the folder do not)."""
    h = hashlib.sha256()
    for name, files in image_files(path):
        h.update(b"class\0" + name.encode() + b"\0")
        for f in files:
            h.update(b"file\0" + f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                file_hash = hashlib.sha256()
                for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                    file_hash.update(block)
            h.update(file_hash.digest())
    return h.hexdigest()


def _size(size: Any) -> tuple[int, int]:
    what = "(height, width), two positive integers such as (32, 32)"
    if isinstance(size, (str, bytes)) or not isinstance(size, Sequence) or len(size) != 2:
        raise InvalidArgumentTypeError(expected("size", what, size))
    if not all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size):
        raise InvalidArgumentTypeError(expected("size", what, size))
    if not all(s >= 1 for s in size):
        raise InvalidArgumentError(expected("size", what, size))
    return int(size[0]), int(size[1])


def _pixels(Image: Any, img: Any, grayscale: bool, size: tuple[int, int]) -> np.ndarray:
    """The image in [0, 1], resized to `size = (width, height)`: `(H, W)` grayscale or `(H, W, 3)` RGB."""
    if img.mode.startswith("I"):  # 16-bit grayscale PNG ("I;16", or "I" in older Pillow): Pillow's 8-bit conversion
        # would clip everything above 255, so scale 0..65535 to [0, 1] in floating point ("F") instead
        gray = np.asarray(img, dtype=np.float32) / 65535.0
        out = np.asarray(Image.fromarray(gray).resize(size, Image.Resampling.BILINEAR), dtype=np.float32)
        out = np.clip(out, 0.0, 1.0)
        return out if grayscale else np.repeat(out[..., None], 3, axis=2)
    if img.mode == "P":  # a palette, maybe with transparency: through RGBA, as Pillow advises
        img = img.convert("RGBA")
    img = img.convert("L" if grayscale else "RGB").resize(size, Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.float32) / 255.0


def load_image_folder(path: str | os.PathLike, *, size: tuple[int, int] = (32, 32), grayscale: bool = False) -> Dataset:
    """A user dataset from a folder of class subfolders of PNG/JPEG images; see the module's docstring for
    exactly what is done to them.

    Args:
        path: the folder (`photos/cat/*.png`, `photos/dog/*.jpg`, ...).
        size: `(height, width)` every image is resized to (bilinear).
        grayscale: one channel (`L`) instead of RGB.

    Raises:
        DataError: no class subfolders, an empty class, or an image Pillow cannot read (named).
        MissingDependencyError: Pillow is not installed.
    """
    height, width = _size(size)
    if not isinstance(grayscale, bool):
        raise InvalidArgumentTypeError(expected("grayscale", "true or false", grayscale))
    folder = _folder(path)
    Image = _import_pil(folder)
    listing = image_files(folder)
    total = sum(len(files) for _, files in listing)
    channels = 1 if grayscale else 3
    x = np.empty((total, channels, height, width), dtype=np.float32)
    y = np.empty(total, dtype=np.int64)
    names: list[str] = []
    i = 0
    for k, (_, files) in enumerate(listing):
        for f in files:
            try:
                with Image.open(f) as img:
                    img.load()
                    arr = _pixels(Image, img, grayscale, (width, height))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                raise DataError(
                    f"Cannot read the image {f} ({str(err).strip() or type(err).__name__}); is it a valid PNG or "
                    "JPEG? Remove or replace it."
                ) from None
            x[i] = arr[None] if grayscale else arr.transpose(2, 0, 1)
            y[i] = k
            names.append(f.relative_to(folder).as_posix())
            i += 1
    return Dataset(
        folder.resolve().name or str(folder),
        torch.from_numpy(x),
        torch.from_numpy(y),
        len(listing),
        (channels, height, width),
        str(folder),
        {"classes": [name for name, _ in listing], "files": names},
        preprocessing=PREPROCESSING,
    )
