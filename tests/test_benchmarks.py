"""The benchmark command runs end to end at small sizes (benchmarks are not tests; this is a smoke run, marked slow:
not in the default suite, run by `python -m pytest -m slow` and .ci/run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_quick_benchmark_run_writes_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads(out.read_text())
    names = [f["name"] for f in record["figures"]]
    for prefix in (
        "loss_overhead/ccel",
        "loss_overhead/ccql",
        "loss_overhead/focal",
        "training_efficiency/",
        "stacked_training/cpu/mlp",
        "stacked_training/cpu/cnn",
        "attack_scoring/lira_online",
        "attack_scoring/rmia_peak_memory",
        "leave_one_out/lira_time",
        "leave_one_out/lira_peak_memory",
        "end_to_end/",
    ):
        assert any(n.startswith(prefix) for n in names), prefix
    for f in record["figures"]:
        assert {"value", "unit", "goal", "met"} <= set(f)
        assert f["name"] in proc.stdout
