"""The boundary-distance (label-only) and gradient-norm (white-box) attacks: each measurement against a brute
force, the calibrated attacks on planted and trained membership, their leave-one-out evaluation, the cache."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ccl import attacks, evaluation, metrics
from ccl.attacks import AttackInputs, NotEnoughReferencesError
from ccl.attacks.boundary import RANGE_BITS, _directions, boundary_distances, line_search_distance
from ccl.attacks.gradient import gradient_norms_of, gradient_norms_slow
from ccl.attacks.label_only import chunk_seed

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------ the measurements
def linear_models(k=2, d=5, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, c, d, generator=g), torch.randn(k, c, generator=g)


def test_boundary_distance_equals_a_brute_force_line_search_on_linear_models():
    """For linear models (one crossing along any ray) the bisection finds, for every record and model, the
    smallest over the directions of the first label change a fine grid finds, within the bisection's resolution;
    misclassified records are at distance 0 and records with no change within reach at `max_distance`."""
    w, b = linear_models()
    x = torch.randn(60, 5, generator=torch.Generator().manual_seed(1))
    y = (x @ w[0].T + b[0]).argmax(-1)
    y[:5] = (y[:5] + 1) % 3  # misclassified by model 0

    def predict(q):  # (K, B, d) -> (K, B)
        return (torch.einsum("kbd,kcd->kbc", q, w) + b[:, None]).argmax(-1)

    got = boundary_distances(predict, x, y.numpy(), queries=41, directions=4, num_models=2, seed=3, max_distance=8.0)
    assert got.shape == (2, 60)
    sd = x.std(0, unbiased=False).double()
    u = _directions(tuple(x.shape), 4, chunk_seed(3, 0)) * sd * math.sqrt(5)
    grid = np.exp(np.linspace(np.log(8 / 2**RANGE_BITS), np.log(8), 20001))
    for k in range(2):
        one = lambda q, k=k: (q @ w[k].T + b[k]).argmax(-1)  # noqa: E731
        for i in range(60):
            if one(x[i]) != y[i]:
                assert got[k, i] == 0
                continue
            brute = min(
                min(line_search_distance(one, x[i], int(y[i]), u[i, j].float(), grid=grid), 8.0) for j in range(4)
            )
            # 9 bisections of a log range of 10 octaves: within a factor 2^(10/512); the grid adds 1e-3
            assert abs(math.log(got[k, i]) - math.log(brute)) < 10 * math.log(2) / 2**9 + 1e-3, (k, i)
    assert (got[0, :5] == 0).all()


def test_boundary_distances_of_models_searched_together_equal_one_by_one():
    """Every model is searched along the same directions: K models at once equal K searches of one model."""
    w, b = linear_models(k=3)
    x = torch.randn(30, 5)
    y = torch.randint(0, 3, (30,))
    together = boundary_distances(
        lambda q: (torch.einsum("kbd,kcd->kbc", q, w) + b[:, None]).argmax(-1), x, y, queries=33, num_models=3
    )
    for k in range(3):
        alone = boundary_distances(lambda q, k=k: (q @ w[k].T + b[k]).argmax(-1), x, y, queries=33)
        np.testing.assert_array_equal(together[k], alone[0])


@pytest.mark.parametrize("kwargs", [{"queries": 1}, {"queries": 9, "directions": 9}, {"max_distance": 0.0}])
def test_boundary_distances_reject_bad_options(kwargs):
    with pytest.raises(ValueError):
        boundary_distances(lambda q: q.sum(-1).long(), torch.randn(4, 2), np.zeros(4, int), **kwargs)


def test_gradient_norms_equal_a_loop_of_backward_calls():
    """vmap over grad, in batches, equals one backward per record (an MLP with BatchNorm, in eval mode)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    net(torch.randn(32, 6))  # BatchNorm running statistics that are not the defaults
    net.train()
    x, y = torch.randn(23, 6), torch.randint(0, 4, (23,))
    fast = gradient_norms_of(net, x, y, batch_size=5)
    np.testing.assert_allclose(fast, gradient_norms_slow(net, x, y), rtol=1e-5)
    assert net.training  # mode restored


def test_the_audit_measures_stacked_models_as_it_measures_each_alone():
    """`ccl.audit.execute`'s access to K stacked models gives each model's own statistics."""
    from ccl.audit.statistics import ModelAccess, StackedAccess, model_statistics
    from ccl.stacked import StackedModels

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)) for _ in range(2)]
    x, y = torch.randn(20, 4), torch.randint(0, 3, (20,))
    needs = ("boundary_distance", "gradient_norm")

    def measure(access):
        return model_statistics(
            needs,
            num_models=access.num_models,
            predict_each=torch.no_grad()(access.predict_each),
            functional=access.functional,
            x=x,
            y=y,
        )

    together = measure(StackedAccess(StackedModels(nets), torch.device("cpu")))
    for k, net in enumerate(nets):
        alone = measure(ModelAccess(net, torch.device("cpu")))
        np.testing.assert_allclose(together["gradient_norm"][k], alone["gradient_norm"][0], rtol=1e-5)
        np.testing.assert_allclose(together["gradient_norm"][k], gradient_norms_slow(net, x, y), rtol=1e-5)
        np.testing.assert_allclose(together["boundary_distance"][k], alone["boundary_distance"][0], rtol=1e-5)


# ------------------------------------------------------------------ the attacks
def statistic_inputs(seed=0, n=200, k=8, shift=1.0):
    """Planted statistics: a record's log-distance is its own level plus `shift` when the model trained on it."""
    rng = np.random.default_rng(seed)
    level = rng.normal(0, 2, n)
    member = rng.random(n) < 0.5
    ref_in = np.zeros((k, n), bool)
    for j in range(n):
        ref_in[rng.permutation(k)[: k // 2], j] = True

    def stat(trained):
        return np.exp(level + shift * trained + rng.normal(0, 0.3, trained.shape))

    logits = np.zeros((n, 3))
    common = dict(
        target_logits=logits, labels=np.zeros(n, int), reference_logits=np.zeros((k, n, 3)), reference_in=ref_in
    )
    return common, stat(member), stat(ref_in), member


def test_calibrated_statistic_attacks_equal_a_per_record_loop_of_gaussian_fits():
    common, target, reference, member = statistic_inputs()
    inputs = AttackInputs(**common, target_boundary_distance=target, reference_boundary_distance=reference)
    got = attacks.create("label_only_boundary", variance="per_example").score(inputs)
    from scipy.stats import norm

    floor = 8.0 / 2**RANGE_BITS
    for i in range(0, 200, 17):
        s, r, m = np.log(target[i] + floor), np.log(reference[:, i] + floor), common["reference_in"][:, i]
        expect = norm.logpdf(s, r[m].mean(), r[m].std(ddof=1)) - norm.logpdf(s, r[~m].mean(), r[~m].std(ddof=1))
        assert got[i] == pytest.approx(expect, rel=1e-9, abs=1e-9)
    assert metrics.roc_auc(got, member) > 0.9  # planted: shift 1 against noise 0.3
    # the gradient attack reads the other field, and members are lower
    inputs = AttackInputs(**common, target_gradient_norm=1 / target, reference_gradient_norm=1 / reference)
    assert metrics.roc_auc(attacks.create("gradient").score(inputs), member) > 0.9
    assert metrics.roc_auc(attacks.create("gradient", calibrated=False).score(inputs), member) > 0.5


def test_statistic_attacks_need_their_inputs_and_enough_references():
    common, target, reference, _ = statistic_inputs(k=8)
    bare = AttackInputs(common["target_logits"], common["labels"])
    assert not attacks.runnable(attacks.create("gradient"), bare)
    with pytest.raises(ValueError, match="target_gradient_norm"):
        attacks.create("gradient").score(bare)
    two = AttackInputs(
        common["target_logits"], common["labels"], np.zeros((2, 200, 3)), common["reference_in"][:2],
        target_gradient_norm=target, reference_gradient_norm=reference[:2],
    )  # fmt: skip
    with pytest.raises(NotEnoughReferencesError):
        attacks.create("gradient", calibrated=True).score(two)
    assert attacks.create("gradient").score(two) == pytest.approx(-target)  # uncalibrated below 4 references
    with pytest.raises(ValueError, match="non-negative"):
        AttackInputs(common["target_logits"], common["labels"], target_boundary_distance=-target)
    with pytest.raises(ValueError, match="shape"):
        AttackInputs(**common, target_gradient_norm=target, reference_gradient_norm=reference[:, :5])


def test_access_levels():
    assert attacks.access_level("label_only_boundary") == attacks.access_level("label_only_noise") == "labels"
    assert attacks.access_level("gradient") == "weights"
    assert attacks.access_level("lira") == attacks.access_level("no_such_attack") == "scores"
    assert attacks.describe("label_only_boundary")[1]["queries"] == attacks.create("label_only_boundary").queries


def test_the_weakest_level_that_breaks_a_defense():
    from ccl.summary import broken_at

    levels = {
        "labels": {"attack": "label_only_boundary", "auc": 0.55, "tpr": 0.025},
        "scores": {"attack": "lira", "auc": 0.6, "tpr": 0.05},
    }
    assert broken_at(levels, 0.01) == "labels"
    levels["labels"]["tpr"] = 0.015  # within the practical threshold (1 point) of the FPR
    assert broken_at(levels, 0.01) == "scores"
    assert broken_at(levels, 0.01, {"tpr": 5.0}) == ""
    assert broken_at({"weights": {"attack": "gradient", "auc": 0.52, "tpr": None}}, 0.01) == "weights"  # by AUC


def test_leave_one_out_scores_of_the_statistic_attacks_equal_each_model_scored_as_the_target():
    rng = np.random.default_rng(0)
    m, p = 7, 50
    masks = rng.random((m, p)) < 0.5
    masks[2::2] = ~masks[1::2]  # complementary pairs, as membership_split draws them
    stats = {"gradient_norm": rng.random((m, p)) + masks, "boundary_distance": rng.random((m, p)) + masks}
    logits, labels = np.zeros((m, p, 3)), np.zeros(p, int)
    uses = evaluation.reference_sets(masks)
    for name, stat in (("gradient", "gradient_norm"), ("label_only_boundary", "boundary_distance")):
        got = evaluation.leave_one_out_scores(attacks.create(name), logits, labels, masks, statistics=stats)
        for j in range(m):
            refs = np.flatnonzero(uses[j])
            inputs = AttackInputs(
                logits[j], labels, logits[refs], masks[refs],
                **{f"target_{stat}": stats[stat][j], f"reference_{stat}": stats[stat][refs]},
            )  # fmt: skip
            np.testing.assert_array_equal(got[j], attacks.create(name).score(inputs))


# ------------------------------------------------------------------ trained models
def train_memorisers(x, y, masks, *, steps=80, seed=0):
    """One small MLP per row of `masks`, each fitted (full batch, Adam) to its members' random labels."""
    nets = []
    for j, mask in enumerate(masks):
        torch.manual_seed(seed + j)
        net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
        opt = torch.optim.Adam(net.parameters(), lr=0.03)
        xm, ym = x[torch.as_tensor(mask)], y[torch.as_tensor(mask)]
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xm), ym).backward()
            opt.step()
        nets.append(net.eval())
    return nets


@pytest.fixture(scope="module")
def memorisers():
    """5 models on 160 records with random labels (nothing to learn but the records): a target and 4 references
    in complementary pairs, and a target trained on 160 other records only."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(320, 10, generator=g), torch.randint(0, 4, (320,), generator=g)
    rng = np.random.default_rng(0)
    masks = np.zeros((5, 160), bool)
    masks[0] = rng.random(160) < 0.5
    masks[1], masks[3] = rng.random(160) < 0.5, rng.random(160) < 0.5
    masks[2], masks[4] = ~masks[1], ~masks[3]
    nets = train_memorisers(x[:160], y[:160], masks)
    outsider = train_memorisers(x[160:], y[160:], np.ones((1, 160), bool), seed=99)[0]
    return x[:160], y[:160], masks, nets, outsider


def measured(nets, x, y):
    from ccl.audit.statistics import ModelAccess, model_statistics

    out = {"boundary_distance": [], "gradient_norm": []}
    for net in nets:
        access = ModelAccess(net, torch.device("cpu"))
        stats = model_statistics(
            tuple(out), num_models=1, predict_each=torch.no_grad()(access.predict_each),
            functional=access.functional, x=x, y=y, )  # fmt: skip
        for k in out:
            out[k].append(stats[k][0])
    return {k: np.stack(v) for k, v in out.items()}


def test_both_attacks_beat_chance_on_memorisers_and_not_on_a_model_that_never_saw_the_records(memorisers):
    x, y, masks, nets, outsider = memorisers
    stats = measured(nets, x, y)
    outside = measured([outsider], x, y)
    logits = np.zeros((4, 160, 4))
    for name, stat in (("label_only_boundary", "boundary_distance"), ("gradient", "gradient_norm")):
        fields = {f"reference_{stat}": stats[stat][1:]}
        common = (np.zeros((160, 4)), y.numpy(), logits, masks[1:])
        on_target = attacks.create(name).score(AttackInputs(*common, **{f"target_{stat}": stats[stat][0]}, **fields))
        on_outsider = attacks.create(name).score(
            AttackInputs(*common, **{f"target_{stat}": outside[stat][0]}, **fields)
        )
        # measured: boundary 0.93, gradient 0.94 against the memoriser; 0.54 and 0.52 against the outsider
        assert metrics.roc_auc(on_target, masks[0]) > 0.8, name
        assert abs(metrics.roc_auc(on_outsider, masks[0]) - 0.5) < 0.12, name


# ------------------------------------------------------------------ the cache
def test_a_cached_model_without_a_needed_statistic_is_trained_again(tmp_path):
    from ccl.audit.execute import ModelCache

    class Job:
        key = "m"

    cache, index, logits = ModelCache(tmp_path), np.arange(5), np.zeros((5, 3), np.float32)
    (tmp_path / "m").mkdir()
    np.savez(tmp_path / "m" / "outputs.npz", logits=logits, query_index=index, gradient_norm=np.ones(5))
    assert cache.outputs(Job, index, needs=("gradient_norm",)) is not None
    assert cache.outputs(Job, index, needs=("boundary_distance",)) is None
    queries = attacks.create("label_only_boundary").queries
    for stored, found in ((queries, True), (queries + 1, False)):  # measured with another query budget: stale
        extra = {"boundary_distance": np.ones(5), "boundary_queries": np.asarray(stored)}
        np.savez(tmp_path / "m" / "outputs.npz", logits=logits, query_index=index, **extra)
        assert (cache.outputs(Job, index, needs=("boundary_distance",)) is not None) == found
