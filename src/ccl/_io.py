"""Files that are never half-written, JSON that is always valid, and locks that name their holder.

- Atomic writes: write to a temporary file in the same folder, flush, fsync, then rename over the target, so a
  reader sees either the old complete file or the new complete file, even when the process is killed
  mid-write. The result gets the permissions the umask gives an ordinary new file (not the 0600 of `mkstemp`).
  A temporary file's name carries its writer's pid, so a later run removes only the leftovers of dead writers.
- JSON: NaN and infinities are written as `null` (bare `NaN` is not JSON); numpy scalars and arrays as numbers.
- Locks: `exclusive_lock(path)` takes an `flock` on `path` without waiting; a second process gets a
  `RunLockedError` that names the pid of the holder. The kernel drops the lock when its holder dies.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import RunDirectoryError, RunLockedError

__all__ = [
    "atomic_path",
    "exclusive_lock",
    "json_safe",
    "out_of_space",
    "remove_stale_temporaries",
    "write_bytes",
    "write_json",
    "write_text",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: How torch's writer reports a failed write (it raises RuntimeError, not OSError, on a full disk).
_TORCH_WRITE_FAILED = ("file write failed", "failed writing file", "unexpected pos")


def out_of_space(err: BaseException) -> bool:
    """Whether `err` is a write that failed for want of space (a full disk or an exhausted quota)."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _TORCH_WRITE_FAILED)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path next to `path`; on success it is renamed to `path`, on failure removed. A write that
    fails for want of space raises `RunDirectoryError` naming `path`: the old file (if any) is intact, so a run
    can be resumed once space is freed."""
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as err:
        if not out_of_space(err):
            raise
        raise RunDirectoryError(
            f"No space left on device writing {path}; free some space, then run the command again (with --resume "
            "for a run directory that holds finished work: it is kept)."
        ) from err
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs: a killed process that its parent has not reaped yet (a zombie, as a
    force-cancelled Ray worker is for a moment) has stopped writing, so it counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            state = fh.read().rsplit(b")", 1)[1].split()[0]  # the field after the command name
    except (OSError, IndexError):
        return True  # no /proc (macOS) or it just exited: alive as far as we can tell
    return state not in (b"Z", b"X")


def _writer_pid(tmp: Path) -> int | None:
    """The pid in `.NAME.PID.RANDOM.tmp`, or None for a name without one."""
    parts = tmp.name[: -len(".tmp")].rsplit(".", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def remove_stale_temporaries(folder: str | os.PathLike, *, recursive: bool = False) -> int:
    """Deletes temporary files that killed writers left in `folder` (their real files are untouched); a
    temporary file of a live process is kept. Returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for tmp in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        pid = _writer_pid(tmp)
        if pid is None or (pid != os.getpid() and not _pid_alive(pid)):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


def _write(path: str | os.PathLike, mode: str, writer: Callable[[IO], Any]) -> None:
    with atomic_path(path) as tmp, open(tmp, mode) as fh:
        writer(fh)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    _write(path, "wb", lambda fh: fh.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    _write(path, "w", lambda fh: fh.write(text))


def json_safe(obj: Any) -> Any:
    """`obj` with NaN and infinities as None, numpy scalars and arrays as Python numbers and lists, paths as
    strings, tuples as lists: what `json.dumps(..., allow_nan=False)` accepts."""
    import numpy as np

    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable")


def dumps_json(obj: Any) -> str:
    """Valid, deterministic JSON text (sorted keys, NaN as null)."""
    return json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, dumps_json(obj))


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, what: str) -> Iterator[None]:
    """Holds an exclusive, non-blocking `flock` on `path` (created if needed) while the block runs. If another
    process holds it, raises `RunLockedError` naming `what` and the holder's pid."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunLockedError(
                f"{what} is in use by another ccl process (pid {holder}; lock file {path}). Wait for it to finish "
                "or stop it; two processes must not write the same run."
            ) from None
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, str(os.getpid()).encode(), 0)  # the holder's name, for the message above
        except OSError as err:
            if not out_of_space(err):
                raise
            raise RunDirectoryError(f"No space left on device writing {path}; free some space and try again.") from None
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
