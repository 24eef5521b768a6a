"""benchmarks/reproduce.py: a run inside its expected ranges passes, a doctored one fails naming each number
outside, and bad input exits 2. The fast tests build runs' metrics.json by hand (the real `Aggregate` format);
the slow one checks the checker on a run that `ccl compare` made, then on the same run doctored."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from ccl.cli import main as ccl_main
from ccl.results import Aggregate, AggregateRow, load_aggregate, write_aggregate

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reproduce", ROOT / "benchmarks" / "reproduce.py")
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)

METRICS = ("auc", "advantage", "tpr@0.001", "tpr@0.01")


def _attack(auc: float, tpr1: float, tpr01: float, spread: float = 0.01) -> dict[str, float]:
    values = {"auc": auc, "advantage": 2 * (auc - 0.5), "tpr@0.01": tpr1, "tpr@0.001": tpr01}
    return values | {f"{k}_std": spread for k in values}


def _row(label: str, acc: float, attacks: dict[str, dict[str, float]]) -> AggregateRow:
    values = {"test_acc": acc, "test_acc_std": 0.005, "train_acc": 1.0, "train_acc_std": 0.0}
    return AggregateRow(label, label, [0, 1], values, attacks, {"pooled": attacks})


def _write_run(folder: Path, *, ce_acc: float = 0.60, lira_auc: float = 0.80) -> Path:
    rows = [
        _row("ce", ce_acc, {"loss": _attack(0.70, 0.05, 0.01), "lira": _attack(lira_auc, 0.20, 0.08)}),
        _row("ccel(alpha=0.5)", 0.55, {"loss": _attack(0.66, 0.04, 0.01), "lira": _attack(0.75, 0.15, 0.05)}),
    ]
    write_aggregate(folder, Aggregate(rows=rows, fprs=[0.001, 0.01], num_results=4))
    return folder


def _ranges(run: Path, path: Path) -> Path:
    assert reproduce.main([str(run), "--write", str(path), "--command", "ccl compare ..."]) == 0
    return path


def test_a_run_is_inside_the_ranges_made_from_it(tmp_path, capsys):
    run = _write_run(tmp_path / "run")
    expected = _ranges(run, tmp_path / "expected.json")
    assert reproduce.main([str(run), str(expected)]) == 0
    out = capsys.readouterr().out
    assert "8 of 8 numbers inside their expected ranges" in out and "OUTSIDE" not in out


def test_a_doctored_run_fails_naming_each_number_outside_its_range(tmp_path, capsys):
    expected = _ranges(_write_run(tmp_path / "run"), tmp_path / "expected.json")
    doctored = _write_run(tmp_path / "doctored", ce_acc=0.50, lira_auc=0.90)
    assert reproduce.main([str(doctored), str(expected)]) == 1
    out = capsys.readouterr().out
    assert "OUTSIDE ce test_acc = 0.500, expected 0.580-0.620" in out
    assert "OUTSIDE ce auc = 0.900, expected 0.770-0.830" in out
    assert "OUTSIDE ccel" not in out and "6 of 8 numbers inside" in out


def test_attack_numbers_are_the_worst_case_over_the_attacks_run(tmp_path):
    agg = load_aggregate(_write_run(tmp_path / "run"))
    measured = reproduce.measure(agg.rows[0], "pooled")
    assert measured["auc"] == {"mean": 0.80, "std": 0.01, "attack": "lira"}
    assert measured["test_acc"]["mean"] == 0.60


def test_the_range_is_three_standard_deviations_or_the_floor_clipped_to_0_1():
    assert reproduce.expected_range(0.5, 0.02, 0.02) == pytest.approx((0.44, 0.56))
    assert reproduce.expected_range(0.5, 0.001, 0.02) == pytest.approx((0.48, 0.52))
    assert reproduce.expected_range(0.99, math.nan, 0.02) == pytest.approx((0.97, 1.0))
    assert reproduce.expected_range(0.0, 0.01, 0.01) == pytest.approx((0.0, 0.03))


def test_bad_input_exits_2_with_the_reason(tmp_path, capsys):
    run = _write_run(tmp_path / "run")
    expected = _ranges(run, tmp_path / "expected.json")
    raw = json.loads(expected.read_text())
    raw["defenses"]["hamp"] = raw["defenses"]["ce"]
    (tmp_path / "more.json").write_text(json.dumps(raw))
    assert reproduce.main([str(run), str(tmp_path / "more.json")]) == 2
    assert "no results for ['hamp']" in capsys.readouterr().err
    raw["defenses"].pop("hamp")
    raw["attacks"] = ["lira", "loss", "rmia"]
    (tmp_path / "rmia.json").write_text(json.dumps(raw))
    assert reproduce.main([str(run), str(tmp_path / "rmia.json")]) == 2
    assert "lacks the attacks ['rmia']" in capsys.readouterr().err
    assert reproduce.main([str(tmp_path / "nowhere"), str(expected)]) == 2
    assert "the run has not finished" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert reproduce.main([str(run), str(tmp_path / "bad.json")]) == 2


@pytest.mark.parametrize("name", ["demo", "location30"])
def test_the_stored_expected_ranges_are_well_formed(name):
    raw = json.loads((ROOT / "benchmarks" / "expected" / f"{name}.json").read_text())
    assert raw["evaluation"] == "pooled" and raw["command"] and raw["defenses"]
    for label, numbers in raw["defenses"].items():
        assert set(numbers) == set(reproduce.NUMBERS), label
        for number, entry in numbers.items():
            if math.isfinite(entry["mean"]):
                assert entry["low"] <= entry["mean"] <= entry["high"], (label, number)


@pytest.mark.slow
def test_the_checker_on_a_run_of_ccl_compare_and_on_the_same_run_doctored(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["compare", "--dataset", "digits", "--defenses", "ce", "ccel:alpha=0.5", "--epochs", "3",
            "--num-references", "4", "--population-fraction", "0.5", "--bootstrap", "0", "--attacks", "loss",
            "lira", "--seeds", "0", "1", "--quiet", "--out", str(run)]  # fmt: skip
    assert ccl_main(argv) == 0
    expected = _ranges(run, tmp_path / "expected.json")
    assert reproduce.main([str(run), str(expected)]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    for attack in metrics["rows"][1]["evaluations"]["pooled"].values():  # every attack against ccel, doctored
        attack["auc"] += 0.2
    (run / "metrics.json").write_text(json.dumps(metrics))
    capsys.readouterr()
    assert reproduce.main([str(run), str(expected)]) == 1
    assert "OUTSIDE ccel(alpha=0.5) auc" in capsys.readouterr().out


def test_the_readme_location30_table_is_the_run_of_the_expected_file():
    section = (ROOT / "README.md").read_text().split("### Location30, on the real data", 1)[1].split("\n### ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ") and "% ±" in line]
    expected = json.loads((ROOT / "benchmarks" / "expected" / "location30.json").read_text())["defenses"]
    by_label = {label.split("@lr=[")[0]: numbers for label, numbers in expected.items()}
    assert len(rows) == len(expected) == 17
    for cells in rows:
        label, acc, auc = cells[0].strip(), cells[2].split("%")[0], cells[4].split("±")[0]
        assert float(acc) == pytest.approx(100 * by_label[label]["test_acc"]["mean"], abs=0.051), label
        assert float(auc) == pytest.approx(by_label[label]["auc"]["mean"], abs=0.00051), label
