"""Evaluations that do not underestimate leakage: leave-one-out pooling, canaries, the most vulnerable records."""

from __future__ import annotations

import numpy as np
import pytest

import ccl
from ccl.attacks import AttackInputs
from ccl.audit import run_audit
from ccl.config import ExperimentConfig
from ccl.data.canaries import add_canaries
from ccl.evaluation import (
    leave_one_out_scores,
    leave_one_out_scores_slow,
    pooled_metrics,
    record_leakage,
    reference_sets,
    vulnerable_records,
)
from ccl.results import load_results, load_scores


def planted(m=9, p=120, z=40, c=5, a=1, seed=0):
    """Logits of m models on p pool records and z population records; members get a boosted true class."""
    rng = np.random.default_rng(seed)
    split = ccl.data.membership_split(p + z, num_references=m - 1, seed=seed, population_fraction=z / (p + z))
    masks = np.vstack([split.target_in[None], split.reference_in])
    p = masks.shape[1]
    labels = rng.integers(0, c, p)
    logits = rng.normal(size=(m, p, a, c)) * 2
    logits[np.arange(m)[:, None], np.arange(p)[None], :, labels[None]] += 1.5 * masks[..., None]
    pop = rng.normal(size=(m, split.population.size, a, c)) * 2
    return logits, labels, masks, pop, rng.integers(0, c, split.population.size)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("lira", {}),
        ("lira", {"variance": "per_example"}),
        ("lira_offline", {}),
        ("lira_offline", {"variance": "per_example"}),
        ("rmia", {}),
        ("rmia_offline", {}),
        ("loss", {}),
        ("confidence", {}),
        ("entropy", {}),
        ("modified_entropy", {}),
    ],
)
@pytest.mark.parametrize("queries", [1, 2])
def test_one_pass_leave_one_out_equals_one_attack_call_per_model(name, params, queries):
    logits, labels, masks, pop, pop_labels = planted(a=queries)
    attack = ccl.attacks.create(name, **params)
    fast = leave_one_out_scores(attack, logits, labels, masks, population_logits=pop, population_labels=pop_labels)
    slow = leave_one_out_scores_slow(attack, logits, labels, masks, population_logits=pop, population_labels=pop_labels)
    np.testing.assert_allclose(fast, slow, rtol=1e-9, atol=1e-9)
    # the pooled metrics are those of the loop's scores pooled by hand
    assert pooled_metrics(fast, masks, n_resamples=0)["auc"] == pytest.approx(
        ccl.metrics.roc_auc(slow.ravel(), masks.ravel()), abs=1e-12
    )


def test_the_fast_statistics_equal_a_recomputation_from_scratch():
    """Sums and sums of squares over each target's references give the mean and spread of those models."""
    logits, labels, masks, *_ = planted(m=7, p=60)
    phi = ccl.signals.scaled_logit(logits, labels[:, None])  # (M, P, A)
    from ccl.evaluation import _loo_gaussian

    mean, std = _loo_gaussian(phi, masks, reference_sets(masks), "per_example", 2, "lira", "IN")
    partner = {0: None, 1: 2, 2: 1, 3: 4, 4: 3, 5: 6, 6: 5}  # the target, then complementary pairs
    for j in range(7):
        for i in range(60):
            others = [k for k in range(7) if k not in (j, partner[j]) and masks[k, i]]
            assert mean[j, i, 0] == pytest.approx(phi[others, i, 0].mean(), rel=1e-12, abs=1e-12)
            assert std[j, i, 0] == pytest.approx(max(phi[others, i, 0].std(ddof=1), 1e-6), rel=1e-9)


def test_leave_one_out_matches_the_single_target_pipeline_for_each_model(tmp_path, quiet):
    """An audit's pooled scores are the single-target scores of each model in turn, with every other model but
    its complementary partner as references, pooled (small K)."""
    config = ExperimentConfig.from_dict(
        {
            "dataset": "synthetic",
            "dataset_options": {"num_samples": 200},
            "model_options": {"hidden": [16]},
            "num_references": 6,
            "bootstrap": 10,
            "attacks": ["loss", "lira", "rmia"],
            "train": {"epochs": 3, "batch_size": 16, "lr": 0.05},
        }
    )
    run_audit(config, tmp_path / "run", runtime=quiet)
    (result,) = load_results(tmp_path / "run")
    arrays = load_scores(tmp_path / "run" / "results" / "ce" / "seed-0")
    masks = arrays["masks"]
    split = ccl.data.MembershipSplit.load(tmp_path / "run" / "splits" / "seed-0.npz")
    # the models' stored outputs, target first, on pool then population
    from ccl.audit import ModelCache, plan_jobs

    jobs = plan_jobs(config, config.defenses[0], 0, split)
    query = np.r_[split.pool, split.population]
    logits = np.stack([ModelCache(tmp_path / "run" / "models").outputs(j, query) for j in jobs])[:, :, None]
    p = split.pool.size
    data = ccl.data.load("synthetic", num_samples=200)
    labels = data.y.numpy()
    for name in ("loss", "lira", "rmia"):
        per_model = []
        for j in range(masks.shape[0]):
            others = [k for k in range(masks.shape[0]) if k != j and (masks[k] != ~masks[j]).any()]
            assert len(others) == (6 if j == 0 else 5)  # the target has no partner
            inputs = AttackInputs(
                logits[j, :p],
                labels[split.pool],
                logits[others, :p],
                masks[others],
                population_target_logits=logits[j, p:],
                population_labels=labels[split.population],
                population_reference_logits=logits[others, p:],
            )
            per_model.append(ccl.attacks.create(name).score(inputs))
        np.testing.assert_allclose(arrays[f"loo_{name}"], np.stack(per_model), rtol=1e-5, atol=1e-5)  # stored fp32
        np.testing.assert_allclose(arrays[f"loo_{name}"][0], arrays[f"score_{name}"], rtol=1e-5, atol=1e-5)
        pooled = result.evaluations["pooled"][name]
        assert pooled["n_pairs"] == masks.size and pooled["n_models"] == 7
        assert pooled["auc"] == pytest.approx(ccl.metrics.roc_auc(np.stack(per_model).ravel(), masks.ravel()), abs=1e-4)


def test_two_way_bootstrap_intervals_cover_the_point_and_widen_with_fewer_models():
    logits, labels, masks, *_ = planted(m=9, p=200)
    scores = leave_one_out_scores(ccl.attacks.create("lira"), logits, labels, masks)
    full = pooled_metrics(scores, masks, n_resamples=200, seed=1)
    few = pooled_metrics(scores, masks, models=np.arange(3), n_resamples=200, seed=1)
    assert full["auc_ci"][0] <= full["auc"] <= full["auc_ci"][1]
    assert few["auc_ci"][1] - few["auc_ci"][0] > full["auc_ci"][1] - full["auc_ci"][0]
    assert full["n_pairs"] == masks.size and full["n_nonmembers"] == int((~masks).sum())


def test_record_leakage_and_the_vulnerable_records_are_chosen_on_held_out_models():
    logits, labels, masks, *_ = planted(m=10, p=200)
    logits[:, :10, :, :] = 0.0  # ten records leak through a huge boost when IN
    logits[np.arange(10)[:, None], np.arange(10)[None], :, labels[None, :10]] += 20 * masks[:, :10, None]
    scores = leave_one_out_scores(ccl.attacks.create("lira"), logits, labels, masks)
    gap = record_leakage(scores, masks)
    assert set(np.argsort(-gap)[:10]) == set(range(10))
    metrics, chosen, chosen_gap = vulnerable_records(scores, masks, fraction=0.05, n_resamples=20)
    assert set(chosen) <= set(range(10)) and len(chosen) == 10
    assert metrics["n_models"] == 5 and metrics["auc"] > 0.95
    assert np.all(np.diff(chosen_gap) <= 0)


def test_canaries_are_in_half_the_models_and_never_in_accuracy():
    data = ccl.data.load("digits")
    split = ccl.data.membership_split(len(data), num_references=6, seed=0, population_fraction=0.5)
    new, new_split, is_canary = add_canaries(data, split, num=20, kind="mislabeled", seed=0)
    assert len(new) == len(data) + 20 and is_canary.sum() == 20 and is_canary[-20:].all()
    masks = np.vstack([new_split.target_in[None], new_split.reference_in])[:, is_canary]
    assert (masks.sum(0) >= 3).all() and (masks[1:].sum(0) == 3).all()  # references: exactly half
    assert masks[0].sum() == 10  # the target: a random half
    assert len({len(new_split.reference_members(k)) for k in range(6)}) == 1  # still equal sizes (stacking)
    source = np.setdiff1d(split.population, new_split.population)
    assert source.size == 20  # mislabeled sources leave the population
    assert (new.y[len(data) :].numpy() != data.y[source].numpy()).all()  # every label is wrong
    ood, _, _ = add_canaries(data, split, num=4, kind="ood", seed=0)
    assert ood.x[-4:].shape == (4, 64)
    with pytest.raises(ccl.errors.InvalidArgumentError, match="`canaries`"):
        add_canaries(data, split, num=3, seed=0)


def test_a_mislabeled_canary_leaks_more_than_a_random_record_on_digits(tmp_path, quiet):
    config = ExperimentConfig.from_dict(
        {
            "dataset": "digits",
            "model_options": {"hidden": [64]},
            "population_fraction": 0.7,
            "num_references": 6,
            "canaries": 30,
            "bootstrap": 20,
            "attacks": ["loss", "lira"],
            "train": {"epochs": 30, "batch_size": 32, "lr": 0.05, "schedule": "constant"},
        }
    )
    agg = run_audit(config, tmp_path / "run", runtime=quiet)
    row = agg.rows[0]
    for attack in ("loss", "lira"):
        assert row.metric(attack, "auc", "canaries")[0] > row.metric(attack, "auc", "pooled")[0] + 0.1
    (result,) = load_results(tmp_path / "run")
    assert result.num_canaries == 30
    assert result.num_members + result.num_nonmembers == result.evaluations["pooled"]["lira"]["n_records"]
    assert len(result.vulnerable_records) >= 1 and {"record", "label", "leakage"} <= set(result.vulnerable_records[0])
