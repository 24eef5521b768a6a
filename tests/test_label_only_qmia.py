"""Attacks a defense cannot hide from: label-only attacks (predicted labels on perturbed copies) and QMIA
(a quantile regressor fitted on public non-members, no reference models). Fast paths against loops; planted
and real membership."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ccl import attacks, metrics, models, training
from ccl.attacks import AttackInputs, LabelOnlyAttack, NotEnoughReferencesError
from ccl.attacks.label_only import (
    CHUNK,
    calibrated_correct_fraction,
    chunk_seed,
    correct_fraction,
    perturbed_queries,
    predict_perturbed_labels,
)
from ccl.attacks.qmia import QMIA, conformal_shift, fit_quantile_regressor, hinge_score, pinball_loss

NEW = {"label_only_augmentation", "label_only_noise", "qmia"}


pytestmark = pytest.mark.usefixtures("one_thread")  # small full-batch fits: one thread is as fast


# ------------------------------------------------------------------ queries
def test_perturbed_queries_are_deterministic_by_seed_with_the_input_kind():
    images = torch.rand(6, 3, 8, 8)
    a = perturbed_queries(images, kind="augment", num=4, seed=3)
    assert isinstance(a, torch.Tensor) and a.shape == (4, 6, 3, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, perturbed_queries(images, kind="augment", num=4, seed=3))
    assert not torch.equal(a, perturbed_queries(images, kind="augment", num=4, seed=4))
    tab = np.random.default_rng(0).normal(size=(5, 7))
    for kind in ("augment", "noise"):
        b = perturbed_queries(tab, kind=kind, num=3, scale=0.5, seed=1)
        assert isinstance(b, np.ndarray) and b.shape == (3, 5, 7) and b.dtype == np.float64
        np.testing.assert_array_equal(b, perturbed_queries(tab, kind=kind, num=3, scale=0.5, seed=1))
        assert not np.array_equal(b, perturbed_queries(tab, kind=kind, num=3, scale=0.5, seed=2))
    noisy_images = perturbed_queries(images, kind="noise", num=2, scale=0.1, seed=0)
    assert noisy_images.shape == (2, 6, 3, 8, 8)


def test_augmented_images_are_crops_and_flips_of_the_original():
    """Each copy equals one of the 9 x 9 shifts of the zero-padded image, flipped or not (a per-image search)."""
    images = torch.rand(5, 2, 6, 6)
    out = perturbed_queries(images, kind="augment", num=8, seed=0)
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    found = []
    for q in range(8):
        for i in range(5):
            matches = [
                (dy, dx, flip)
                for dy in range(9)
                for dx in range(9)
                for flip in (False, True)
                if torch.equal(
                    out[q, i],
                    padded[i, :, dy : dy + 6, dx : dx + 6].flip(2) if flip else padded[i, :, dy : dy + 6, dx : dx + 6],
                )
            ]
            assert len(matches) == 1, (q, i)
            found.append(matches[0])
    assert {f[2] for f in found} == {False, True}  # both flipped and unflipped copies
    assert len({f[:2] for f in found}) > 10  # many different shifts


def test_tabular_noise_has_the_requested_scale():
    rng = np.random.default_rng(0)
    feature_std = np.array([1.0, 5.0, 0.1])
    x = rng.normal(size=(4000, 3)) * feature_std + np.array([2.0, -3.0, 0.0])
    measured_std = x.std(0)
    same = perturbed_queries(x, kind="augment", num=3, scale=0.5, seed=0)
    z = (same - x) / measured_std  # noise in units of each feature's standard deviation
    np.testing.assert_allclose(z.std(1), 0.5, rtol=0.05)
    np.testing.assert_allclose(z.mean(1), 0.0, atol=0.03)
    growing = perturbed_queries(x, kind="noise", num=4, scale=2.0, seed=0)
    z = (growing - x) / measured_std
    for q in range(4):  # copy q: scale * (q + 1) / Q
        np.testing.assert_allclose(z[q].std(0), 2.0 * (q + 1) / 4, rtol=0.05)
    given = perturbed_queries(x, kind="augment", num=2, scale=0.5, seed=0, std=np.ones(3))  # a fixed std
    np.testing.assert_allclose((given - x).std(1), 0.5, rtol=0.05)
    assert np.array_equal(perturbed_queries(x, kind="noise", num=2, scale=0.0, seed=0), np.stack([x, x]))


@pytest.mark.parametrize(
    ("x", "kwargs", "pattern"),
    [
        (np.zeros((4, 3)), dict(kind="blur", num=2, scale=1.0), "`kind`"),
        (np.zeros((4, 3)), dict(kind="noise", num=0, scale=1.0), "`num`"),
        (np.zeros((4, 3)), dict(kind="augment", num=2), "`scale`"),
        (np.zeros((4, 3)), dict(kind="noise", num=2, scale=-1.0), "`scale`"),
        (np.zeros((4, 3)), dict(kind="noise", num=2, scale=1.0, std=np.ones(4)), "`std`"),
        (np.zeros((4, 3)), dict(kind="noise", num=2, scale=1.0, seed=-1), "`seed`"),
        (np.zeros((4, 3), int), dict(kind="noise", num=2, scale=1.0), "`x`"),
        (np.zeros(4), dict(kind="noise", num=2, scale=1.0), "`x`"),
        (torch.zeros(2, 1, 4, 4), dict(kind="augment", num=2, padding=-1), "`padding`"),
    ],
)
def test_perturbed_queries_reject_bad_options(x, kwargs, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        perturbed_queries(x, **kwargs)


def test_predict_perturbed_labels_equals_argmax_on_each_chunk_of_queries():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    x = torch.randn(CHUNK + 300, 4)  # two chunks
    got = predict_perturbed_labels(model, x, kind="noise", num=5, scale=1.0, seed=7, device="cpu")
    assert got.shape == (CHUNK + 300, 5) and got.dtype == np.int64
    std = x.std(0, unbiased=False)
    for b, start in enumerate((0, CHUNK)):
        queries = perturbed_queries(
            x[start : start + CHUNK], kind="noise", num=5, scale=1.0, seed=chunk_seed(7, b), std=std
        )
        for i in range(0, queries.shape[1], 97):
            for q in range(5):
                with torch.no_grad():
                    assert got[start + i, q] == int(model(queries[q, i][None]).argmax())
    np.testing.assert_array_equal(got, predict_perturbed_labels(model, x, kind="noise", num=5, scale=1.0, seed=7))


def test_the_audit_asks_every_model_the_queries_of_predict_perturbed_labels_a_block_at_a_time(monkeypatch):
    """The pipeline's labels (K stacked models at once) equal `predict_perturbed_labels` of each model, and the
    queries are drawn `CHUNK` records at a time (a large pool never sits in memory Q times)."""
    import ccl.attacks.label_only as lo
    from ccl.audit import execute

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)) for _ in range(2)]
    x = torch.randn(CHUNK + 300, 4)
    sizes = []
    real = lo.perturbed_queries
    monkeypatch.setattr(lo, "perturbed_queries", lambda x, **kw: sizes.append(len(x)) or real(x, **kw))
    got = execute.perturbed_labels(lambda q: torch.stack([net(q) for net in nets]), x)
    assert max(sizes) == CHUNK and sum(sizes) == 2 * len(x)
    for kind in ("augment", "noise"):
        assert got[f"{kind}_labels"].shape == (2, len(x), execute.LABEL_ONLY_QUERIES)
        for k, net in enumerate(nets):
            expect = predict_perturbed_labels(
                net,
                x,
                kind=kind,
                num=execute.LABEL_ONLY_QUERIES,
                scale=execute.LABEL_ONLY_SCALE,
                seed=execute.LABEL_ONLY_SEED,
                device="cpu",
            )
            np.testing.assert_array_equal(got[f"{kind}_labels"][k], expect)


def test_cached_labels_on_other_queries_are_never_mixed_with_new_ones(tmp_path):
    """A model cached with labels from another way of drawing the queries counts as not trained (it is trained
    again), so that a resumed audit never compares models that answered different queries."""
    from ccl.audit.execute import LABEL_ONLY_FORMAT, ModelCache

    class Job:
        key = "m"

    cache, index, logits = ModelCache(tmp_path), np.arange(5), np.zeros((5, 3), np.float32)
    labels = np.zeros((5, 16), np.int64)
    (tmp_path / "m").mkdir()
    for marker, found in ((None, False), (LABEL_ONLY_FORMAT - 1, False), (LABEL_ONLY_FORMAT, True)):
        extra = {} if marker is None else {"label_only_format": np.asarray(marker)}
        np.savez(tmp_path / "m" / "outputs.npz", logits=logits, query_index=index, augment_labels=labels, **extra)
        assert (cache.outputs(Job, index) is not None) == found
    np.savez(tmp_path / "m" / "outputs.npz", logits=logits, query_index=index)  # no label-only queries at all
    assert cache.outputs(Job, index) is not None


# ------------------------------------------------------------------ label-only scores
def label_only_inputs(seed=0, n=30, q=7, k=4, c=3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, c, n)
    ref_in = np.zeros((k, n), bool)
    for j in range(n):
        ref_in[rng.permutation(k)[: k // 2], j] = True
    return dict(
        target_logits=rng.normal(size=(n, c)),
        labels=labels,
        reference_logits=rng.normal(size=(k, n, c)),
        reference_in=ref_in,
        target_perturbed_labels=rng.integers(0, c, (n, q)),
        reference_perturbed_labels=rng.integers(0, c, (k, n, q)),
        target_noise_labels=rng.integers(0, c, (n, q + 2)),
        reference_noise_labels=rng.integers(0, c, (k, n, q + 2)),
    )


def test_label_only_scores_match_a_per_record_loop():
    kw = label_only_inputs()
    inp = AttackInputs(**kw)
    for kind, (tf, rf) in {
        "augment": ("target_perturbed_labels", "reference_perturbed_labels"),
        "noise": ("target_noise_labels", "reference_noise_labels"),
    }.items():
        t, r, y, rin = kw[tf], kw[rf], kw["labels"], kw["reference_in"]
        raw = [sum(int(t[j, q] == y[j]) for q in range(t.shape[1])) / t.shape[1] for j in range(len(y))]
        calibrated = []
        for j in range(len(y)):
            outs = [k for k in range(r.shape[0]) if not rin[k, j]]
            ref_mean = sum(sum(int(r[k, j, q] == y[j]) for q in range(r.shape[2])) / r.shape[2] for k in outs) / len(
                outs
            )
            calibrated.append(raw[j] - ref_mean)
        np.testing.assert_allclose(LabelOnlyAttack(kind=kind, calibrated=False).score(inp), raw, rtol=0, atol=1e-12)
        np.testing.assert_allclose(LabelOnlyAttack(kind=kind, calibrated=True).score(inp), calibrated, atol=1e-12)
        # default: calibrated when the reference models' labels are given (K >= 2), raw otherwise
        np.testing.assert_allclose(LabelOnlyAttack(kind=kind).score(inp), calibrated, atol=1e-12)
        alone = AttackInputs(kw["target_logits"], y, **{tf: t})
        np.testing.assert_allclose(LabelOnlyAttack(kind=kind).score(alone), raw, atol=1e-12)
    np.testing.assert_allclose(
        correct_fraction(kw["reference_perturbed_labels"], kw["labels"])[1, 3],
        np.mean(kw["reference_perturbed_labels"][1, 3] == kw["labels"][3]),
    )
    assert attacks.create("label_only_noise").score(inp) == pytest.approx(LabelOnlyAttack(kind="noise").score(inp))


def test_calibrated_label_only_needs_out_references_and_their_labels():
    kw = label_only_inputs(k=2)
    kw["reference_in"][:, 0] = True  # record 0: no OUT reference model
    with pytest.raises(NotEnoughReferencesError, match="1 record"):
        LabelOnlyAttack(calibrated=True).score(AttackInputs(**kw))
    with pytest.raises(NotEnoughReferencesError, match="1 record"):
        calibrated_correct_fraction(
            kw["target_perturbed_labels"], kw["reference_perturbed_labels"], kw["reference_in"], kw["labels"]
        )
    bare = AttackInputs(kw["target_logits"], kw["labels"], target_perturbed_labels=kw["target_perturbed_labels"])
    with pytest.raises(NotEnoughReferencesError, match="at least 2 reference"):
        LabelOnlyAttack(calibrated=True).score(bare)
    with pytest.raises(ValueError, match="`target_noise_labels`.*missing"):
        LabelOnlyAttack(kind="noise").score(bare)
    with pytest.raises(TypeError, match="`calibrated`"):
        LabelOnlyAttack(calibrated="yes")
    with pytest.raises(ValueError, match="`kind`"):
        attacks.create("label_only_augmentation", kind="blur")


# ------------------------------------------------------------------ inputs and the registry
@pytest.mark.parametrize(
    ("extra", "pattern"),
    [
        (dict(target_perturbed_labels=np.zeros((4, 3))), r"`target_perturbed_labels`.*integer"),
        (dict(target_perturbed_labels=np.zeros((5, 3), int)), r"`target_perturbed_labels`.*\(4, 'Q'\)"),
        (dict(target_perturbed_labels=np.full((4, 3), 3)), r"`target_perturbed_labels`.*\[0, 3\)"),
        (dict(reference_perturbed_labels=np.zeros((2, 4, 3), int)), r"`target_perturbed_labels`.*given with"),
        (
            dict(target_noise_labels=np.zeros((4, 3), int), reference_noise_labels=np.zeros((2, 4, 3), int)),
            r"`reference_logits`.*given with `reference_noise_labels`",
        ),
        (dict(features=np.zeros((3, 2))), r"`features`.*\(4, d\)"),
        (dict(features=np.full((4, 2), np.nan)), r"`features`.*finite"),
        (dict(features=np.zeros((4, 2)).astype(str)), r"`features`.*real-valued"),
        (dict(population_features=np.zeros((2, 2))), r"`features`.*given with `population_features`"),
        (dict(features=np.zeros((4, 2)), population_features=np.zeros((2, 2))), r"`population_target_logits`"),
    ],
)
def test_new_inputs_are_validated(extra, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        AttackInputs(np.zeros((4, 3)), np.zeros(4, int), **extra)


def test_new_reference_inputs_are_validated():
    kw = label_only_inputs(n=4, q=3, k=2)
    with pytest.raises(ValueError, match=r"`reference_perturbed_labels`.*3 queries"):
        AttackInputs(**{**kw, "reference_perturbed_labels": np.zeros((2, 4, 5), int)})
    with pytest.raises(ValueError, match=r"`reference_perturbed_labels`.*\(2, 4, 3\)"):
        AttackInputs(**{**kw, "reference_perturbed_labels": np.zeros((3, 4, 3), int)})
    with pytest.raises(ValueError, match=r"`population_features`.*\(6, 2\)"):
        AttackInputs(
            np.zeros((4, 3)),
            np.zeros(4, int),
            population_target_logits=np.zeros((6, 3)),
            population_labels=np.zeros(6, int),
            features=np.zeros((4, 2)),
            population_features=np.zeros((6, 5)),
        )


def test_new_attacks_are_registered_and_runnable_only_with_their_inputs():
    assert NEW <= set(attacks.available())
    for name in NEW:
        doc, _ = attacks.describe(name)
        assert doc
    kw = label_only_inputs(n=20)
    plain = AttackInputs(kw["target_logits"], kw["labels"], kw["reference_logits"], kw["reference_in"])
    scores = attacks.score_all(plain)  # the new inputs are absent: the new attacks are simply not run
    assert not NEW & set(scores)
    assert set(scores) == {n for n in attacks.available() if attacks.runnable(attacks.create(n), plain)}
    rng = np.random.default_rng(0)
    full = AttackInputs(
        **kw,
        population_target_logits=rng.normal(size=(40, 3)),
        population_labels=rng.integers(0, 3, 40),
        features=rng.normal(size=(20, 5)),
        population_features=rng.normal(size=(40, 5)),
    )
    assert NEW <= set(attacks.score_all(full))
    only_augment = AttackInputs(
        kw["target_logits"], kw["labels"], target_perturbed_labels=kw["target_perturbed_labels"]
    )
    assert attacks.runnable(attacks.create("label_only_augmentation"), only_augment)
    assert not attacks.runnable(attacks.create("label_only_noise"), only_augment)
    assert not attacks.runnable(attacks.create("label_only_augmentation", calibrated=True), only_augment)
    assert not attacks.runnable(attacks.create("qmia"), only_augment)
    assert not attacks.runnable(attacks.create("rmia"), full)  # still needs the references' population outputs


# ------------------------------------------------------------------ label-only on a real model, outputs modified
def test_label_only_attack_survives_released_outputs_reduced_to_the_top_label():
    """Digits, an MLP overfit on 150 records (the rest are non-members). The released outputs are one-hot
    vectors of the predicted class: the loss attack is left with two values (right or wrong), the label-only
    attacks, which read the predicted labels on perturbed copies only, still separate members."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32)
    y = d.target
    member = np.zeros(len(y), bool)
    member[np.random.default_rng(0).permutation(len(y))[:150]] = True
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 10))
    recipe = training.Recipe(
        epochs=100, batch_size=50, optimizer="adam", lr=3e-3, weight_decay=0.0, schedule="constant"
    )
    runtime = training.Runtime(device="cpu", progress=False, eval_every=1000, threads=1)
    training.fit(
        model, torch.nn.functional.cross_entropy, (x[member], torch.tensor(y[member])), recipe=recipe, runtime=runtime
    )
    logits = training.predict_logits(model, x, device="cpu").astype(np.float64)
    released = 10.0 * np.eye(10)[logits.argmax(1)]  # the defense: only the top label leaves the model
    labels = {
        kind: predict_perturbed_labels(model, x, kind=kind, num=32, scale=0.5, seed=0, device="cpu")
        for kind in ("augment", "noise")
    }
    inputs = AttackInputs(released, y, target_perturbed_labels=labels["augment"], target_noise_labels=labels["noise"])
    loss_scores = attacks.create("loss").score(inputs)
    assert np.unique(loss_scores).size == 2  # degenerate: correct or not
    auc = {name: metrics.roc_auc(s, member) for name, s in attacks.score_all(inputs).items()}
    # measured: loss on the released outputs 0.536 (the gap attack); label-only 0.624 (augment), 0.592 (noise)
    assert set(auc) == {
        "loss",
        "confidence",
        "entropy",
        "modified_entropy",
        "label_only_augmentation",
        "label_only_noise",
    }
    for name in ("label_only_augmentation", "label_only_noise"):
        assert auc[name] > 0.57, auc
        assert auc[name] > auc["loss"] + 0.03, auc


# ------------------------------------------------------------------ label-only on a planted task: labels, no scores
def planted_label_memoriser(seed=0, per_class=60, c=10, q=16, k=4, z=400, d=8):
    """A "model" that memorises its members' labels but releases uniform confidences, built as arrays.

    Each class has `per_class` records, half of them members of the target (so the label alone says nothing about
    membership). On each of `q` perturbed queries a model keeps the true label of a record it trained on with
    probability 0.97, and of any other record with a fixed per-record probability in [0.3, 0.7] (some records are
    easier than others), else predicts another class at random. `k` reference models are built the same way,
    each record IN for half of them. Every logit is the same constant (uniform confidences, so the predicted
    labels cannot be argmax of the logits: they are given as `*_perturbed_labels` and `*_noise_labels`)."""
    rng = np.random.default_rng(seed)
    n = per_class * c
    labels = np.repeat(np.arange(c), per_class)
    member = np.zeros(n, bool)
    for cls in range(c):
        member[rng.permutation(np.flatnonzero(labels == cls))[: per_class // 2]] = True
    p_out = rng.uniform(0.3, 0.7, n)

    def predicted(trained_on):  # (..., n) bool -> (..., n, q) predicted labels
        keep = rng.random((*trained_on.shape, q)) < np.where(trained_on, 0.97, p_out)[..., None]
        other = (labels[:, None] + rng.integers(1, c, (*trained_on.shape, q))) % c
        return np.where(keep, labels[:, None], other)

    reference_in = np.zeros((k, n), bool)
    for j in range(n):
        reference_in[rng.permutation(k)[: k // 2], j] = True
    flat = lambda *shape: np.ones((*shape, c))  # noqa: E731
    inputs = AttackInputs(
        flat(n),
        labels,
        flat(k, n),
        reference_in,
        population_target_logits=flat(z),
        population_labels=rng.integers(0, c, z),
        population_reference_logits=flat(k, z),
        target_perturbed_labels=predicted(member),
        reference_perturbed_labels=predicted(reference_in),
        target_noise_labels=predicted(member),
        reference_noise_labels=predicted(reference_in),
        features=rng.normal(size=(n, d)),
        population_features=rng.normal(size=(z, d)),
    )
    return inputs, member


def test_label_only_attacks_find_a_label_memoriser_that_every_score_attack_misses():
    """Membership lives in the predicted labels only: the label-only attacks separate members, every attack on
    the (constant) logits sees one score for all records, or a score of the label alone, and gets AUC 0.5."""
    inputs, member = planted_label_memoriser()
    scores = attacks.score_all(inputs)
    label_only = {"label_only_augmentation", "label_only_noise"}
    # every attack ran (references, population, features given) but those on statistics measured from the weights
    assert set(scores) == set(attacks.available()) - {"label_only_boundary", "gradient"}
    auc = {name: metrics.roc_auc(s, member) for name, s in scores.items()}
    # measured: 0.995 (augment), 0.984 (noise), calibrated by the 4 reference models; uncalibrated 0.999, 0.998
    for name in label_only:
        assert auc[name] > 0.9, auc
        raw = attacks.create(name, calibrated=False).score(inputs)
        assert metrics.roc_auc(raw, member) > 0.9
    for name in set(scores) - label_only - {"qmia"}:
        # loss, confidence, entropy, modified entropy, LiRA, RMIA: constant scores; the shadow classifier's
        # depends on the label only, which each class's members and non-members share equally
        assert auc[name] == pytest.approx(0.5, abs=1e-12), (name, auc[name])
    assert np.ptp(scores["loss"]) == 0 and np.ptp(scores["lira"]) == 0 and np.ptp(scores["rmia"]) == 0
    # QMIA: a constant margin minus a quantile regressed on random features, noise (measured 0.485)
    assert abs(auc["qmia"] - 0.5) < 0.05, auc["qmia"]


# ------------------------------------------------------------------ QMIA
def test_pinball_loss_equals_the_formula():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=50), rng.normal(size=50)
    for tau in (0.1, 0.5, 0.9):
        direct = sum(tau * (t - p) if t >= p else (1 - tau) * (p - t) for p, t in zip(pred, target, strict=True)) / 50
        got = pinball_loss(torch.from_numpy(pred), torch.from_numpy(target), quantile=tau)
        assert float(got) == pytest.approx(direct, rel=1e-12)
    # the constant minimising it is the tau-quantile
    grid = np.linspace(-3, 3, 601)
    losses = [float(pinball_loss(torch.full((50,), g), torch.from_numpy(target), quantile=0.8)) for g in grid]
    assert grid[int(np.argmin(losses))] == pytest.approx(np.quantile(target, 0.8), abs=0.1)


def test_hinge_score_and_conformal_shift_match_loops():
    rng = np.random.default_rng(1)
    z, y = rng.normal(size=(20, 3, 5)), rng.integers(0, 5, 20)
    expected = [
        np.mean([z[i, a, y[i]] - max(z[i, a, c] for c in range(5) if c != y[i]) for a in range(3)]) for i in range(20)
    ]
    np.testing.assert_allclose(hinge_score(z, y), expected, atol=1e-12)
    r = rng.normal(size=37)
    for alpha in (0.05, 0.1, 0.5):
        need = math.ceil((1 - alpha) * 38)  # the smallest t with at least ceil((1 - alpha)(m + 1)) residuals <= t
        t = min(v for v in r if sum(w <= v for w in r) >= need)
        assert conformal_shift(r, alpha) == t
    assert conformal_shift(r[:5], 0.01) == r[:5].max()  # too few residuals: the largest


def planted_qmia(seed=0, n=2000, z=2000, fresh=2000, d=16):
    """Non-member margins depend on the record (mean and spread); membership adds one spread to the margin."""
    rng = np.random.default_rng(seed)
    w, v = rng.normal(size=d) / d**0.5, rng.normal(size=d) / d**0.5

    def draw(m, member):
        x = rng.normal(size=(m, d))
        spread = 0.3 + 0.7 * (1 + np.tanh(x @ v))
        return x, 2 * np.tanh(x @ w) + spread * (rng.normal(size=m) + member)

    is_member = rng.random(n) < 0.5
    x, phi = draw(n, is_member)
    xz, phiz = draw(z, np.zeros(z))
    xf, phif = draw(fresh, np.zeros(fresh))
    logits = lambda p: np.stack([p, np.zeros_like(p)], -1)  # noqa: E731  (label 0: the margin is phi)
    inputs = AttackInputs(
        logits(np.r_[phi, phif]),
        np.zeros(n + fresh, np.int64),
        population_target_logits=logits(phiz),
        population_labels=np.zeros(z, np.int64),
        features=np.r_[x, xf],
        population_features=xz,
    )
    return inputs, is_member, phi


def test_qmia_recovers_planted_membership_at_its_false_positive_rate():
    inputs, is_member, phi = planted_qmia()
    n = is_member.size
    scores = attacks.create("qmia", alpha=0.1).score(inputs)
    audited, fresh = scores[:n], scores[n:]  # fresh: non-members the regressor never saw
    auc = metrics.roc_auc(audited, is_member)
    assert auc > 0.6
    assert auc > metrics.roc_auc(phi, is_member) + 0.02  # the per-record quantile beats one global threshold
    # measured: AUC 0.698 (the margin alone: 0.648); FPR 0.091 on fresh non-members, 0.111 on audited ones;
    # without the conformal shift (calibration_fraction=0), the overfit quantile lets through 0.18
    assert 0.05 <= (fresh > 0).mean() <= 0.2
    assert abs((fresh > 0).mean() - 0.1) < 0.035  # the conformal shift: close to alpha, not merely within 2x
    assert 0.05 <= (audited[~is_member] > 0).mean() <= 0.2
    np.testing.assert_array_equal(scores, attacks.create("qmia", alpha=0.1).score(inputs))  # seeded
    assert not np.array_equal(scores, attacks.create("qmia", alpha=0.1, seed=1).score(inputs))
    whole = attacks.create("qmia", alpha=0.1, calibration_fraction=0.0).score(inputs)  # Bertran et al.'s fit
    assert metrics.roc_auc(whole[:n], is_member) > 0.6


def exceedance_by_bin(x, above, bins=4):
    """The fraction of `above` in each of `bins` equal-width bins of `x` in [0, 1)."""
    which = np.minimum((x * bins).astype(int), bins - 1)
    return np.array([above[which == b].mean() for b in range(bins)])


def test_quantile_regressor_matches_the_conditional_quantile_of_a_1d_score():
    """x ~ U(0, 1), a non-member's score x + (0.05 + 0.1 x) N(0, 1): its mean and spread both depend on x. Fitted
    on 2,000 population records, the predicted `1 - alpha` quantile is exceeded by a fraction alpha of 5,000
    fresh non-members, overall and in each quarter of x; a constant quantile (the population's), or the true mean
    plus a constant offset, is right overall but not per bin, which the bin checks catch."""
    rng = np.random.default_rng(0)

    def draw(m):
        x = rng.random(m)
        return x, x + (0.05 + 0.1 * x) * rng.normal(size=m)

    xz, sz = draw(2000)
    xf, sf = draw(5000)
    logits = lambda phi: np.stack([phi, np.zeros_like(phi)], -1)  # noqa: E731  (label 0: the margin is the score)
    inputs = AttackInputs(
        logits(sf),
        np.zeros(sf.size, np.int64),
        population_target_logits=logits(sz),
        population_labels=np.zeros(sz.size, np.int64),
        features=xf[:, None],
        population_features=xz[:, None],
    )
    for alpha in (0.1, 0.05):
        predict = fit_quantile_regressor(xz[:, None], sz, quantile=1 - alpha)
        above = sf > predict(xf[:, None])
        # measured: 0.090 overall, bins 0.095 0.084 0.098 0.081 (alpha 0.1); 0.044, bins 0.044 0.037 0.055 0.040
        assert abs(above.mean() - alpha) < 0.02, (alpha, above.mean())
        assert np.abs(exceedance_by_bin(xf, above) - alpha).max() < 0.05, (alpha, exceedance_by_bin(xf, above))
        # the attack's own fit (features and one-hot label, conformal shift on 400 held-back records): the shift
        # is noisier (measured 0.109 overall, bins up to 0.131 at alpha 0.1; 0.045, up to 0.057 at 0.05)
        flagged = attacks.create("qmia", alpha=alpha).score(inputs) > 0
        assert abs(flagged.mean() - alpha) < 0.035, (alpha, flagged.mean())
        assert np.abs(exceedance_by_bin(xf, flagged) - alpha).max() < 0.075, (alpha, exceedance_by_bin(xf, flagged))
        # the bin checks have power: a constant quantile is right overall, far off per bin (measured bins 0, 0,
        # 0.01, 0.38 at alpha 0.1; 0, 0, 0.004, 0.18 at 0.05)
        constant = sf > np.quantile(sz, 1 - alpha)
        assert abs(constant.mean() - alpha) < 0.02
        assert np.abs(exceedance_by_bin(xf, constant) - alpha).max() > 0.075
    # and the true mean plus a constant offset (ignoring the spread) fails the fit's bin check at alpha 0.1
    # (measured bins 0.02, 0.07, 0.12, 0.16)
    shifted = sf > xf + np.quantile(sz - xz, 0.9)
    assert abs(shifted.mean() - 0.1) < 0.02
    assert np.abs(exceedance_by_bin(xf, shifted) - 0.1).max() > 0.05


def test_qmia_on_trained_digits_models_beats_chance_at_its_false_positive_rate():
    """Digits, no reference models: 8 MLPs (seeds 0-7), each trained with cross-entropy on a random half of a
    300-record pool; QMIA (alpha 0.1) regresses on 1,200 other records; 297 more are fresh non-members.

    What holds: QMIA is better than chance on every model, and its threshold at 0 flags about a fraction alpha
    of non-members (the pool's and the fresh ones), more members than non-members. What does not hold
    reliably: QMIA beating the global loss threshold at TPR@1%FPR. Over 60 models (seeds 0-59) QMIA's
    TPR@1%FPR is higher on 31, equal on 6, lower on 23 (mean 0.024 vs 0.020; alpha 0.01: 0.022, 28/10/22),
    and its AUC is lower (mean 0.575 vs 0.614): the models generalise (~92% held-out accuracy), and at 1% of
    150 non-members (one false positive) both attacks are near chance. Not asserted."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)
    alpha = 0.1
    auc, flagged_members, flagged_out = [], [], []
    for seed in range(8):
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(y))
        pool, population, fresh = order[:300], order[300:1500], order[1500:]
        member = np.zeros(300, bool)
        member[rng.permutation(300)[:150]] = True
        torch.manual_seed(seed)
        model = models.MLP(num_classes=10, input_shape=(64,), hidden=(64,))
        recipe = training.Recipe(epochs=30, batch_size=32, lr=0.05, schedule="constant", seed=seed)
        runtime = training.Runtime(device="cpu", progress=False, eval_every=1000)
        train = (torch.from_numpy(x[pool[member]]), torch.from_numpy(y[pool[member]]))
        training.fit(model, torch.nn.functional.cross_entropy, train, recipe=recipe, runtime=runtime)

        def logits(idx, model=model):
            return training.predict_logits(model, torch.from_numpy(x[idx]), device="cpu").astype(np.float64)

        audited = np.r_[pool, fresh]
        inputs = AttackInputs(
            logits(audited),
            y[audited],
            population_target_logits=logits(population),
            population_labels=y[population],
            features=x[audited].astype(np.float64),
            population_features=x[population].astype(np.float64),
        )
        qmia = attacks.create("qmia", alpha=alpha).score(inputs)
        loss = attacks.create("loss").score(inputs)  # no references: one global threshold on the loss
        auc.append((metrics.roc_auc(qmia[:300], member), metrics.roc_auc(loss[:300], member)))
        flagged_members.append(qmia[:300][member] > 0)
        flagged_out.append(np.r_[qmia[:300][~member], qmia[300:]] > 0)
    auc = np.array(auc)
    fpr = np.concatenate(flagged_out).mean()
    tpr = np.concatenate(flagged_members).mean()
    # measured: QMIA AUC mean 0.575 (min 0.547; loss 0.601); FPR at 0: 0.091 on 3,576 non-members, TPR 0.141;
    # TPR@1%FPR mean QMIA 0.023, loss 0.008 (higher on 6 of these 8 models, equal on 1, lower on 1: a lucky
    # draw, see the docstring)
    assert auc[:, 0].min() > 0.5, auc
    assert auc[:, 0].mean() > 0.55, auc
    assert 0.5 * alpha <= fpr <= 2 * alpha and abs(fpr - alpha) < 0.03, fpr
    assert tpr > fpr + 0.01, (tpr, fpr)


@pytest.mark.parametrize(
    ("params", "pattern"),
    [
        ({"alpha": 0.0}, "`alpha`"),
        ({"alpha": 1.0}, "`alpha`"),
        ({"alpha": 1.5}, "`alpha`"),
        ({"alpha": "0.1"}, "`alpha`"),
        ({"steps": 0}, "`steps`"),
        ({"hidden": 0}, "`hidden`"),
        ({"lr": 0.0}, "`lr`"),
        ({"calibration_fraction": 0.9}, "`calibration_fraction`"),
        ({"seed": -1}, "`seed`"),
    ],
)
def test_qmia_rejects_bad_options(params, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        attacks.create("qmia", **params)


def test_qmia_names_the_missing_inputs():
    rng = np.random.default_rng(0)
    bare = AttackInputs(rng.normal(size=(10, 3)), rng.integers(0, 3, 10))
    with pytest.raises(ValueError, match="`population_target_logits`.*missing"):
        QMIA().score(bare)
    with_pop = AttackInputs(
        rng.normal(size=(10, 3)),
        rng.integers(0, 3, 10),
        population_target_logits=rng.normal(size=(8, 3)),
        population_labels=rng.integers(0, 3, 8),
    )
    with pytest.raises(ValueError, match="`features`.*missing"):
        QMIA().score(with_pop)
    tiny = AttackInputs(
        rng.normal(size=(10, 3)),
        rng.integers(0, 3, 10),
        population_target_logits=rng.normal(size=(2, 3)),
        population_labels=rng.integers(0, 3, 2),
        features=rng.normal(size=(10, 4)),
        population_features=rng.normal(size=(2, 4)),
    )
    with pytest.raises(ValueError, match="`calibration_fraction`"):
        QMIA().score(tiny)
    assert QMIA(calibration_fraction=0.0, steps=5).score(tiny).shape == (10,)
    one = AttackInputs(
        rng.normal(size=(10, 3)),
        rng.integers(0, 3, 10),
        population_target_logits=rng.normal(size=(1, 3)),
        population_labels=rng.integers(0, 3, 1),
        features=rng.normal(size=(10, 4)),
        population_features=rng.normal(size=(1, 4)),
    )
    with pytest.raises(ValueError, match="`population_target_logits`.*at least 2"):
        QMIA(calibration_fraction=0.0).score(one)
