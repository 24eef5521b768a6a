"""The first run: checks before work starts, users' raw data, warnings a reader needs, and the headline."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest

from ccl import cli
from ccl.audit import run_audit
from ccl.config import ExperimentConfig
from ccl.results import load_aggregate, load_results
from ccl.summary import headline


def test_a_missing_optional_dependency_fails_before_anything_is_trained(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    out = tmp_path / "run"
    assert cli.main(["compare", "--dataset", "synthetic", "--epochs", "1", "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install 'ccl[report]'" in err and "Nothing was trained" in err
    assert not out.exists()


def _raw_scale_npz(path):
    """A 3-class linear task whose features have scales from 1 to 4,000 and an offset of 2,000."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 10))
    y = (x @ rng.normal(size=(10, 3))).argmax(1)
    x = x * np.array([1, 10, 100, 1000, 4000, 1, 50, 3000, 2, 700]) + 2000
    np.savez(path, X=x, y=y)
    return str(path)


def test_standardisation_makes_a_raw_scale_dataset_learnable(tmp_path, quiet):
    data = _raw_scale_npz(tmp_path / "raw.npz")
    raw = {
        "dataset": data,
        "model_options": {"hidden": [32]},
        "num_references": 0,
        "bootstrap": 0,
        "train": {"epochs": 10, "batch_size": 32, "lr": 0.05},
    }
    on = run_audit(ExperimentConfig.from_dict(raw), tmp_path / "on", runtime=quiet)  # auto: on for a .npz
    off = run_audit(ExperimentConfig.from_dict({**raw, "standardize": False}), tmp_path / "off", runtime=quiet)
    assert on.rows[0].test_acc > 0.85  # measured 0.94
    assert off.rows[0].test_acc < 0.65  # measured 0.51: the raw scale saturates the network
    assert ExperimentConfig.from_dict(raw).standardizes
    assert not ExperimentConfig.from_dict({**raw, "dataset": "digits"}).standardizes  # registered data as published


def test_a_target_at_the_majority_class_rate_is_flagged(tmp_path, quiet):
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "noise.npz", X=rng.normal(size=(400, 6)), y=(rng.random(400) < 0.2).astype(int))
    config = ExperimentConfig.from_dict(
        {
            "dataset": str(tmp_path / "noise.npz"),
            "model_options": {"hidden": [8]},
            "num_references": 0,
            "bootstrap": 0,
            "train": {"epochs": 5, "batch_size": 32, "lr": 0.05},
        }
    )
    with pytest.warns(UserWarning, match="majority-class rate"):
        run_audit(config, tmp_path / "run", runtime=quiet)
    (result,) = load_results(tmp_path / "run")
    assert any("majority-class rate" in n for n in result.notes)


def _tiny(defenses, seeds):
    return ExperimentConfig.from_dict(
        {
            "dataset": "synthetic",
            "dataset_options": {"num_samples": 240},
            "model_options": {"hidden": [16]},
            "num_references": 4,
            "bootstrap": 20,
            "defenses": defenses,
            "seeds": seeds,
            "train": {"epochs": 4, "batch_size": 16, "lr": 0.05},
        }
    )


def test_headline_numbers_equal_a_recomputation_from_metrics_json(tmp_path, quiet):
    out = tmp_path / "run"
    run_audit(_tiny(["ce", "ccel:alpha=0.2", "relaxloss:alpha=0.5"], [0, 1]), out, runtime=quiet)
    cli.main(["report", str(out)])
    raw = json.loads((out / "metrics.json").read_text())
    rows = {r["defense"]: r for r in raw["rows"]}
    head = headline(out, load_aggregate(out), load_results(out))
    assert head.baseline == "ce" and len(head.comparisons) == 2 and "2 seeds" in head.method
    assert head.evaluation == "pooled"  # 4 reference models: every model is also a target
    for c in head.comparisons:
        d, ce = rows[c.defense], rows["ce"]
        pooled, pooled_ce = d["evaluations"]["pooled"], ce["evaluations"]["pooled"]
        aucs = {a: v["auc"] for a, v in pooled.items()}
        assert c.attack == max(aucs, key=aucs.get)  # the strongest attack against the defense
        assert c.accuracy_delta == pytest.approx(d["values"]["test_acc"] - ce["values"]["test_acc"])
        assert c.auc_delta == pytest.approx(pooled[c.attack]["auc"] - pooled_ce[c.attack]["auc"])
        for value, ci in ((c.accuracy_delta, c.accuracy_delta_ci), (c.auc_delta, c.auc_delta_ci)):
            assert ci[0] <= value <= ci[1]
    html = (out / "report.html").read_text()
    first = head.comparisons[0]
    assert f"{first.auc_delta:+.3f}" in html and f"{100 * first.accuracy_delta:+.1f} pp" in html
    # the frontier: nothing on it is beaten on both accuracy and leakage by another defense
    points = {
        d: (r["values"]["test_acc"], max(a["auc"] for a in r["evaluations"]["pooled"].values()))
        for d, r in rows.items()
    }
    for d in head.frontier:
        assert not any(a >= points[d][0] and lk <= points[d][1] and (a, lk) != points[d] for a, lk in points.values())


def test_with_one_seed_the_headline_uses_a_paired_bootstrap_over_records(tmp_path, quiet):
    out = tmp_path / "run"
    run_audit(_tiny(["ce", "relaxloss:alpha=0.5"], [0]), out, runtime=quiet)
    head = headline(out, load_aggregate(out), load_results(out), n_resamples=100)
    (c,) = head.comparisons
    assert "bootstrap over models and records" in head.method
    assert all(not math.isnan(v) for v in (*c.accuracy_delta_ci, *c.auc_delta_ci))
    assert c.auc_delta_ci[0] <= c.auc_delta <= c.auc_delta_ci[1]


def test_the_paired_bootstrap_equals_a_slow_loop_over_the_separate_metrics(tmp_path, quiet):
    """The headline's pooled bootstrap takes AUC and TPR from one ROC per resample: it equals a loop that draws
    the same resamples and calls `roc_auc` and `tpr_at_fpr` separately."""
    import warnings

    from ccl.metrics import DegenerateMetricWarning, roc_auc, tpr_at_fpr
    from ccl.results import load_scores
    from ccl.summary import _bootstrap_deltas

    out = tmp_path / "run"
    run_audit(_tiny(["ce", "ccel:alpha=0.2"], [0]), out, runtime=quiet)
    a, b = (load_scores(out / "results" / slug / "seed-0") for slug in ("ce", "ccel_alpha=0.2"))
    fpr, n = 0.1, 30
    fast = _bootstrap_deltas(a, b, "loss", fpr, n, 7, "pooled")

    rng = np.random.default_rng(7)
    masks, held = a["masks"], a["heldout_correct"].size
    records = np.nonzero(~a["is_canary"])[0] if "is_canary" in a else np.arange(masks.shape[1])
    values = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateMetricWarning)
        for _ in range(n):
            mi = rng.integers(0, masks.shape[0], masks.shape[0])
            ri = records[rng.integers(0, records.size, records.size)]
            mm = masks[np.ix_(mi, ri)].ravel()
            xa, xb = (s["loo_loss"][np.ix_(mi, ri)].ravel() for s in (a, b))
            h = rng.choice(np.arange(held), held)
            values.append(
                (
                    a["heldout_correct"][h].mean() - b["heldout_correct"][h].mean(),
                    roc_auc(xa, mm) - roc_auc(xb, mm),
                    tpr_at_fpr(xa, mm, fpr=fpr) - tpr_at_fpr(xb, mm, fpr=fpr),
                )
            )
    slow = [tuple(np.nanpercentile(np.array(values)[:, j], [2.5, 97.5])) for j in range(3)]
    assert all(lo < hi for lo, hi in fast)  # the two defenses differ
    np.testing.assert_allclose(np.array(fast), np.array(slow), rtol=0, atol=1e-12)
