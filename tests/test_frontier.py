"""Sweeps, the privacy-utility frontier and its verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from ccl import cli
from ccl.audit import plan_jobs
from ccl.config import ConfigError, ExperimentConfig, expand_defense
from ccl.data import membership_split
from ccl.summary import FrontierPoint, family_verdicts, frontier


def labels(spec):
    return [d.label for d in expand_defense(spec)]


def test_sweeps_expand_lists_ranges_and_products():
    assert labels("ccel:alpha=[0.1,0.5,0.9]") == ["ccel(alpha=0.1)", "ccel(alpha=0.5)", "ccel(alpha=0.9)"]
    assert labels("ccel:alpha=0.1..0.9/5") == [f"ccel(alpha={a})" for a in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert labels("ccel:alpha=[0.1,0.5],beta=[1,2]") == [
        "ccel(alpha=0.1,beta=1)",
        "ccel(alpha=0.1,beta=2)",
        "ccel(alpha=0.5,beta=1)",
        "ccel(alpha=0.5,beta=2)",
    ]
    assert labels({"loss": "dpsgd", "params": {"epsilon": [1, 4, 16]}, "train": {"lr": 0.5}}) == [
        "dpsgd(epsilon=1)@lr=0.5",
        "dpsgd(epsilon=4)@lr=0.5",
        "dpsgd(epsilon=16)@lr=0.5",
    ]
    assert labels("ccel:alpha=0.3") == ["ccel(alpha=0.3)"]
    config = ExperimentConfig.from_dict({"defenses": ["ce", "relaxloss:alpha=[0.5,1]"]})
    assert [d.label for d in config.defenses] == ["ce", "relaxloss(alpha=0.5)", "relaxloss(alpha=1)"]
    assert {d.family for d in config.defenses} == {"ce", "relaxloss"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ccel:alpha=[]", "non-empty list"),
        ("ccel:alpha=0.1..0.9", "LOW..HIGH/COUNT"),
        ("ccel:alpha=0.1..0.9/1", "COUNT >= 2"),
        ("ccel:alpha=a..b/3", "numbers"),
        ("ccel:alpha=[0.1,0.1]", "distinct"),
        ("ccel:alpha=[0.1,2]", "`alpha`.*2"),
        ("ccel:alpha", "NAME:key=value"),
    ],
)
def test_malformed_sweeps_are_refused_with_the_spec_named(spec, message):
    with pytest.raises(ConfigError, match=message):
        expand_defense(spec)


def test_every_point_of_a_sweep_has_its_own_cache_keys():
    config = ExperimentConfig.from_dict(
        {"dataset": "synthetic", "defenses": ["ccel:alpha=[0.1,0.5]"], "num_references": 2}
    )
    split = membership_split(1000, num_references=2, seed=0)
    keys = [{j.key for j in plan_jobs(config, d, 0, split)} for d in config.defenses]
    assert len(keys[0]) == len(keys[1]) == 3 and not keys[0] & keys[1]
    single = ExperimentConfig.from_dict({"dataset": "synthetic", "defenses": ["ccel:alpha=0.5"], "num_references": 2})
    assert {j.key for j in plan_jobs(single, single.defenses[0], 0, split)} == keys[1]  # a point is a point


def brute_pareto(points: dict[str, tuple[float, float]]) -> set[str]:
    out = set()
    for d, (a, lk) in points.items():
        if not any(a2 >= a and l2 <= lk and (a2, l2) != (a, lk) for e, (a2, l2) in points.items() if e != d):
            out.add(d)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_pareto_marking_equals_a_brute_force(seed):
    rng = np.random.default_rng(seed)
    points = {f"d{i}": (float(rng.integers(0, 5)) / 4, float(rng.integers(0, 5)) / 4) for i in range(12)}  # ties
    assert set(frontier(points)) == brute_pareto(points)


def point(defense, family, acc, leak, acc_half=0.01, leak_half=0.01):
    return FrontierPoint(
        defense, family, "lira", acc, (acc - acc_half, acc + acc_half), leak, (leak - leak_half, leak + leak_half)
    )


def test_verdicts_say_dominated_only_where_the_intervals_separate():
    points = [
        point("a1", "a", 0.9, 0.10),
        point("a2", "a", 0.8, 0.05),
        point("b1", "b", 0.7, 0.20),
        point("c1", "c", 0.895, 0.102),
    ]
    verdicts = family_verdicts(points)
    assert verdicts["a"].startswith("on the frontier at test accuracy 80.0-90.0%")
    assert verdicts["b"].startswith("dominated by a")
    assert verdicts["c"].startswith("indistinguishable")  # within a1's intervals


@pytest.mark.slow
def test_a_sweep_run_writes_a_frontier_plot_and_verdicts(tmp_path):
    out = tmp_path / "run"
    argv = [
        "compare",
        "--dataset",
        "synthetic",
        "--data-option",
        "num_samples=240",
        "--model-option",
        "hidden=[16]",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--bootstrap",
        "10",
        "--num-references",
        "4",
        "--quiet",
        "--defenses",
        "ce",
        "ccel:alpha=[0.2,0.8]",
        "early_stop:epochs=[1,2]",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    assert (out / "plots" / "frontier.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    for family in ("ce", "ccel", "early_stop"):
        assert f"<b>{family}</b>:" in html
    assert "the frontier is held by" in html or "No family holds the frontier alone" in html
    for leakage in ("auc", "epsilon_lb"):
        assert cli.main(["report", str(out), "--leakage", leakage]) == 0


# ------------------------------------------------------------------ ccl tune
from ccl.tune import Target, TunePoint, parse_target, search  # noqa: E402


def test_targets_parse_and_bad_ones_are_named():
    assert parse_target("lira:tpr@0.01<=0.05") == Target("lira", "tpr@0.01", 0.05)
    assert parse_target("auc<=0.6") == Target(None, "auc", 0.6)
    assert parse_target(" epsilon_lb <= 1 ") == Target(None, "epsilon_lb", 1.0)
    with pytest.raises(ConfigError, match="`target`"):
        parse_target("lira:auc>0.6")


@pytest.mark.parametrize("increasing", [True, False])
def test_tune_finds_the_boundary_of_a_monotone_leakage_and_honours_the_upper_bound(increasing):
    """Leakage rises (or falls) with the parameter, accuracy rises with leakage; the bound is leakage + 0.02."""
    calls: list[float] = []

    def leak(v):
        return v if increasing else 1 - v

    def evaluate(values):
        calls.extend(values)
        return [TunePoint(v, f"d({v})", 0.5 + 0.4 * leak(v), leak(v), leak(v) + 0.02, "lira") for v in values]

    target = Target(None, "auc", 0.52)
    chosen, points = search(evaluate, 0.0, 1.0, target, steps=6)
    assert len(calls) == len(set(calls))  # no setting is evaluated twice (nothing retrained)
    assert chosen is not None and chosen.upper <= 0.52  # the upper bound meets the target, not just the mean
    assert abs(leak(chosen.value) - 0.50) <= 1 / 2**6 + 1e-9  # the boundary, to the bisection's resolution
    assert all(p.accuracy <= chosen.accuracy for p in points if p.meets(target))
    none, _ = search(evaluate, 0.0, 1.0, Target(None, "auc", 0.0), steps=2, grid=3)
    assert none is None


def test_tune_end_to_end_reuses_the_run_and_saves_its_evidence(tmp_path):
    import json

    out = tmp_path / "tune"
    argv = [
        "tune",
        "--dataset",
        "synthetic",
        "--data-option",
        "num_samples=240",
        "--model-option",
        "hidden=[16]",
        "--epochs",
        "3",
        "--batch-size",
        "16",
        "--bootstrap",
        "10",
        "--num-references",
        "4",
        "--quiet",
        "--defense",
        "early_stop",
        "--param",
        "epochs",
        "--range",
        "1..3",
        "--target",
        "auc<=0.99",
        "--steps",
        "1",
        "--out",
        str(out),
    ]
    assert cli.main(argv) == 0
    evidence = json.loads((out / "tune.json").read_text())
    assert evidence["chosen"] is not None and len(evidence["points"]) >= 2
    models = {p.name for p in (out / "models").iterdir() if p.is_dir() and p.name != "stacked"}
    assert len(models) == len(evidence["points"]) * 5  # every setting's target and 4 references, none twice


def test_a_frontier_label_drops_the_family_and_shortens_a_long_recipe_of_its_own():
    from ccl.report import _point_label

    assert _point_label("ccel(alpha=0.5)", "ccel") == "alpha=0.5"
    assert _point_label("ce", "ce") == "ce"
    assert _point_label("ce@lr=0.02", "ce") == "@lr=0.02"
    assert _point_label("dpsgd(epsilon=16)@lr=[0.1,0.5,2.0],momentum=0.0", "dpsgd") == "epsilon=16@own recipe"
