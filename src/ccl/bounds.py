"""Lower bounds on the privacy parameter epsilon implied by a membership-inference attack: pure functions.

Three procedures:

- `clopper_pearson(k, n)`: the exact binomial confidence interval of Clopper and Pearson (1934), each tail
  holding at most `(1 - confidence) / 2`. The end points are the quantiles of Beta(k, n - k + 1) and
  Beta(k + 1, n - k); they are computed without scipy, by solving `P[Binomial(n, p) >= k] = tail` for `p` with a
  bracketed Newton iteration on the log of the binomial tail, the tail summed exactly (in log space) over the
  terms that are not negligible (relative size below e^-45).
- `epsilon_lower_bound`: the classic audit (Jagielski et al., 2020; Nasr et al., 2021). An (epsilon, delta)-DP
  algorithm lets no test tell a member from a non-member better than `TPR <= e^eps * FPR + delta` and
  `TNR <= e^eps * FNR + delta` (the hypothesis-testing view of DP, Kairouz, Oh and Viswanath, 2015, "The
  composition theorem for differential privacy", ICML, Theorem 2.1). Confidence bounds on the attack's rates
  at one threshold therefore rule out every smaller epsilon; the threshold is chosen on one half of the records
  and the rates are bounded on the other half, so that the choice does not bias the bounds.
- `one_run_epsilon_lower_bound` and `one_run_audit_from_scores`: the one-run audit of Steinke, Nasr and
  Jagielski (2023), "Privacy Auditing with One (1) Training Run", NeurIPS, main theorem: the number of correct
  guesses about the canaries of one training run is stochastically dominated by Binomial(r, e^eps / (1 + e^eps)),
  r the number of guesses, up to a term in delta for (eps, delta)-DP.

Which bounds are rigorous. `one_run_epsilon_lower_bound` holds for one training run: its theorem needs only that
the canaries were included at random (independent coins; ccl includes a random half, an assumption stated
there). `epsilon_lower_bound` treats every (score, membership) pair as an independent trial of the attack
against the algorithm. That holds when each pair comes from its own training run; with the records of one
model (ccl's single target) or the pooled (model, record) pairs of the leave-one-out evaluation (pairs of one
record or of one model are dependent) it rests on that independence approximation. ccl's audit reports the
one-run bound on its canaries as the rigorous figure and labels the others as approximate.

Example:
    >>> low, high = clopper_pearson(3, 10)
    >>> round(low, 4), round(high, 4)
    (0.0667, 0.6525)
"""

from __future__ import annotations

import functools
import math
import warnings
from statistics import NormalDist
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike

from ._checks import check_in_range, check_positive_int, expected
from ._scores import DegenerateMetricWarning, Interval, sorted_thresholds
from ._scores import validate_scores as _validate
from .errors import InvalidArgumentError, InvalidArgumentTypeError

__all__ = [
    "EpsilonBound",
    "clopper_pearson",
    "epsilon_lower_bound",
    "one_run_audit_from_scores",
    "one_run_epsilon_lower_bound",
]

# Thresholds of the selection half whose bound is computed exactly, after ranking all of them by an approximation.
_N_EXACT = 32
# Terms of the binomial tail below e^-_NEGLIGIBLE times the largest are left out (log-concavity bounds the rest).
_NEGLIGIBLE = 45.0
_MAX_ITER = 200
_ULPS = 4 * float(np.finfo(np.float64).eps)


class EpsilonBound(NamedTuple):
    """The result of `epsilon_lower_bound`.

    `epsilon`: the lower bound (0 when nothing is ruled out, NaN for degenerate input). `threshold`: the chosen
    threshold, "member when `score >= threshold`". `tpr_low` / `fpr_high`: the Clopper-Pearson lower bound on
    the TPR and upper bound on the FPR at that threshold on the bounding half (the TNR's lower bound is
    `1 - fpr_high`, the FNR's upper bound `1 - tpr_low`). `n_select` / `n_bound`: records in each half.
    `direction`: the inequality that gave `epsilon`: "tpr_fpr" (`TPR <= e^eps FPR + delta`), "tnr_fnr"
    (`TNR <= e^eps FNR + delta`), or "none" when `epsilon` is 0 or NaN.
    """

    epsilon: float
    threshold: float
    tpr_low: float
    fpr_high: float
    n_select: int
    n_bound: int
    direction: str


# ---------------------------------------------------------------------------------------------------------------
# Binomial tails and the Clopper-Pearson bounds


def _log_binom(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def _log_tail_ge(k: int, n: int, p: float) -> float:
    """`log P[Binomial(n, p) >= k]` for `1 <= k <= n` and `0 < p < 1`, summed in log space.

    The log terms are built outward from the largest one (its value from `math.lgamma`) by sums of the log ratios
    of consecutive terms. They are concave in j, so they fall away from the largest at least as fast as they did
    over the window; the window grows until its edges are e^-45 below the largest term."""
    lp, lq = math.log(p), math.log1p(-p)
    peak = min(n, max(k, math.floor((n + 1) * p)))  # the mode of the terms j >= k
    log_peak = _log_binom(n, peak) + peak * lp + (n - peak) * lq
    half = int(10 * math.sqrt(n * p * (1 - p))) + 40
    while True:
        j0, j1 = max(k, peak - half), min(n, peak + half)
        j = np.arange(j0, j1, dtype=np.float64)  # log(term(j + 1) / term(j)) for j0 <= j < j1
        ratio = np.log(n - j) - np.log(j + 1) + (lp - lq)
        up = np.cumsum(ratio[peak - j0 :])  # terms peak + 1 .. j1
        down = np.cumsum(-ratio[: peak - j0][::-1])  # terms peak - 1 .. j0
        if (j0 == k or down.size == 0 or down[-1] < -_NEGLIGIBLE) and (j1 == n or up[-1] < -_NEGLIGIBLE):
            return log_peak + math.log(1.0 + float(np.exp(up).sum()) + float(np.exp(down).sum()))
        half *= 2


def _log_beta_density(k: int, n: int, p: float) -> float:
    """`log d/dp P[Binomial(n, p) >= k]`, the log density of Beta(k, n - k + 1) at p."""
    return math.log(n) + _log_binom(n - 1, k - 1) + (k - 1) * math.log(p) + (n - k) * math.log1p(-p)


def _z(tail: float) -> float:
    return NormalDist().inv_cdf(1.0 - tail)


def _approx_lower(k: np.ndarray, n: int, tail: float) -> np.ndarray:
    """The Clopper-Pearson lower bound approximated by Wilson's score bound with continuity correction (Newcombe,
    1998), exact at k = 0 and k = n. Vectorised; used to rank thresholds and to start the exact solve."""
    k = np.asarray(k, dtype=np.float64)
    z = _z(tail)
    ph = k / n
    with np.errstate(invalid="ignore"):
        root = np.sqrt(np.maximum(z * z - 2 - 1 / n + 4 * ph * (n * (1 - ph) + 1), 0.0))
    low = (2 * k + z * z - 1 - z * root) / (2 * (n + z * z))
    low = np.clip(low, 0.0, 1.0)
    low = np.where(k == n, math.exp(math.log(tail) / n), low)
    return np.where(k == 0, 0.0, low)


def _approx_upper(k: np.ndarray, n: int, tail: float) -> np.ndarray:
    return 1.0 - _approx_lower(n - np.asarray(k), n, tail)


@functools.lru_cache(maxsize=1 << 16)
def _cp_lower(k: int, n: int, tail: float) -> float:
    """The one-sided Clopper-Pearson lower bound: the `p` with `P[Binomial(n, p) >= k] = tail` (0 when k = 0).

    Cached: an audit asks for the same few (k, n) again and again (every attack's candidate thresholds on the
    same halves of the same records, most near FPR 0); on Location30, 87% of the calls were repeats.

    `log P[Binomial(n, p) >= k]` is increasing and concave in p (the log of the distribution function of the
    log-concave Beta(k, n - k + 1)), so Newton's iterates approach the root monotonically from below; a bracket
    catches a first step from above, with bisection when a step leaves it."""
    if k == 0:
        return 0.0
    log_a = math.log(tail)
    if k == n:
        return math.exp(log_a / n)
    p = float(_approx_lower(np.array([k]), n, tail)[0])
    if not 0.0 < p < 1.0:
        p = 0.5 if p >= 1.0 else math.exp((log_a - _log_binom(n, k)) / k)  # tail ~ C(n, k) p^k for small p
    lo, hi = 0.0, 1.0
    for _ in range(_MAX_ITER):
        log_tail = _log_tail_ge(k, n, p)
        g = log_tail - log_a
        if g == 0.0:
            return p
        if g > 0:
            hi = p
        else:
            lo = p
        step = math.exp(min(math.log(abs(g)) + log_tail - _log_beta_density(k, n, p), 700.0))  # |g| / g'
        if step <= _ULPS * p:
            return p - math.copysign(step, g)
        new = p - math.copysign(step, g)
        if not lo < new < hi:
            new = 0.5 * (lo + hi)
        if hi - lo <= _ULPS * hi:
            return new
        p = new
    raise FloatingPointError(f"The Clopper-Pearson bound for k={k}, n={n} did not converge; please report this bug.")


def _cp_upper(k: int, n: int, tail: float) -> float:
    """The one-sided Clopper-Pearson upper bound: the `p` with `P[Binomial(n, p) <= k] = tail` (1 when k = n)."""
    if k == 0:
        return -math.expm1(math.log(tail) / n)
    return 1.0 - _cp_lower(n - k, n, tail)


def clopper_pearson(successes: int, trials: int, *, confidence: float = 0.95) -> Interval:
    """The exact (Clopper-Pearson) two-sided confidence interval of a binomial proportion.

    Each end point leaves at most `(1 - confidence) / 2` on its side: `low` is the `(1 - confidence) / 2`
    quantile of Beta(k, n - k + 1) (0 when k = 0) and `high` the `(1 + confidence) / 2` quantile of
    Beta(k + 1, n - k) (1 when k = n). The coverage is at least `confidence` for every true proportion.
    Each end point is also the one-sided bound at level `1 - (1 - confidence) / 2`.
    """
    confidence = check_in_range("confidence", confidence, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    trials = check_positive_int("trials", trials, minimum=1)
    successes = check_positive_int("successes", successes, minimum=0)
    if successes > trials:
        raise InvalidArgumentError(expected("successes", f"an integer in [0, trials={trials}]", successes))
    tail = (1.0 - confidence) / 2
    return Interval(_cp_lower(successes, trials, tail), _cp_upper(successes, trials, tail))


# ---------------------------------------------------------------------------------------------------------------
# The classic audit: TPR and FPR at one threshold


def _epsilon_terms(tpr_low, fpr_high, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """`log((TPR_low - delta) / FPR_high)` and `log((TNR_low - delta) / FNR_high)`, -inf where a numerator is not
    positive. TNR_low = 1 - FPR_high and FNR_high = 1 - TPR_low are the same two confidence statements."""
    tpr_low, fpr_high = np.asarray(tpr_low, dtype=np.float64), np.asarray(fpr_high, dtype=np.float64)
    num1, den1 = tpr_low - delta, fpr_high
    num2, den2 = (1.0 - fpr_high) - delta, 1.0 - tpr_low
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.where(num1 > 0, np.log(np.where(num1 > 0, num1, 1.0)) - np.log(den1), -np.inf)
        e2 = np.where(num2 > 0, np.log(np.where(num2 > 0, num2, 1.0)) - np.log(den2), -np.inf)
    return e1, e2


def _counts_by_threshold(s: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives of "member when `score >= t`" at every distinct score t (ties taken whole)."""
    order, last = sorted_thresholds(s)
    tp = np.cumsum(m[order])[last]
    return s[order][last], tp, (last + 1) - tp


def _select_threshold(s: np.ndarray, m: np.ndarray, delta: float, tail: float) -> float:
    """The distinct score maximising the bound computed on (s, m): all thresholds are ranked with the approximate
    bounds, and the best `_N_EXACT` of them are compared with the exact ones."""
    thresholds, tp, fp = _counts_by_threshold(s, m)
    n_pos, n_neg = int(m.sum()), int((~m).sum())
    e1, e2 = _epsilon_terms(_approx_lower(tp, n_pos, tail), _approx_upper(fp, n_neg, tail), delta)
    candidates = np.argsort(-np.maximum(e1, e2), kind="stable")[:_N_EXACT]
    exact = []
    for i in candidates:
        e1, e2 = _epsilon_terms(_cp_lower(int(tp[i]), n_pos, tail), _cp_upper(int(fp[i]), n_neg, tail), delta)
        exact.append(max(float(e1), float(e2)))
    return float(thresholds[candidates[int(np.argmax(exact))]])


def epsilon_lower_bound(
    scores: ArrayLike,
    is_member: ArrayLike,
    *,
    delta: float = 1e-5,
    confidence: float = 0.95,
    seed: int = 0,
) -> EpsilonBound:
    """The largest epsilon that the attack's TPR and FPR at its best threshold rule out, at `confidence`, for an
    (epsilon, `delta`)-DP training algorithm. Higher scores must mean "more likely a member".

    Procedure:

    1. Split the records at random (`seed`), stratified: members and non-members are each halved (an odd one out
       goes to the bounding half) into a selection half and a bounding half.
    2. On the selection half, take the threshold t among its distinct scores ("member when `score >= t`") that
       maximises the bound of step 4 computed on that half (all thresholds ranked with Wilson's continuity-
       corrected approximation of the Clopper-Pearson bounds, the best 32 compared exactly).
    3. On the bounding half, at t: the one-sided Clopper-Pearson lower bound TPR_low on the TPR and upper bound
       FPR_high on the FPR, each at level `1 - (1 - confidence) / 2`; by the union bound both hold with
       probability >= `confidence`. They also bound TNR >= 1 - FPR_high and FNR <= 1 - TPR_low.
    4. epsilon = max(0, log((TPR_low - delta) / FPR_high), log((1 - FPR_high - delta) / (1 - TPR_low))), a term
       counting only where its numerator is positive. Any (eps, delta)-DP algorithm has
       `TPR <= e^eps FPR + delta` and `TNR <= e^eps FNR + delta` (Kairouz, Oh and Viswanath, 2015, Theorem 2.1),
       so an algorithm with a smaller eps gives a result this large with probability at most `1 - confidence`.

    Degenerate input (fewer than 2 members or 2 non-members per half) warns `DegenerateMetricWarning` and returns
    NaN. See the module docstring for the independence this assumes of the records.
    """
    delta = check_in_range("delta", delta, low=0.0, high=1.0, high_inclusive=False)
    confidence = check_in_range("confidence", confidence, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    seed = check_positive_int("seed", seed, minimum=0)
    s, m = _validate(scores, is_member)
    pos, neg = np.flatnonzero(m), np.flatnonzero(~m)
    n_select = pos.size // 2 + neg.size // 2
    if pos.size < 4 or neg.size < 4:
        warnings.warn(
            "epsilon_lower_bound needs at least 4 members and 4 non-members (2 of each per half), but got "
            f"{pos.size} members and {neg.size} non-members. Returning NaN.",
            DegenerateMetricWarning,
            stacklevel=2,
        )
        return EpsilonBound(math.nan, math.nan, math.nan, math.nan, n_select, s.size - n_select, "none")
    rng = np.random.default_rng(seed)
    pos, neg = rng.permutation(pos), rng.permutation(neg)
    select = np.r_[pos[: pos.size // 2], neg[: neg.size // 2]]
    bound = np.r_[pos[pos.size // 2 :], neg[neg.size // 2 :]]
    tail = (1.0 - confidence) / 2

    threshold = _select_threshold(s[select], m[select], delta, tail)
    called, member = s[bound] >= threshold, m[bound]
    n_pos, n_neg = int(member.sum()), int((~member).sum())
    tpr_low = _cp_lower(int(np.sum(called & member)), n_pos, tail)
    fpr_high = _cp_upper(int(np.sum(called & ~member)), n_neg, tail)
    e1, e2 = (float(e) for e in _epsilon_terms(tpr_low, fpr_high, delta))
    epsilon = max(0.0, e1, e2)
    direction = "none" if epsilon == 0.0 else ("tpr_fpr" if e1 >= e2 else "tnr_fnr")
    return EpsilonBound(epsilon, threshold, tpr_low, fpr_high, int(select.size), int(bound.size), direction)


# ---------------------------------------------------------------------------------------------------------------
# The one-run audit


def _one_run_p_value(correct: int, guesses: int, canaries: int, epsilon: float, delta: float) -> float:
    """The p-value of `correct` or more right guesses out of `guesses` under (epsilon, delta)-DP with `canaries`
    randomised canaries (Steinke, Nasr and Jagielski 2023, the theorem for approximate DP and their Appendix D):
    `P[W >= v] + 2 m delta max_{1 <= i <= v} P[v - i <= W < v] / i`, `W ~ Binomial(r, e^eps / (1 + e^eps))`."""
    q = 1.0 / (1.0 + math.exp(-epsilon))
    beta = math.exp(_log_tail_ge(correct, guesses, q)) if q < 1.0 else 1.0
    if delta == 0.0 or beta >= 1.0:
        return min(1.0, beta)
    k = np.arange(correct - 1, -1, -1, dtype=np.float64)  # v - 1, v - 2, ..., 0: the terms P[W = v - i]
    log_pmf = (
        np.array([_log_binom(guesses, int(j)) for j in k]) + k * math.log(q) + (guesses - k) * math.log1p(-q)
    )
    alpha = float(np.max(np.cumsum(np.exp(log_pmf)) / np.arange(1, correct + 1)))
    return min(1.0, beta + alpha * delta * 2 * canaries)


def _one_run_bound(correct: int, guesses: int, confidence: float, *, delta: float = 0.0, canaries: int = 0) -> float:
    """The largest eps whose p-value (`_one_run_p_value`) for `correct` right guesses out of `guesses` stays
    below `1 - confidence`, at least 0.

    Pure DP (delta = 0): the tail `P[Binomial(guesses, e^eps / (1 + e^eps)) >= correct]` increases continuously
    in eps, so that eps is `logit` of the one-sided Clopper-Pearson lower bound at tail `1 - confidence`. With
    delta > 0 the p-value has the extra delta term and eps is found by bisection to 1e-6, as Steinke et al. do."""
    if correct == 0:
        return 0.0
    if delta == 0.0:
        p = _cp_lower(correct, guesses, 1.0 - confidence)
        return max(0.0, math.log(p) - math.log1p(-p))
    level = 1.0 - confidence

    def ruled_out(eps: float) -> bool:
        return _one_run_p_value(correct, guesses, canaries, eps, delta) < level

    if not ruled_out(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while ruled_out(high) and high < 64.0:
        low, high = high, 2 * high
    while high - low > 1e-6:
        mid = 0.5 * (low + high)
        low, high = (mid, high) if ruled_out(mid) else (low, mid)
    return low


def _validate_truths(truths: ArrayLike, shape: tuple[int, ...], like: str) -> np.ndarray:
    t = np.asarray(truths)
    if t.shape != shape:
        raise InvalidArgumentError(expected("truths", f"an array of shape {shape} like `{like}`", f"shape {t.shape}"))
    if t.dtype != bool:
        if not (np.issubdtype(t.dtype, np.number) and np.isin(t, (0, 1)).all()):
            raise InvalidArgumentError(expected("truths", "booleans (or 0/1)", f"values {np.unique(t)[:5]}"))
        t = t.astype(bool)
    return t


def one_run_epsilon_lower_bound(
    guesses: ArrayLike, truths: ArrayLike, *, confidence: float = 0.95, delta: float = 0.0
) -> float:
    """The one-run audit of Steinke, Nasr and Jagielski (2023), "Privacy Auditing with One (1) Training Run",
    NeurIPS: their main theorem, for (eps, `delta`)-DP (pure DP when `delta` is 0).

    m canaries are each included in the one training run with probability 1/2 independently (`truths`: True when
    included). From the trained model alone (never from `truths`), the auditor guesses, for each canary, IN
    (`+1`), OUT (`-1`) or abstains (`0`). With r guesses of which v are right, an eps-DP algorithm makes
    `v` stochastically dominated by Binomial(r, e^eps / (1 + e^eps)); the bound is the largest eps with
    `P[Binomial(r, e^eps / (1 + e^eps)) >= v] <= 1 - confidence` (0 when even eps = 0 is not ruled out), so an
    eps-DP algorithm exceeds its eps here with probability at most `1 - confidence`. For delta > 0 the p-value
    gains their delta term, `2 m delta max_{1 <= i <= v} P[v - i <= W < v] / i` with m the number of canaries
    (`guesses.size`, abstentions included), and eps is found by bisection.

    Assumptions: the number of guesses r is fixed before the model is seen (as in `one_run_audit_from_scores`);
    the theorem draws each canary's inclusion independently, whereas ccl's splits include a uniformly random half
    of the pool: treating that draw as independent coins is an assumption of this audit, not part of the theorem.
    """
    confidence = check_in_range("confidence", confidence, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    delta = check_in_range("delta", delta, low=0.0, high=1.0, high_inclusive=False)
    g = np.asarray(guesses)
    if g.ndim != 1:
        raise InvalidArgumentError(expected("guesses", "a 1-D array", f"shape {g.shape}"))
    if g.dtype == bool or not np.issubdtype(g.dtype, np.number):
        raise InvalidArgumentTypeError(expected("guesses", "integers in {-1, 0, +1}", g.dtype))
    if not np.isin(g, (-1, 0, 1)).all():
        raise InvalidArgumentError(expected("guesses", "values in {-1, 0, +1}", f"values {np.unique(g)[:5]}"))
    t = _validate_truths(truths, g.shape, "guesses")
    correct = int(np.sum((g == 1) & t) + np.sum((g == -1) & ~t))
    return _one_run_bound(correct, int(np.count_nonzero(g)), confidence, delta=delta, canaries=g.size)


def one_run_audit_from_scores(
    scores: ArrayLike,
    is_member: ArrayLike,
    *,
    k_pos: int,
    k_neg: int,
    confidence: float = 0.95,
    delta: float = 0.0,
) -> float:
    """`one_run_epsilon_lower_bound` of the guesses IN for the `k_pos` highest scores and OUT for the `k_neg`
    lowest (abstaining on the rest; ties broken by position), every score a canary. `k_pos` and `k_neg` must be
    chosen without looking at the scores' memberships, e.g. before the run."""
    confidence = check_in_range("confidence", confidence, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False)
    delta = check_in_range("delta", delta, low=0.0, high=1.0, high_inclusive=False)
    s, m = _validate(scores, is_member)
    k_pos = check_positive_int("k_pos", k_pos, minimum=0)
    k_neg = check_positive_int("k_neg", k_neg, minimum=0)
    if k_pos + k_neg > s.size:
        raise InvalidArgumentError(
            expected("k_pos", f"an integer with k_pos + k_neg <= {s.size} (the number of scores)", k_pos)
        )
    order = np.argsort(-s, kind="stable")
    high, low = order[:k_pos], order[s.size - k_neg :]
    correct = int(m[high].sum() + (~m[low]).sum())
    return _one_run_bound(correct, k_pos + k_neg, confidence, delta=delta, canaries=s.size)
