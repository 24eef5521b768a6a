"""Runs that never mix: one process per run directory, per-model locks in a shared cache, stale temporaries."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import ccl
from ccl import cli
from ccl._io import atomic_path, exclusive_lock, remove_stale_temporaries
from ccl.audit import ExecutionContext, ModelCache, plan_jobs, train_group
from ccl.config import ExperimentConfig
from ccl.errors import RunLockedError
from ccl.results import load_aggregate

TINY = [
    "--dataset",
    "synthetic",
    "--data-option",
    "num_samples=160",
    "--data-option",
    "num_features=8",
    "--model-option",
    "hidden=[16]",
    "--batch-size",
    "16",
    "--bootstrap",
    "5",
    "--quiet",
]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_a_second_process_on_a_run_directory_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["compare", *TINY, "--epochs", "2", "--num-references", "2", "--out", str(out)]) == 0
    # a resume with much more work keeps the lock for a while
    argv = [
        sys.executable,
        "-m",
        "ccl",
        "compare",
        "--resume",
        "--seeds",
        "0",
        "1",
        "2",
        "3",
        "--num-references",
        "8",
        "--defenses",
        "ce",
        "focal",
        "ccel",
        "ccql",
        "--quiet",
        "--out",
        str(out),
    ]
    first = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out / ".lock").read_text().strip() == str(first.pid):
            time.sleep(0.05)
        assert (out / ".lock").read_text().strip() == str(first.pid)
        second = subprocess.run(
            [sys.executable, "-m", "ccl", "compare", "--resume", "--quiet", "--out", str(out)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 2, second.stderr
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    # the holder died: the kernel released its lock, and a resume goes on
    assert cli.main(["compare", "--resume", "--quiet", "--out", str(out)]) == 0


def test_a_model_in_a_shared_cache_is_trained_by_one_process_at_a_time(tmp_path, quiet):
    config = ExperimentConfig.from_dict(
        {
            "dataset": "synthetic",
            "dataset_options": {"num_samples": 100},
            "model_options": {"hidden": [8]},
            "num_references": 0,
            "train": {"epochs": 1},
        }
    )
    data = ccl.data.load("synthetic", num_samples=100)
    split = ccl.data.membership_split(100, seed=0)
    (job,) = plan_jobs(config, config.defenses[0], 0, split)
    cache = ModelCache(tmp_path / "cache")
    ctx = ExecutionContext(data, split.pool, False, quiet, cache)
    with (
        exclusive_lock(cache.folder(job) / ".lock", what="held"),
        pytest.raises(RunLockedError, match=f"pid {os.getpid()}"),
    ):
        train_group([job], ctx)
    assert cache.outputs(job, split.pool) is None
    train_group([job], ctx)  # free again
    assert cache.outputs(job, split.pool) is not None


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "sub").mkdir()
        stale = tmp_path / "sub" / f".outputs.npz.{dead}.abc123.tmp"
        alive = tmp_path / "sub" / f".outputs.npz.{live.pid}.def456.tmp"
        legacy = tmp_path / ".metrics.json.xyz.tmp"  # written before temporaries carried a pid
        for p in (stale, alive, legacy):
            p.write_text("partial")
        assert remove_stale_temporaries(tmp_path, recursive=True) == 2
        assert not stale.exists() and not legacy.exists() and alive.exists()
    finally:
        live.kill()
        live.wait()


def test_a_resume_cleans_what_a_killed_writer_left(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["audit", *TINY, "--epochs", "2", "--num-references", "2", "--out", str(out)]) == 0
    leftovers = [out / f".metrics.json.{_dead_pid()}.a.tmp", out / "models" / f".x.{_dead_pid()}.b.tmp"]
    for p in leftovers:
        p.write_text("partial")
    assert cli.main(["audit", "--resume", "--quiet", "--out", str(out)]) == 0
    assert not any(p.exists() for p in leftovers)
    assert not list(out.rglob("*.tmp"))


def test_files_are_written_with_the_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        with atomic_path(tmp_path / "b.txt") as tmp:
            tmp.write_text("x")
        assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_every_json_file_of_a_run_is_valid_json(tmp_path):
    """NaN is not JSON: an unresolvable metric (TPR at 0.1% FPR with 70 non-members) is written as null."""
    import json

    out = tmp_path / "run"
    assert cli.main(["audit", *TINY, "--epochs", "2", "--num-references", "2", "--out", str(out)]) == 0
    files = list(Path(out).rglob("*.json"))
    assert len(files) >= 5
    for path in files:
        text = path.read_text()
        assert "NaN" not in text and "Infinity" not in text, path
        json.loads(text)
    agg = json.loads((out / "metrics.json").read_text())
    assert agg["rows"][0]["attacks"]["loss"]["tpr@0.001"] is None
    assert np.isnan(load_aggregate(out).rows[0].metric("loss", "tpr@0.001")[0])


def test_a_killed_writer_that_is_not_reaped_yet_counts_as_dead(tmp_path):
    """A force-cancelled Ray worker is a zombie for a moment: its temporary files are stale, not a live write."""
    import subprocess
    import time

    from ccl._io import _pid_alive, remove_stale_temporaries

    child = subprocess.Popen(["sleep", "30"])
    stale = tmp_path / f".outputs.npz.{child.pid}.abc.tmp"
    stale.write_bytes(b"half")
    assert _pid_alive(child.pid) and remove_stale_temporaries(tmp_path) == 0  # a live writer's file is kept
    child.kill()
    deadline = time.monotonic() + 10
    while _pid_alive(child.pid):  # killed, not yet waited for: a zombie
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert remove_stale_temporaries(tmp_path) == 1 and not stale.exists()
    child.wait()
