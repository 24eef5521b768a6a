"""The leave-one-out evaluation's epsilon bounds hold for releases that are epsilon-DP by construction.

Each of 13 models releases, for every record, its membership through randomized response (the true bit with
probability e^eps / (1 + e^eps)) or with Laplace noise of scale 1/eps: an eps-DP release of that membership.
The logits, and the labels the label-only attacks see, are post-processing of the release, so no attack on a
(model, record) pair can beat eps. The split is `membership_split`'s, the scores `leave_one_out_scores`', the
bound `epsilon_lower_bound`'s at the audit's delta, all as `ccl.audit.score` calls them. Before the partner of a
complementary pair was left out of the references, online RMIA, offline LiRA and the label-only attacks
over-claimed eps in most audits (the references' masks told them the target's membership).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import ccl
from ccl import attacks, bounds, evaluation
from ccl.audit.score import EPSILON_DELTA, NOT_POOLED
from ccl.audit.statistics import STATISTIC_ATTACKS

# the boundary and gradient attacks read statistics measured on each model's weights, which this simulation of
# released scores has none of
POOLED = [name for name in attacks.available() if name not in NOT_POOLED and name not in STATISTIC_ATTACKS]
#: (number of records, population fraction): the demo's pool (270 records, 13 models) and digits' whole pool
#: at the default population fraction (1,616 records).
SIZES = {"demo": (1797, 0.85), "13x1600": (1797, 0.1)}


pytestmark = pytest.mark.usefixtures("one_thread")  # small torch ops on a loaded 2-core machine: 8x faster


def dp_releases(epsilon: float, mechanism: str, size: str, seed: int, *, queries: int = 4):
    """The audit inputs of 13 models whose outputs are eps-DP releases of each record's membership."""
    n, population_fraction = SIZES[size]
    rng = np.random.default_rng([seed, 0xD9])
    split = ccl.data.membership_split(n, num_references=12, seed=seed, population_fraction=population_fraction)
    masks = np.vstack([split.target_in[None], split.reference_in])  # (M, P)
    m, p = masks.shape
    member = np.hstack([masks, np.zeros((m, split.population.size), bool)]).astype(np.float64)  # (M, P + Z)
    if mechanism == "randomized_response":
        truthful = rng.random(member.shape) < np.exp(epsilon) / (1 + np.exp(epsilon))
        release = np.where(truthful, member, 1 - member)
    else:
        release = member + rng.laplace(scale=1 / epsilon, size=member.shape)
    offset = rng.normal(size=member.shape[1])  # records differ, independently of membership
    margin = 2 * release - 1 + offset  # (M, P + Z)
    labels = rng.integers(0, 2, member.shape[1])
    logits = np.zeros((*member.shape, 2))
    logits[np.arange(m)[:, None], np.arange(member.shape[1]), labels] = margin
    predicted = np.where(margin > 0, labels, 1 - labels)[:, :p, None].repeat(queries, axis=2)  # (M, P, Q)
    return {
        "logits": logits[:, :p],
        "labels": labels[:p],
        "masks": masks,
        "population_logits": logits[:, p:],
        "population_labels": labels[p:],
        "perturbed_labels": {"perturbed": predicted, "noise": predicted},
    }


def pooled_bounds(data: dict, names, seed: int, *, references=None) -> dict[str, float]:
    """The pooled epsilon lower bound of each attack, as the audit computes it."""
    out = {}
    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the old design's independence warning, degenerate metrics
            scores = evaluation.leave_one_out_scores(
                attacks.create(name),
                data["logits"],
                data["labels"],
                data["masks"],
                population_logits=data["population_logits"],
                population_labels=data["population_labels"],
                perturbed_labels=data["perturbed_labels"],
                references=references,
            )
        bound = bounds.epsilon_lower_bound(scores.ravel(), data["masks"].ravel(), delta=EPSILON_DELTA, seed=seed)
        out[name] = bound.epsilon
    return out


def over_claims(epsilon, mechanism, size, audits, names, *, references=None) -> dict[str, int]:
    counts = dict.fromkeys(names, 0)
    for seed in range(audits):
        data = dp_releases(epsilon, mechanism, size, seed)
        refs = None if references is None else references(data["masks"])
        for name, bound in pooled_bounds(data, names, seed, references=refs).items():
            counts[name] += bound > epsilon
    return counts


def test_the_complementary_partner_was_the_leak_and_is_gone():
    """At epsilon = 2 and 13 x 1,616, keeping each reference model's partner among its references made RMIA,
    offline LiRA and the label-only attacks over-claim in most audits; leaving it out (the default) does not."""
    names = ["rmia", "lira_offline", "label_only_augmentation"]
    everyone_else = lambda masks: ~np.eye(masks.shape[0], dtype=bool)  # noqa: E731
    old = over_claims(2.0, "randomized_response", "13x1600", 8, names, references=everyone_else)
    new = over_claims(2.0, "randomized_response", "13x1600", 8, names)
    assert all(old[name] >= 4 for name in names), old
    assert all(new[name] <= 1 for name in names), new


@pytest.mark.slow
@pytest.mark.parametrize("size", list(SIZES))
def test_no_pooled_attack_over_claims_epsilon_dp_releases(size):
    """Over randomized response and Laplace at epsilon 1 and 2 (50 audits each, 200 in all), every pooled
    attack's bound exceeds the true epsilon in at most 5% of audits, with a 95% Clopper-Pearson interval below
    10%, and in at most 10% of the audits of any one mechanism and epsilon."""
    audits = 50
    totals = dict.fromkeys(POOLED, 0)
    for mechanism in ("randomized_response", "laplace"):
        for epsilon in (1.0, 2.0):
            counts = over_claims(epsilon, mechanism, size, audits, POOLED)
            assert all(k <= 0.10 * audits for k in counts.values()), (mechanism, epsilon, counts)
            for name, k in counts.items():
                totals[name] += k
    n = 4 * audits
    for name, k in totals.items():
        assert k <= 0.05 * n, (name, k, n)
        assert ccl.metrics.clopper_pearson(k, n).high < 0.10, (name, k, n)


def test_the_default_references_leave_out_exactly_the_partner():
    split = ccl.data.membership_split(300, num_references=7, seed=4)
    masks = np.vstack([split.target_in[None], split.reference_in])  # 8 models: target, 3 pairs, 1 unpaired
    partners = evaluation.complementary_partners(masks)
    np.testing.assert_array_equal(partners, [-1, 2, 1, 4, 3, 6, 5, -1])
    uses = evaluation.reference_sets(masks)
    for j in range(8):
        expected = {k for k in range(8) if k != j and k != partners[j]}
        assert set(np.flatnonzero(uses[j])) == expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a sound design does not warn
        assert evaluation.check_reference_independence(masks, uses) < 5


def test_a_design_whose_references_reveal_the_target_warns():
    """LiRA's original code gives every record to exactly half of all models: the other models' count then
    reveals the target's membership. The check warns; so does keeping a complementary partner."""
    rng = np.random.default_rng(0)
    order = rng.random((16, 500)).argsort(0)
    balanced = order < 8  # (16, 500), each record IN for exactly 8 models
    with pytest.warns(UserWarning, match="leak the target's membership"):
        evaluation.check_reference_independence(balanced, evaluation.reference_sets(balanced))
    split = ccl.data.membership_split(300, num_references=6, seed=1)
    masks = np.vstack([split.target_in[None], split.reference_in])
    with pytest.warns(UserWarning, match="leak the target's membership"):
        evaluation.check_reference_independence(masks, ~np.eye(7, dtype=bool))


@pytest.mark.parametrize(
    ("references", "match"),
    [(np.ones((3, 3), bool), "a \\(7, 7\\) bool array"), (np.ones((7, 7), bool), "False on the diagonal")],
)
def test_bad_reference_sets_are_refused(references, match):
    data = dp_releases(1.0, "laplace", "demo", 0)
    masks = data["masks"][:7]
    with pytest.raises(ccl.errors.InvalidArgumentError, match=match):
        evaluation.leave_one_out_scores(
            attacks.create("lira"), data["logits"][:7], data["labels"], masks, references=references
        )


def test_results_of_the_old_leave_one_out_design_are_recomputed_on_resume(monkeypatch):
    """The result key holds the leave-one-out version: a resumed run recomputes (from its cached models) the
    pooled results written before the partner was left out; single-target results keep their keys."""
    from ccl.audit import plan
    from ccl.config import ExperimentConfig

    pooled = ExperimentConfig.from_dict({"dataset": "digits", "num_references": 4})
    single = ExperimentConfig.from_dict({"dataset": "digits", "num_references": 2})
    before = [plan.result_key(c, c.defenses[0], 0) for c in (pooled, single)]
    monkeypatch.setattr(plan, "LEAVE_ONE_OUT_VERSION", 1)
    after = [plan.result_key(c, c.defenses[0], 0) for c in (pooled, single)]
    assert after[0] != before[0] and after[1] == before[1]


def test_each_target_gets_the_lira_variance_of_its_own_reference_count():
    """With 64 reference models the target has 64 references (per-example variance under "auto") and every
    reference model 63 (global variance): the one-pass scores equal one LiRA call per model, row by row."""
    from test_evaluation import planted

    logits, labels, masks, pop, pop_labels = planted(m=65, p=40)
    for name in ("lira", "lira_offline"):
        attack = attacks.create(name)
        fast = evaluation.leave_one_out_scores(attack, logits, labels, masks)
        slow = evaluation.leave_one_out_scores_slow(attack, logits, labels, masks)
        np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-9)


def test_every_model_with_the_complementary_mask_is_left_out_and_empty_reference_sets_are_refused():
    masks = np.array([[1, 0, 1, 0], [0, 1, 0, 1], [0, 1, 0, 1], [1, 1, 0, 0]], bool)
    uses = evaluation.reference_sets(masks)
    assert not uses[0, 1] and not uses[0, 2] and uses[0, 3]  # both copies of model 0's complement
    assert not uses[1, 0] and not uses[2, 0]
    lonely = ~np.eye(4, dtype=bool)
    lonely[3] = False
    logits = np.zeros((4, 4, 2))
    with pytest.raises(ccl.errors.InvalidArgumentError, match="at least one reference for every model"):
        evaluation.leave_one_out_scores(attacks.create("loss"), logits, np.zeros(4, int), masks, references=lonely)
