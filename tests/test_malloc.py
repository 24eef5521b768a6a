"""`ccl._malloc.tune_heap`: glibc's mmap threshold raised for the `ccl` command, left alone when the user set it."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

import numpy as np
import pytest

from ccl import _malloc

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"),
    reason="glibc >= 2.33 (mallinfo2) needed to see the heap",
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mmapped_bytes() -> int:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2().hblkhd


@glibc
def test_tune_heap_serves_megabyte_blocks_from_the_heap(monkeypatch):
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert _malloc.tune_heap()
    before = _mmapped_bytes()
    block = np.ones(4 * 2**20 // 8)  # 4 MB: an mmap of its own under glibc's default threshold (<= 32 MB)
    assert _mmapped_bytes() - before < block.nbytes  # taken from the heap instead
    del block


@pytest.mark.parametrize(
    "name, value",
    [("MALLOC_MMAP_THRESHOLD_", "65536"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")],
)
def test_tune_heap_leaves_a_users_setting_alone(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    assert _malloc.tune_heap() is False


def test_the_cli_tunes_the_heap(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("ccl.cli.tune_heap", lambda: calls.append(1) or True)
    from ccl import cli

    assert cli.main(["report", "--list"]) == 0
    assert calls == [1]
