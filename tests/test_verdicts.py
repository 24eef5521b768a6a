"""Verdicts relative to the undefended model: practical thresholds, flags, the frontier, the headline in words."""

from __future__ import annotations

import io
import math

import pytest

from ccl import cli
from ccl.audit.plan import result_key
from ccl.config import ConfigError, ExperimentConfig
from ccl.results import DefenseResult
from ccl.summary import (
    Comparison,
    FrontierPoint,
    Headline,
    _flags,
    family_verdicts,
    headline_sentences,
    judge,
    load_summary,
)


def comparison(acc=(0.0, 0.0), auc=(0.0, 0.0), tpr=(0.0, 0.0), name="ccel(alpha=0.5)") -> Comparison:
    mid = [sum(ci) / 2 for ci in (acc, auc, tpr)]
    return Comparison(name, "lira", 0.85 + mid[0], 0.7 + mid[1], 0.03 + mid[2], *mid, acc, auc, tpr)


@pytest.mark.parametrize(
    ("intervals", "leakage", "cost"),
    [
        ({"auc": (-0.05, -0.02)}, "less", "indistinguishable accuracy"),
        ({"auc": (-0.05, -0.005)}, "indistinguishable", "indistinguishable accuracy"),  # within 0.01 of no change
        ({"tpr": (-0.03, -0.015)}, "less", "indistinguishable accuracy"),  # beyond 1 point of TPR
        ({"auc": (0.02, 0.04)}, "more", "indistinguishable accuracy"),
        ({"auc": (-0.05, -0.02), "tpr": (0.02, 0.03)}, "mixed", "indistinguishable accuracy"),
        ({"acc": (-0.05, -0.02)}, "indistinguishable", "costs accuracy"),
        ({"acc": (0.015, 0.02)}, "indistinguishable", "gains accuracy"),
        ({"acc": (-0.05, 0.01), "auc": (math.nan, math.nan)}, "indistinguishable", "indistinguishable accuracy"),
    ],
)
def test_a_change_counts_only_when_its_interval_lies_beyond_the_practical_threshold(intervals, leakage, cost):
    c = judge(comparison(**intervals))
    assert (c.leakage, c.cost) == (leakage, cost)
    assert c.no_effect == (leakage == "indistinguishable" and cost == "indistinguishable accuracy")


def test_the_thresholds_can_be_set():
    c = comparison(auc=(-0.05, -0.02))
    assert judge(c, {"auc": 0.1}).leakage == "indistinguishable"
    assert judge(c, {"auc": 0.0}).leakage == "less"
    assert judge(comparison(acc=(-0.05, -0.02)), {"accuracy": 10}).cost == "indistinguishable accuracy"


def test_a_setting_with_no_effect_is_never_on_the_frontier():
    points = [
        FrontierPoint("ce", "ce", "lira", 0.88, (0.87, 0.89), 0.74, (0.73, 0.75)),
        FrontierPoint("ccel(alpha=0.5)", "ccel", "lira", 0.885, (0.875, 0.895), 0.738, (0.728, 0.748)),
        FrontierPoint("relaxloss(alpha=1)", "relaxloss", "rmia", 0.71, (0.70, 0.72), 0.62, (0.61, 0.63)),
    ]
    plain = family_verdicts(points)
    assert plain["ccel"].startswith("on the frontier")  # by means it is: more accurate, less leaky
    verdicts = family_verdicts(points, no_effect={"ccel(alpha=0.5)"})
    assert verdicts["ccel"] == "no measurable effect against the baseline (every setting)"
    assert verdicts["ce"].startswith("on the frontier") and verdicts["relaxloss"].startswith("on the frontier")


def result(name: str, seed: int, acc: float, majority: float | None) -> DefenseResult:
    counts = (4, 10, 10, 10)  # references, members, non-members, population
    return DefenseResult(name, name, {"loss": name}, seed, "k", 1.0, acc, 0, 0, 0, 0, 0, *counts, [0.01], {},
                         majority_rate=majority)


def test_a_model_at_the_majority_class_rate_is_flagged(tmp_path):
    at_majority = [(result("d", s, 0.305, 0.31), result("ce", s, 0.9, 0.31)) for s in (0, 1)]
    assert _flags(tmp_path, at_majority) == ["learnt nothing"]  # no scores stored: nothing else to compare
    learnt = [(result("d", s, 0.6, 0.31), result("ce", s, 0.9, 0.31)) for s in (0, 1)]
    assert _flags(tmp_path, learnt) == []
    assert _flags(tmp_path, [(result("d", 0, 0.1, None), result("ce", 0, 0.9, None))]) == []  # older results


def test_the_headline_in_words_says_who_leaks_less_at_what_cost_and_who_changes_nothing():
    cut = judge(comparison(acc=(-0.05, -0.02), auc=(-0.1, -0.05), tpr=(-0.03, -0.02), name="relaxloss(alpha=0.5)"))
    same = [judge(comparison(name=f"ccel(alpha={a})")) for a in (0.2, 0.8)]
    acted_not = judge(comparison(name="ccel(alpha=1)"))
    acted_not.flags = ["never acted"]
    h = Headline("ce", "lira", {"accuracy": 0.885, "auc": 0.733, "tpr": 0.036}, 0.001, "m", "pooled",
                 [cut, *same, acted_not], [])
    h.lowest_fpr = 0.001
    words = headline_sentences(h, one_seed=True)
    assert words[0].startswith("The undefended model (ce) leaks: lira finds 3.6% of its members at 0.1% false")
    assert any(w.startswith("relaxloss(alpha=0.5) cuts that to") and "3.5 points of accuracy" in w for w in words)
    assert "ccel(alpha=1) never acted (its models equal the baseline's): not a frontier point." in words
    assert not any("No ccel setting" in w for w in words)  # one ccel setting is flagged, not "no effect"
    assert words[-1].startswith("With one seed, the intervals cover the choice of records and models")
    h.comparisons = [cut, *same]
    assert "No ccel setting (2 tried) changes leakage or accuracy measurably." in headline_sentences(h, one_seed=False)
    h.fpr = 0.01  # the lowest FPR is not resolved: said, and the next one is used
    assert any("TPR at 0.1% FPR is not resolved by every result, so 1% is used" in w for w in headline_sentences(
        h, one_seed=False))


def test_ccel_at_alpha_one_is_ce_and_is_flagged_as_never_acting(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main([
        "compare", "--dataset", "synthetic", "--data-option", "num_samples=200", "--model-option", "hidden=[16]",
        "--epochs", "3", "--batch-size", "16", "--lr", "0.05", "--num-references", "4", "--bootstrap", "20",
        "--defenses", "ce", "ccel:alpha=1", "--min-effect", "auc=0.02,accuracy=2", "--quiet", "--out", str(out),
    ]) == 0
    summary = load_summary(out)
    (c,) = summary.headline.comparisons
    assert c.flags == ["never acted"] and c.verdict == "never acted: its models equal the baseline's"
    assert "ccel(alpha=1)" not in summary.optimal and "ccel(alpha=1)" not in summary.headline.frontier
    assert summary.verdicts["ccel"] == "no measurable effect against the baseline (every setting)"
    printed = capsys.readouterr().out
    assert "ccel(alpha=1) never acted" in printed and "ccel(alpha=1): never acted" in printed
    html = (out / "report.html").read_text()
    assert "class=v-none>never acted" in html and "The undefended model (ce) leaks" in html


def test_min_effect_is_checked_and_never_changes_a_result_key():
    base = {"dataset": "digits", "num_references": 4}
    plain = ExperimentConfig.from_dict(base)
    strict = ExperimentConfig.from_dict({**base, "min_effect": {"auc": 0.05}})
    assert result_key(plain, plain.defenses[0], 0) == result_key(strict, strict.defenses[0], 0)
    assert "min_effect" not in plain.to_dict() and strict.to_dict()["min_effect"] == {"auc": 0.05}
    with pytest.raises(ConfigError, match="min_effect key"):
        ExperimentConfig.from_dict({**base, "min_effect": {"auroc": 0.05}})
    with pytest.raises(ConfigError, match="min_effect accuracy"):
        ExperimentConfig.from_dict({**base, "min_effect": {"accuracy": -1}})


def test_tune_names_its_target_and_choice_sorts_its_settings_and_prints_the_summary(tmp_path, capsys):
    import re

    out = tmp_path / "tune"
    argv = [
        "tune", "--dataset", "synthetic", "--data-option", "num_samples=200", "--model-option", "hidden=[16]",
        "--epochs", "3", "--batch-size", "16", "--bootstrap", "10", "--num-references", "4", "--quiet",
        "--defense", "early_stop", "--param", "epochs", "--range", "1..3", "--target", "auc<=0.99", "--steps", "1",
        "--out", str(out),
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "Target: auc<=0.99" in printed and "Chosen: early_stop(epochs=" in printed and "Summary (" in printed
    settings = re.findall(r"^early_stop\(epochs=(\d+)\)", printed, re.M)
    assert settings == sorted(settings, key=int) and len(settings) >= 2
    html = (out / "report.html").read_text()
    assert "<h2>Tune</h2>" in html and "<code>auc&lt;=0.99</code>" in html and "chosen: <b>early_stop(epochs=" in html


def test_the_report_says_why_only_the_single_target_evaluation_ran():
    from ccl.report import _why_single_target

    assert "trained elsewhere" in _why_single_target({"target_checkpoint": "m.pt", "num_references": 8})
    assert "--leave-one-out off" in _why_single_target({"leave_one_out": False, "num_references": 8})
    assert "this run has 2" in _why_single_target({"leave_one_out": "auto", "num_references": 2})


def test_warnings_print_on_their_own_line_when_a_progress_bar_is_on_screen():
    from tqdm.auto import tqdm

    assert cli._format_warning("population too small", UserWarning, "f.py", 1) == "ccl: warning: population too small\n"
    with tqdm(total=3, desc="models", file=io.StringIO()) as bar:
        bar.update(1)
        text = cli._format_warning("population too small", UserWarning, "f.py", 1)
    assert text == "\nccl: warning: population too small\n"  # the bar's line ends first


def test_a_summary_saved_in_another_format_is_computed_again(tmp_path):
    import json

    from ccl.summary import SUMMARY_VERSION

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"rows": [], "summary": {"headline": {}, "leakage": "tpr"}}))
    assert load_summary(run) is None  # no version: written before verdicts existed
    (run / "metrics.json").write_text(json.dumps({"summary": {"version": SUMMARY_VERSION + 1}}))
    assert load_summary(run) is None


def test_a_mixed_verdict_reads_as_mixed():
    mixed = judge(comparison(auc=(-0.05, -0.02), tpr=(0.02, 0.03), name="focal"))
    h = Headline("ce", "lira", {"accuracy": 0.885, "auc": 0.733, "tpr": 0.036}, 0.01, "m", "pooled", [mixed], [])
    (sentence,) = [w for w in headline_sentences(h, one_seed=False) if w.startswith("focal")]
    assert "leaks less than ce by one measure and more by another" in sentence

