"""Attacks a defense cannot hide from: label-only attacks (predicted labels on perturbed copies) and QMIA
(a quantile regressor fitted on public non-members, no reference models). Fast paths against loops; planted
and real membership."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ccl import attacks, metrics, training
from ccl.attacks import AttackInputs, LabelOnlyAttack, NotEnoughReferencesError
from ccl.attacks.label_only import (
    CHUNK,
    calibrated_correct_fraction,
    chunk_seed,
    correct_fraction,
    perturbed_queries,
    predict_perturbed_labels,
)
from ccl.attacks.qmia import QMIA, conformal_shift, hinge_score, pinball_loss

NEW = {"label_only_augmentation", "label_only_noise", "qmia"}


@pytest.fixture(autouse=True)
def one_thread():
    """Small full-batch fits: one thread is as fast, and immune to other processes on a shared machine."""
    with training.torch_threads(1):
        yield


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
