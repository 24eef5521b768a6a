"""Tests of ccl.bounds: Clopper-Pearson against scipy, and the epsilon lower bounds on mechanisms of known epsilon."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from ccl.bounds import (
    EpsilonBound,
    clopper_pearson,
    epsilon_lower_bound,
    one_run_audit_from_scores,
    one_run_epsilon_lower_bound,
)
from ccl.errors import InvalidArgumentError
from ccl.metrics import DegenerateMetricWarning


def _reference(k: int, n: int, confidence: float) -> tuple[float, float]:
    tail = (1 - confidence) / 2
    low = 0.0 if k == 0 else stats.beta.ppf(tail, k, n - k + 1)
    high = 1.0 if k == n else stats.beta.isf(tail, k + 1, n - k)  # isf: 1 - tail would round tail away
    return low, high


def _randomized_response(n: int, eps: float, rng: np.random.Generator, *, delta: float = 0.0):
    """An (eps, delta)-DP mechanism per record: with probability delta it reveals membership (2 for a member, -1 for
    a non-member); otherwise members output 1 w.p. e^eps / (1 + e^eps), non-members w.p. 1 / (1 + e^eps)."""
    member = np.zeros(n, bool)
    member[rng.permutation(n)[: n // 2]] = True
    p = math.exp(eps) / (1 + math.exp(eps))
    out = np.where(member, rng.random(n) < p, rng.random(n) < 1 - p).astype(np.float64)
    reveal = rng.random(n) < delta
    out[reveal] = np.where(member[reveal], 2.0, -1.0)
    return out, member


# ---------------------------------------------------------------------------------------------------------------
# clopper_pearson


GRID = [(n, k) for n in (1, 2, 3, 7, 50, 333, 10_000, 100_000) for k in sorted({0, 1, n // 3, n // 2, n - 1, n})]


@pytest.mark.parametrize("confidence", [0.5, 0.9, 0.95, 0.999])
def test_clopper_pearson_matches_scipy_beta_quantiles(confidence):
    for n, k in GRID:
        low, high = clopper_pearson(k, n, confidence=confidence)
        ref_low, ref_high = _reference(k, n, confidence)
        assert low == pytest.approx(ref_low, abs=1e-9), (k, n)
        assert high == pytest.approx(ref_high, abs=1e-9), (k, n)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 20_000), frac=st.floats(0, 1), confidence=st.floats(0.05, 0.9999))
def test_clopper_pearson_matches_scipy_anywhere(n, frac, confidence):
    k = round(frac * n)
    low, high = clopper_pearson(k, n, confidence=confidence)
    ref_low, ref_high = _reference(k, n, confidence)
    assert low == pytest.approx(ref_low, abs=1e-9)
    assert high == pytest.approx(ref_high, abs=1e-9)
    assert low <= k / n <= high


def test_clopper_pearson_covers_the_true_proportion():
    n, p = 50, 0.3
    intervals = np.array([clopper_pearson(k, n) for k in range(n + 1)])
    covers = (intervals[:, 0] <= p) & (p <= intervals[:, 1])
    exact = stats.binom.pmf(np.arange(n + 1), n, p)[covers].sum()
    assert 0.95 <= exact < 0.99  # conservative, but not vacuous
    draws = np.random.default_rng(0).binomial(n, p, size=2000)
    assert covers[draws].mean() >= 0.95


def test_clopper_pearson_is_fast_for_large_n():
    start = time.perf_counter()
    for k in (0, 1, 3, 33_333, 50_000, 99_999, 100_000):
        clopper_pearson(k, 100_000)
    clopper_pearson(3_333_333, 10_000_000)
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"successes": -1, "trials": 5}, "successes"),
        ({"successes": 6, "trials": 5}, "successes"),
        ({"successes": 0, "trials": 0}, "trials"),
        ({"successes": 1, "trials": 5, "confidence": 1.0}, "confidence"),
        ({"successes": 1, "trials": 5, "confidence": 0.0}, "confidence"),
    ],
)
def test_clopper_pearson_rejects_bad_arguments(kwargs, name):
    with pytest.raises(InvalidArgumentError, match=f"`{name}`"):
        clopper_pearson(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# epsilon_lower_bound


@pytest.mark.parametrize("eps", [1.0, 2.0])
def test_epsilon_bound_rarely_exceeds_the_true_epsilon_of_randomized_response(eps):
    bounds = []
    for seed in range(200):
        scores, member = _randomized_response(2000, eps, np.random.default_rng(seed))
        bounds.append(epsilon_lower_bound(scores, member, seed=seed).epsilon)
    bounds = np.array(bounds)
    assert np.all(np.isfinite(bounds)) and np.all(bounds >= 0)
    assert np.mean(bounds > eps) <= 0.05
    assert np.mean(bounds) > 0.6 * eps  # ... while being informative


def test_epsilon_bound_holds_for_a_continuous_mechanism_with_many_thresholds():
    # The Laplace mechanism, member scores shifted by 1, is eps-DP with eps = 1 / scale, and every threshold >= 1
    # attains TPR = e^eps FPR: choosing the threshold on the records that bound it would exceed eps in ~11% of runs.
    eps, exceeded, bounds = 1.0, 0, []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        member = np.zeros(2000, bool)
        member[rng.permutation(2000)[:1000]] = True
        result = epsilon_lower_bound(member + rng.laplace(scale=1 / eps, size=2000), member, delta=0.0, seed=seed)
        exceeded += result.epsilon > eps
        bounds.append(result.epsilon)
    assert exceeded <= 0.05 * 200
    assert np.mean(bounds) > 0.5 * eps


def test_the_chosen_threshold_maximises_the_exact_bound_on_the_selection_half():
    from ccl.bounds import _counts_by_threshold, _cp_lower, _cp_upper, _select_threshold

    tail = 0.025
    for seed in range(100):  # fewer distinct scores than thresholds compared exactly: the best must be found
        rng = np.random.default_rng(seed)
        member = rng.random(60) < 0.5
        scores = np.round(rng.normal(size=60) + 2 * member, 1)
        thresholds, tp, fp = _counts_by_threshold(scores, member)
        n_pos, n_neg = int(member.sum()), int((~member).sum())
        exact = [
            max(
                math.log(max(_cp_lower(int(a), n_pos, tail), 1e-300) / _cp_upper(int(b), n_neg, tail)),
                math.log(max(1 - _cp_upper(int(b), n_neg, tail), 1e-300) / (1 - _cp_lower(int(a), n_pos, tail))),
            )
            for a, b in zip(tp, fp, strict=True)
        ]
        chosen = _select_threshold(scores, member, 0.0, tail)
        assert exact[list(thresholds).index(chosen)] == pytest.approx(max(exact), abs=1e-12)


@pytest.mark.parametrize("eps", [1.0, 2.0])
def test_epsilon_bound_is_tight_with_many_records(eps):
    scores, member = _randomized_response(100_000, eps, np.random.default_rng(123))
    start = time.perf_counter()
    result = epsilon_lower_bound(scores, member, seed=1)
    assert time.perf_counter() - start < 1.0
    assert 0.7 * eps <= result.epsilon <= eps
    assert result.threshold == 1.0  # the score >= 1 test: ties of the two-valued scores taken whole
    assert result.n_select + result.n_bound == 100_000


def test_epsilon_bound_reports_one_sided_clopper_pearson_bounds_of_the_bounding_half():
    scores, member = _randomized_response(4000, 1.0, np.random.default_rng(5))
    result = epsilon_lower_bound(scores, member, delta=0.01, confidence=0.9, seed=3)
    assert isinstance(result, EpsilonBound)
    n_pos = int(member.sum()) - int(member.sum()) // 2  # the odd one out goes to the bounding half
    n_neg = int((~member).sum()) - int((~member).sum()) // 2
    assert result.n_bound == n_pos + n_neg
    # tpr_low is the low end of the two-sided 90% interval (the one-sided 95% bound) of some count of the half
    lows = [clopper_pearson(k, n_pos, confidence=0.9).low for k in range(n_pos + 1)]
    assert min(abs(low - result.tpr_low) for low in lows) < 1e-12
    highs = [clopper_pearson(k, n_neg, confidence=0.9).high for k in range(n_neg + 1)]
    assert min(abs(high - result.fpr_high) for high in highs) < 1e-12
    expected = {
        "tpr_fpr": math.log((result.tpr_low - 0.01) / result.fpr_high),
        "tnr_fnr": math.log((1 - result.fpr_high - 0.01) / (1 - result.tpr_low)),
    }
    assert result.epsilon == pytest.approx(expected[result.direction], rel=1e-12)


def test_epsilon_bound_accounts_for_delta():
    eps, delta = 1.0, 0.05
    with_delta, without = [], []
    for seed in range(200):
        scores, member = _randomized_response(2000, eps, np.random.default_rng(seed), delta=delta)
        with_delta.append(epsilon_lower_bound(scores, member, delta=delta, seed=seed).epsilon)
        if seed < 20:
            without.append(epsilon_lower_bound(scores, member, delta=0.0, seed=seed).epsilon)
    assert np.mean(np.array(with_delta) > eps) <= 0.05
    assert np.mean(with_delta) > 0.6 * eps
    # the mechanism is not (eps, 0)-DP: revealed memberships rule out eps itself when delta is ignored
    assert np.median(without) > eps


def test_epsilon_bound_of_perfect_separation_is_finite_and_grows_with_n():
    bounds = []
    for n in (100, 1000, 10_000):
        member = np.arange(n) % 2 == 0
        result = epsilon_lower_bound(member.astype(float), member, delta=0.0)
        assert math.isfinite(result.epsilon)
        bounds.append(result.epsilon)
    assert bounds[0] > 0 and bounds[0] < bounds[1] < bounds[2]
    # the largest possible: TPR_low = tail^(1 / n_pos), FPR_high = 1 - tail^(1 / n_neg), 5,000 of each per half
    tail = 0.025
    assert bounds[2] == pytest.approx(math.log(tail ** (1 / 2500) / -math.expm1(math.log(tail) / 2500)))


def test_epsilon_bound_of_an_uninformative_attack_is_about_zero():
    bounds = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        scores, member = rng.normal(size=2000), rng.random(2000) < 0.5
        bounds.append(epsilon_lower_bound(scores, member, seed=seed).epsilon)
    assert max(bounds) <= 0.3
    assert np.mean(np.array(bounds) == 0.0) >= 0.75


def test_epsilon_bound_depends_only_on_the_order_of_the_scores():
    rng = np.random.default_rng(0)
    member = rng.random(3000) < 0.4
    scores = np.round(rng.normal(size=3000) + 1.5 * member, 1)  # many ties
    a = epsilon_lower_bound(scores, member, seed=7)
    b = epsilon_lower_bound(np.exp(scores), member, seed=7)
    assert a.epsilon > 0
    assert a.epsilon == b.epsilon and a.tpr_low == b.tpr_low and a.fpr_high == b.fpr_high
    assert math.exp(a.threshold) == pytest.approx(b.threshold)


def test_epsilon_bound_warns_and_is_nan_on_degenerate_input():
    with pytest.warns(DegenerateMetricWarning, match="members"):
        result = epsilon_lower_bound(np.arange(10.0), np.ones(10, bool))
    assert math.isnan(result.epsilon) and result.direction == "none"
    with pytest.warns(DegenerateMetricWarning):
        assert math.isnan(epsilon_lower_bound(np.arange(10.0), np.arange(10) < 3).epsilon)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert epsilon_lower_bound(np.arange(8.0), np.arange(8) < 4).epsilon >= 0  # 2 of each per half suffice


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"delta": -0.1}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"delta": math.nan}, "delta"),
        ({"confidence": 0.0}, "confidence"),
        ({"confidence": 1.0}, "confidence"),
        ({"is_member": np.ones(7, bool)}, "is_member"),
        ({"scores": np.r_[np.nan, np.arange(9.0)]}, "scores"),
        ({"seed": -1}, "seed"),
    ],
)
def test_epsilon_bound_rejects_bad_arguments(kwargs, name):
    args = {"scores": np.arange(10.0), "is_member": np.arange(10) % 2 == 0, **kwargs}
    with pytest.raises(InvalidArgumentError, match=f"`{name}`"):
        epsilon_lower_bound(args.pop("scores"), args.pop("is_member"), **args)


# ---------------------------------------------------------------------------------------------------------------
# the one-run audit


@pytest.mark.parametrize("eps", [1.0, 2.0])
def test_one_run_bound_on_randomized_response_canaries(eps):
    m = 10_000
    p = math.exp(eps) / (1 + math.exp(eps))
    bounds = []
    for seed in range(100):
        rng = np.random.default_rng(seed)
        included = rng.random(m) < 0.5  # independent fair coins, as in the theorem
        output = np.where(included, rng.random(m) < p, rng.random(m) < 1 - p)
        bounds.append(one_run_epsilon_lower_bound(np.where(output, 1, -1), included))
    bounds = np.array(bounds)
    assert np.all(bounds >= 0.5 * eps)
    # Each guess is right with probability exactly p, so the audit is exact here: it exceeds eps with probability
    # just under 5%, and 100 trials see Binomial(100, 0.05) exceedances (more than 5 with probability 0.38). Allow
    # three standard deviations; the exact probability is checked below, and 2,000 trials of the count itself.
    assert np.mean(bounds > eps) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 100)
    correct = np.random.default_rng(0).binomial(m, p, size=2000)
    many = np.array([one_run_epsilon_lower_bound(np.ones(m, int), np.arange(m) < v) for v in correct])
    assert np.mean(many > eps) <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 2000)
    # exactly: the bound increases with the number v of right guesses; P[bound > eps] = P[v >= first v above eps]
    v = int(m * p)
    while one_run_epsilon_lower_bound(np.ones(m, int), np.arange(m) < v) <= eps:
        v += 1
    assert 0.04 <= stats.binom.sf(v - 1, m, p) <= 0.05


def test_one_run_bound_is_the_binomial_tail_inversion():
    guesses = np.r_[np.ones(60, int), -np.ones(40, int), np.zeros(900, int)]
    truths = np.r_[np.ones(50, bool), np.zeros(10, bool), np.zeros(35, bool), np.ones(905, bool)]  # 85 of 100 right
    eps = one_run_epsilon_lower_bound(guesses, truths, confidence=0.9)
    p = math.exp(eps) / (1 + math.exp(eps))
    assert stats.binom.sf(84, 100, p) == pytest.approx(0.1, rel=1e-9)  # P[Binomial(100, p) >= 85] = 1 - confidence
    assert one_run_epsilon_lower_bound(guesses, truths, confidence=0.99) < eps


def test_one_run_bound_is_zero_when_nothing_is_ruled_out():
    truths = np.arange(100) % 2 == 0
    assert one_run_epsilon_lower_bound(np.where(truths, -1, 1), truths) == 0.0  # all wrong
    assert one_run_epsilon_lower_bound(np.zeros(100, int), truths) == 0.0  # all abstain
    assert one_run_epsilon_lower_bound(np.where(np.arange(100) < 50, 1, -1), truths) == 0.0  # chance level


def test_one_run_audit_from_scores_guesses_the_extremes():
    rng = np.random.default_rng(0)
    member = rng.random(1000) < 0.5
    scores = member + rng.normal(scale=0.01, size=1000)  # perfectly separable
    eps = one_run_audit_from_scores(scores, member, k_pos=50, k_neg=50)
    assert eps == pytest.approx(math.log(0.05 ** (1 / 100) / (1 - 0.05 ** (1 / 100))))  # all 100 right
    noisy = scores + rng.normal(size=1000)
    order = np.argsort(-noisy)
    guesses = np.zeros(1000, int)
    guesses[order[:30]], guesses[order[-70:]] = 1, -1
    assert one_run_audit_from_scores(noisy, member, k_pos=30, k_neg=70) == one_run_epsilon_lower_bound(guesses, member)


@pytest.mark.parametrize(
    "guesses, truths, name",
    [
        (np.array([1, 0, 2]), np.array([True, False, True]), "guesses"),
        (np.array([1.0, -1.0, np.nan]), np.array([True, False, True]), "guesses"),
        (np.array([1, 0, -1]), np.array([True, False]), "truths"),
        (np.array([1, 0, -1]), np.array([1, 0, 3]), "truths"),
    ],
)
def test_one_run_bound_rejects_bad_arguments(guesses, truths, name):
    with pytest.raises(InvalidArgumentError, match=f"`{name}`"):
        one_run_epsilon_lower_bound(guesses, truths)


def test_one_run_audit_from_scores_rejects_bad_arguments():
    scores, member = np.arange(10.0), np.arange(10) < 5
    with pytest.raises(InvalidArgumentError, match="`k_pos`"):
        one_run_audit_from_scores(scores, member, k_pos=6, k_neg=5)
    with pytest.raises(InvalidArgumentError, match="`k_neg`"):
        one_run_audit_from_scores(scores, member, k_pos=1, k_neg=-1)
    with pytest.raises(InvalidArgumentError, match="`confidence`"):
        one_run_audit_from_scores(scores, member, k_pos=1, k_neg=1, confidence=1.5)


def _p_value_with_scipy(m, r, v, eps, delta):
    """Steinke, Nasr and Jagielski's p-value for (eps, delta)-DP, term by term with scipy (their Appendix D)."""
    from scipy import stats

    q = 1 / (1 + np.exp(-eps))
    tail = stats.binom.sf(v - 1, r, q)
    worst = max(sum(stats.binom.pmf(v - t, r, q) for t in range(1, i + 1)) / i for i in range(1, v + 1))
    return min(1.0, tail + worst * delta * 2 * m)


@pytest.mark.parametrize(("m", "r", "v", "delta"), [(100, 20, 18, 1e-5), (1000, 100, 80, 1e-5), (500, 60, 45, 1e-3)])
def test_one_run_bound_with_delta_is_the_inversion_of_the_papers_p_value(m, r, v, delta):
    truths = np.arange(m) < v  # the first r guesses are IN: v of them right
    guesses = np.where(np.arange(m) < r, 1, 0)
    eps = one_run_epsilon_lower_bound(guesses, truths, delta=delta)
    assert eps > 0
    assert _p_value_with_scipy(m, r, v, eps - 1e-4, delta) < 0.05 <= _p_value_with_scipy(m, r, v, eps + 1e-4, delta)
    # the delta term only weakens the bound, the more so the more canaries there are
    assert eps <= one_run_epsilon_lower_bound(guesses, truths)
    assert (
        one_run_epsilon_lower_bound(
            np.r_[guesses, np.zeros(4 * m, int)], np.r_[truths, np.zeros(4 * m, bool)], delta=delta
        )
        <= eps
    )
    scores = np.where(truths, 1.0, 0.0) + np.arange(m) * 1e-9  # the top r: the v members, then r - v others
    assert one_run_audit_from_scores(scores, truths, k_pos=r, k_neg=0, delta=delta) == eps


def test_one_run_bound_with_delta_zero_is_the_pure_dp_bound():
    rng = np.random.default_rng(3)
    truths = rng.random(400) < 0.5
    guesses = np.where(rng.random(400) < 0.8, np.where(truths, 1, -1), np.where(truths, -1, 1))
    pure = one_run_epsilon_lower_bound(guesses, truths)
    assert one_run_epsilon_lower_bound(guesses, truths, delta=0.0) == pure
    assert one_run_epsilon_lower_bound(guesses, truths, delta=1e-8) == pytest.approx(pure, abs=1e-3)
