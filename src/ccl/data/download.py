"""Downloads into a cache directory, verified by checksum before use, never left half-written.

The cache directory is, in order: the `cache_dir` argument (the CLI's `--data-dir`), the environment variable
`CCL_DATA_DIR`, or `~/.cache/ccl`. A file is downloaded to a temporary name, its checksum checked, and only
then renamed into place. Where no published checksum exists (the Purchase100 and Texas100 archives), the
SHA-256 of the first download is pinned next to the file (`<file>.sha256`, trust on first use) and every later
use is checked against it; pass `sha256=` to check against a digest you trust instead.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

from .._io import atomic_path, write_text
from ..errors import CclError

__all__ = ["ChecksumError", "DownloadError", "RemoteFile", "cache_dir", "fetch", "file_digest"]

ENV_VAR = "CCL_DATA_DIR"


class DownloadError(CclError, RuntimeError):
    """A file could not be downloaded; the message says which file to fetch by hand and where to put it."""


class ChecksumError(CclError, ValueError):
    """A file's checksum differs from the expected one; the file is refused."""


@dataclass(frozen=True)
class RemoteFile:
    """A file to download: its name in the cache, URLs to try, and its checksum (`algorithm`, hex digest)."""

    filename: str
    urls: tuple[str, ...]
    algorithm: str | None = None  # "md5" or "sha256"; None: pin the SHA-256 on first download
    digest: str | None = None


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache directory (argument, then `$CCL_DATA_DIR`, then `~/.cache/ccl`)."""
    if path is None:
        path = os.environ.get(ENV_VAR) or Path.home() / ".cache" / "ccl"
    return Path(path).expanduser()


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, remote: RemoteFile, sha256: str | None, pin: Path) -> None:
    checks = []
    if remote.algorithm and remote.digest:
        checks.append((remote.algorithm, remote.digest))
    if sha256:
        checks.append(("sha256", sha256.lower()))
    if not checks and pin.exists():
        checks.append(("sha256", pin.read_text().split()[0]))
    for algorithm, want in checks:
        got = file_digest(path, algorithm)
        if got != want:
            raise ChecksumError(
                f"Refusing {pin.with_suffix('')}: its {algorithm} is {got}, but {want} was expected. The file is "
                f"corrupt, truncated or not the published {remote.filename}; delete it and download it again."
            )
    if not checks:
        digest = file_digest(path, "sha256")
        write_text(pin, f"{digest}  {remote.filename}\n")
        warnings.warn(
            f"{remote.filename} has no published checksum; pinned its SHA-256 {digest} in {pin}. "
            "Later uses are checked against it.",
            stacklevel=3,
        )


def fetch(
    remote: RemoteFile, *, cache: str | os.PathLike | None = None, sha256: str | None = None, download: bool = True
) -> Path:
    """Returns the verified local path of `remote`, downloading it first if needed.

    Raises:
        DownloadError: the file is missing and could not be downloaded (the message says where to put it).
        ChecksumError: the file's checksum is wrong (the file is kept for inspection but refused).
    """
    path = cache_dir(cache) / remote.filename
    pin = path.with_name(path.name + ".sha256")
    if not path.exists():
        if not download:
            raise DownloadError(_manual_hint(remote, path, "downloads are turned off"))
        errors = []
        for url in remote.urls:
            try:
                with atomic_path(path) as tmp:
                    with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                        shutil.copyfileobj(response, out)
                    _verify(tmp, remote, sha256, pin)  # verified before it gets its real name
                break
            except ChecksumError:
                raise
            except (urllib.error.URLError, OSError, TimeoutError) as err:
                errors.append(f"{url}: {err}")
        else:
            raise DownloadError(_manual_hint(remote, path, "; ".join(errors)))
        return path
    _verify(path, remote, sha256, pin)
    return path


def _manual_hint(remote: RemoteFile, path: Path, why: str) -> str:
    check = f" ({remote.algorithm} {remote.digest})" if remote.digest else ""
    return (
        f"Could not download {remote.filename} ({why}). Fetch it by hand from {remote.urls[0]}{check} and put it "
        f"at {path} (or set {ENV_VAR} to the folder that holds it)."
    )
