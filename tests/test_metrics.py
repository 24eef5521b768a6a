"""Metrics against sklearn.metrics and brute force; degenerate input; bootstrap intervals."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from ccl import metrics
from ccl.metrics import DegenerateMetricWarning


def random_case(seed, n=300, ties=True):
    rng = np.random.default_rng(seed)
    m = rng.random(n) < rng.uniform(0.2, 0.8)
    s = rng.normal(size=n) + 0.7 * m
    if ties:
        s = np.round(s, 1)  # many ties
    return s, m


@pytest.mark.parametrize("seed", range(20))
def test_roc_and_auc_match_sklearn(seed):
    s, m = random_case(seed, ties=seed % 2 == 0)
    curve = metrics.roc_curve(s, m)
    fpr, tpr, thr = sk_roc_curve(m, s, drop_intermediate=False)
    np.testing.assert_allclose(curve.fpr, fpr)
    np.testing.assert_allclose(curve.tpr, tpr)
    np.testing.assert_allclose(curve.thresholds[1:], thr[1:])
    assert metrics.roc_auc(s, m) == pytest.approx(roc_auc_score(m, s), abs=1e-12)


def brute_force(s, m, fpr_max=None):
    """All thresholds, one by one."""
    best_adv, best_tpr = 0.0, 0.0
    for t in np.r_[np.inf, np.unique(s)]:
        pred = s >= t
        tpr, fpr = pred[m].mean(), pred[~m].mean()
        best_adv = max(best_adv, tpr - fpr)
        if fpr_max is not None and fpr <= fpr_max:
            best_tpr = max(best_tpr, tpr)
    return best_adv, best_tpr


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.3])
def test_advantage_and_tpr_at_fpr_match_brute_force(seed, fpr):
    s, m = random_case(seed, n=1000)
    adv, tpr = brute_force(s, m, fpr)
    assert metrics.membership_advantage(s, m) == pytest.approx(adv)
    assert metrics.tpr_at_fpr(s, m, fpr=fpr) == pytest.approx(tpr)


def test_balanced_accuracy():
    s = np.array([0.9, 0.8, 0.3, 0.1])
    m = np.array([True, False, True, False])
    assert metrics.balanced_accuracy(s, m, threshold=0.5) == pytest.approx(0.5)
    assert metrics.balanced_accuracy(s, m, threshold=0.2) == pytest.approx(0.75)


def test_degenerate_input_warns_and_returns_nan():
    s = np.arange(10.0)
    with pytest.warns(DegenerateMetricWarning, match="only members"):
        assert math.isnan(metrics.roc_auc(s, np.ones(10, bool)))
    with pytest.warns(DegenerateMetricWarning, match="only non-members"):
        assert math.isnan(metrics.membership_advantage(s, np.zeros(10, bool)))
    with pytest.warns(DegenerateMetricWarning, match="at least 1000 non-members, but got 5"):
        assert math.isnan(metrics.tpr_at_fpr(s, np.arange(10) < 5, fpr=1e-3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert metrics.tpr_at_fpr(np.arange(200.0), np.arange(200) >= 100, fpr=0.01) == 1.0


@pytest.mark.parametrize(
    ("scores", "is_member", "exc", "pattern"),
    [
        ([0.1, np.nan], [True, False], ValueError, "`scores`.*finite"),
        ([0.1, np.inf], [True, False], ValueError, "`scores`.*finite"),
        ([0.1, 0.2], [True, False, True], ValueError, r"`is_member`.*\(2,\).*\(3,\)"),
        ([[0.1, 0.2]], [[True, False]], ValueError, "`scores`.*1-D"),
        ([0.1, 0.2], [2, 0], ValueError, "`is_member`.*booleans"),
        (["a", "b"], [True, False], TypeError, "`scores`"),
    ],
)
def test_bad_input_is_named(scores, is_member, exc, pattern):
    with pytest.raises(exc, match=pattern):
        metrics.roc_auc(scores, is_member)


def test_bootstrap_interval_covers_estimate_and_is_seeded():
    s, m = random_case(0, n=1000, ties=False)
    auc = metrics.roc_auc(s, m)
    ci = metrics.bootstrap_ci(metrics.roc_auc, s, m, n_resamples=300, seed=1)
    assert ci.low < auc < ci.high
    assert 0.02 < ci.high - ci.low < 0.15
    assert ci == metrics.bootstrap_ci(metrics.roc_auc, s, m, n_resamples=300, seed=1)


def test_bootstrap_interval_has_nominal_coverage():
    """Across fresh samples from one population, the 90% interval covers the true AUC about 90% of the time."""
    rng = np.random.default_rng(0)
    true_auc = 0.76025  # Phi(1 / sqrt(2)) for a unit shift between two unit-variance Gaussians
    covered = 0
    trials = 60
    for _ in range(trials):
        m = np.r_[np.ones(150, bool), np.zeros(150, bool)]
        s = rng.normal(size=300) + m
        ci = metrics.bootstrap_ci(metrics.roc_auc, s, m, n_resamples=150, confidence=0.9, seed=int(rng.integers(1e9)))
        covered += ci.low <= true_auc <= ci.high
    assert 0.75 <= covered / trials <= 1.0


def test_evaluate_collects_everything():
    s, m = random_case(3, n=3000, ties=False)
    out = metrics.evaluate(s, m, n_resamples=50)
    assert out.auc == pytest.approx(roc_auc_score(m, s))
    assert set(out.tpr_at_fpr) == {1e-3, 1e-2}
    d = out.as_dict()
    assert d["auc_ci"][0] <= d["auc"] <= d["auc_ci"][1]
    assert "tpr@0.001" in d and "tpr@0.01_ci" in d


def test_evaluate_intervals_equal_bootstrap_ci_of_each_metric():
    """evaluate() draws each resample once for all metrics: its intervals equal the one-metric bootstrap."""
    rng = np.random.default_rng(3)
    s, m = rng.normal(size=400), rng.random(400) < 0.5
    s[m] += 0.5
    s = np.round(s, 1)  # ties
    out = metrics.evaluate(s, m, fprs=(0.01, 0.05), n_resamples=50, seed=7)
    assert tuple(out.auc_ci) == pytest.approx(
        tuple(metrics.bootstrap_ci(metrics.roc_auc, s, m, n_resamples=50, seed=7))
    )
    adv = metrics.bootstrap_ci(metrics.membership_advantage, s, m, n_resamples=50, seed=7)
    assert tuple(out.advantage_ci) == pytest.approx(tuple(adv))
    for f in (0.01, 0.05):
        ref = metrics.bootstrap_ci(lambda a, b, f=f: metrics.tpr_at_fpr(a, b, fpr=f), s, m, n_resamples=50, seed=7)
        assert tuple(out.tpr_at_fpr_ci[f]) == pytest.approx(tuple(ref))
    point = metrics.roc_metrics(s, m, (0.01, 0.05))
    assert point[0] == pytest.approx(metrics.roc_auc(s, m)) and point[1] == pytest.approx(
        metrics.membership_advantage(s, m)
    )
    assert point[3] == pytest.approx(metrics.tpr_at_fpr(s, m, fpr=0.05))


def test_roc_metrics_of_weighted_resamples_equal_the_resamples_themselves():
    """The bootstraps' fast path (one sort, each resample as the counts of its draws) against `_roc_metrics` of
    each resample's drawn records: ties, resamples of one class only, an FPR a resample cannot resolve, and
    batches split across `BOOTSTRAP_BATCH_ELEMENTS`."""
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=300), 1)  # many ties
    m = rng.random(300) < 0.5
    s[m] += 0.4
    draws = [rng.integers(0, 300, 300) for _ in range(40)]
    draws += [np.nonzero(m)[0][:50], np.nonzero(~m)[0][:50], np.r_[np.nonzero(m)[0][:100], np.nonzero(~m)[0][:20]]]
    weights = np.stack([np.bincount(d, minlength=300) for d in draws])
    fprs = (0.01, 0.1)
    slow = np.stack([metrics._roc_metrics(s[d], m[d], fprs) for d in draws])
    fast = metrics.roc_metrics_weighted(s, m, weights, fprs)
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert np.isnan(fast[40]).all() and np.isnan(fast[41]).all()  # one class only
    assert np.isnan(fast[42, 2]) and not np.isnan(fast[42, 3])  # 20 non-members: 1% FPR unresolved, 10% resolved
    old = metrics.BOOTSTRAP_BATCH_ELEMENTS
    try:
        metrics.BOOTSTRAP_BATCH_ELEMENTS = 7 * 300  # batches of 7 resamples
        np.testing.assert_allclose(
            metrics.roc_metrics_weighted(s, m, weights, fprs), slow, rtol=1e-12, atol=1e-12, equal_nan=True
        )
    finally:
        metrics.BOOTSTRAP_BATCH_ELEMENTS = old
    for dtype in (np.uint8, np.uint64, np.int32, np.float32):  # unsigned counts must not wrap TP n_neg - FP n_pos
        np.testing.assert_allclose(
            metrics.roc_metrics_weighted(s, m, weights.astype(dtype), fprs),
            slow,
            rtol=1e-12,
            atol=1e-12,
            equal_nan=True,
        )
