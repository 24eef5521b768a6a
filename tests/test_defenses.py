"""Defenses that change training: DP-SGD (Opacus) and early stopping."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import ccl
from ccl import defenses
from ccl.audit import run_audit
from ccl.config import ExperimentConfig, parse_defense
from ccl.errors import ConfigError, InvalidArgumentError
from ccl.results import load_results
from ccl.training import Recipe, Runtime, fit

pytest.importorskip("opacus")


def tiny():
    data = ccl.data.load("synthetic", num_samples=64, num_features=6, num_classes=3)
    model = ccl.models.create("mlp", num_classes=3, input_shape=(6,), hidden=(8,), seed=0)
    return data, model


def test_a_dp_step_equals_clipped_per_sample_gradients_summed_by_a_loop():
    """noise_multiplier=0: one DP-SGD step is the mean (over the expected batch size) of the per-sample
    gradients, each clipped to max_grad_norm, computed here by one backward pass per sample."""
    from ccl.defenses.dpsgd import DPTrainer

    data, model = tiny()
    reference = copy.deepcopy(model)
    dp = defenses.create("dpsgd", noise_multiplier=0.0, max_grad_norm=0.05).procedure
    trainer = DPTrainer(model, dp, num_records=64, batch_size=16, epochs=1)
    base = torch.optim.SGD(trainer.module.parameters(), lr=1.0)
    optimizer = trainer.optimizer(base)
    idx = torch.arange(10)
    loss = torch.nn.functional.cross_entropy(trainer.module(data.x[idx]), data.y[idx])
    loss.backward()
    optimizer.step()
    clipped = [torch.zeros_like(p) for p in reference.parameters()]
    for i in idx:
        reference.zero_grad()
        torch.nn.functional.cross_entropy(reference(data.x[i : i + 1]), data.y[i : i + 1]).backward()
        grads = [p.grad.clone() for p in reference.parameters()]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        scale = min(1.0, 0.05 / (float(norm) + 1e-6))
        for c, g in zip(clipped, grads, strict=True):
            c += g * scale
    for p_dp, p_ref, c in zip(model.parameters(), reference.parameters(), clipped, strict=True):
        torch.testing.assert_close(p_dp.detach(), p_ref.detach() - c / 16, rtol=1e-5, atol=1e-6)


def test_the_noise_is_calibrated_by_the_accountant_and_the_spent_epsilon_reported(quiet):
    from opacus.accountants import RDPAccountant

    from ccl.defenses.dpsgd import calibrate_noise, epsilon_spent

    sigma = calibrate_noise(4.0, 1e-5, sample_rate=0.1, steps=500)
    spent = epsilon_spent(sigma, 0.1, 500, 1e-5)
    assert 3.9 <= spent <= 4.0  # Opacus searches from below, to within 0.01
    acc = RDPAccountant()
    acc.history = [(sigma, 0.1, 500)]
    assert spent == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)  # the one-step curve composed linearly
    data, model = tiny()
    d = defenses.create("dpsgd", epsilon=3.0)
    result = fit(
        model,
        d.loss,
        (data.x, data.y),
        recipe=Recipe(epochs=3, batch_size=16, lr=0.1),
        runtime=quiet,
        procedure=d.procedure,
    )
    assert 2.9 <= result.epsilon <= 3.0 and result.history[-1]["epsilon"] == result.epsilon
    assert result.history[0]["epsilon"] < result.history[1]["epsilon"] < result.epsilon


@pytest.mark.usefixtures("checkpoint_every_epoch")
def test_an_interrupted_dp_model_resumes_to_the_same_weights_and_epsilon(tmp_path, quiet):
    class Interrupting(torch.nn.Module):
        def __init__(self, at):
            super().__init__()
            self.at, self.inner = at, ccl.losses.create("ce")

        def set_epoch(self, epoch):
            if epoch == self.at:
                raise KeyboardInterrupt

        def forward(self, out, y):
            return self.inner(out, y)

    data, _ = tiny()
    d = defenses.create("dpsgd", epsilon=5.0)
    recipe = Recipe(epochs=4, batch_size=16, lr=0.1, seed=3)

    def model():
        return ccl.models.create("mlp", num_classes=3, input_shape=(6,), hidden=(8,), seed=0)

    full = fit(
        model(),
        d.loss,
        (data.x, data.y),
        recipe=recipe,
        runtime=quiet,
        procedure=d.procedure,
        checkpoint_dir=tmp_path / "full",
    )
    with pytest.raises(KeyboardInterrupt):
        fit(
            model(),
            Interrupting(2),
            (data.x, data.y),
            recipe=recipe,
            runtime=quiet,
            procedure=d.procedure,
            checkpoint_dir=tmp_path / "cut",
        )
    resumed = fit(
        model(),
        d.loss,
        (data.x, data.y),
        recipe=recipe,
        runtime=quiet,
        procedure=d.procedure,
        checkpoint_dir=tmp_path / "cut",
    )
    assert resumed.resumed_from_epoch == 2
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert resumed.epsilon == full.epsilon


@pytest.mark.slow  # 12 models: 6 s on an idle 2-core CPU, 30-90 s under load
def test_dp_sgd_accuracy_does_not_fall_as_epsilon_rises_on_a_fixed_recipe():
    """Less noise must not cost accuracy on a recipe that trains: digits (1,000 records to train, 797 to test), an
    MLP of 64 Tanh units, SGD at lr 0.1 with momentum 0.9, batches of 64 (Poisson) for 15 epochs; the mean test
    accuracy over three seeds (measured: 66.0% at epsilon 1, 92.7% at 8, 93.8% at 64, 94.1% without noise) may
    dip by at most 1 point, about one standard error of a mean of three (see ccl.dp on a recipe where too small a
    learning rate made more noise help)."""
    data = ccl.data.load("digits")
    order = torch.randperm(len(data.y), generator=torch.Generator().manual_seed(0))
    train, test = order[:1000], order[1000:]
    recipe = Recipe(epochs=15, batch_size=64, lr=0.1, momentum=0.9, schedule="constant")

    def mean_accuracy(**privacy) -> float:
        d = defenses.create("dpsgd", **privacy)
        accuracies = []
        for seed in (0, 1, 2):
            model = ccl.models.create("mlp", num_classes=10, input_shape=data.input_shape, hidden=(64,), seed=seed)
            result = fit(
                model,
                d.loss,
                (data.x[train], data.y[train]),
                heldout=(data.x[test], data.y[test]),
                recipe=recipe.replace(seed=seed),
                runtime=Runtime(progress=False, eval_every=recipe.epochs),
                procedure=d.procedure,
            )
            accuracies.append(result.history[-1]["heldout_acc"])
        return float(np.mean(accuracies))

    accuracy = [mean_accuracy(epsilon=e) for e in (1.0, 8.0, 64.0)] + [mean_accuracy(noise_multiplier=0.0)]
    assert accuracy[0] < accuracy[1] - 0.1  # epsilon 1 costs much; the recipe is no flat under-trained plateau
    for less_noise, more_noise in zip(accuracy[1:], accuracy[:-1], strict=True):
        assert less_noise >= more_noise - 0.01, accuracy


def test_models_with_batchnorm_train_under_dp_with_groupnorm(quiet):
    data = ccl.data.load("digits", as_image=True)
    model = ccl.models.create("cnn", num_classes=10, input_shape=data.input_shape, width=4, seed=0)
    d = defenses.create("dpsgd", epsilon=8)
    result = fit(
        model,
        d.loss,
        data.subset(np.arange(128)),
        recipe=Recipe(epochs=1, batch_size=32, lr=0.1),
        runtime=quiet,
        procedure=d.procedure,
    )
    assert any(isinstance(m, torch.nn.GroupNorm) for m in result.model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in result.model.modules())


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("dpsgd", "`epsilon`"),
        ("dpsgd:epsilon=8,noise_multiplier=1", "`epsilon`"),
        ("dpsgd:epsilon=-1", "`epsilon`"),
        ("dpsgd:epsilon=8,delta=2", "`delta`"),
        ("dpsgd:epsilon=8,max_grad_norm=0", "`max_grad_norm`"),
        ("dpsgd:epsilon=8,loss=relaxloss", "`loss`"),
        ("dpsgd:epsilon=8,accountant=gdp", "`accountant`"),
        ("early_stop", "epochs"),
        ("early_stop:epochs=0", "`epochs`"),
        ("dpsgd:epsilon=8,epochs=3", "epochs"),
    ],
)
def test_bad_defense_parameters_are_named(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_defense(spec)


def test_defenses_registry_lists_losses_and_procedures():
    assert {"ce", "ccel", "relaxloss", "dpsgd", "early_stop"} <= set(defenses.available())
    doc, params = defenses.describe("dpsgd")
    assert "Opacus" in doc and params["delta"] == 1e-5 and params["max_grad_norm"] == 1.0
    with pytest.raises(InvalidArgumentError, match="Unknown defense 'dpsdg'.*dpsgd"):
        defenses.create("dpsdg")


def test_dp_sgd_and_early_stopping_lower_leakage_and_the_lower_bound_respects_the_guarantee(tmp_path, quiet):
    """On digits, where CE overfits: both defenses lower the leave-one-out LiRA AUC; for DP-SGD the measured
    epsilon lower bound stays below the epsilon spent (if not, one of the two is wrong)."""
    config = ExperimentConfig.from_dict(
        {
            "dataset": "digits",
            "model_options": {"hidden": [64]},
            "population_fraction": 0.7,
            "num_references": 4,
            "bootstrap": 20,
            "attacks": ["loss", "lira", "rmia"],
            "defenses": ["ce", "dpsgd:epsilon=2@lr=0.1", "early_stop:epochs=5"],  # CE's recipe, stated
            "train": {"epochs": 30, "batch_size": 32, "lr": 0.1, "schedule": "constant"},
        }
    )
    agg = run_audit(config, tmp_path / "run", runtime=quiet)
    rows = {r.defense: r for r in agg.rows}
    ce, dp, early = rows["ce"], rows["dpsgd(epsilon=2)@lr=0.1"], rows["early_stop(epochs=5)"]
    assert dp.metric("lira", "auc", "pooled")[0] < ce.metric("lira", "auc", "pooled")[0] - 0.05
    assert early.metric("lira", "auc", "pooled")[0] < ce.metric("lira", "auc", "pooled")[0] - 0.02
    assert 1.9 <= dp.values["dp_epsilon"] <= 2.0 and "dp_epsilon" not in ce.values
    for result in load_results(tmp_path / "run"):
        if result.dp_epsilon is None:
            continue
        for evaluation in ("pooled",):
            for attack, m in result.evaluations[evaluation].items():
                assert m["epsilon_lb"] <= result.dp_epsilon, (evaluation, attack)
        for attack, m in result.attacks.items():
            assert m["epsilon_lb"] <= result.dp_epsilon, attack
    # the reference models were trained with the target's defense: DP ones one by one, each with its epsilon
    models = list((tmp_path / "run" / "models").glob("*/job.json"))
    import json

    dp_jobs = [json.loads(p.read_text()) for p in models if json.loads(p.read_text())["defense"]["name"] == "dpsgd"]
    assert len(dp_jobs) == 5 and all(j["trainer"] == "single" and 1.9 <= j["epsilon"] <= 2.0 for j in dp_jobs)


# ------------------------------------------------------------------ HAMP
def test_hamp_soft_labels_have_the_requested_entropy_and_the_loss_matches_its_formula():
    import math

    from ccl.defenses import HAMPLoss, hamp_soft_label_confidence

    for c, gamma in ((10, 0.95), (3, 0.5), (100, 0.99)):
        p = hamp_soft_label_confidence(c, gamma)
        q = (1 - p) / (c - 1)
        assert -(p * math.log(p) + (c - 1) * q * math.log(q)) == pytest.approx(gamma * math.log(c), rel=1e-9)
    logits, target = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    loss = HAMPLoss(gamma=0.9, alpha=0.1, reduction="none")(logits, target)
    p = hamp_soft_label_confidence(4, 0.9)
    for i in range(6):
        probs = torch.softmax(logits[i], -1)
        soft = torch.full((4,), (1 - p) / 3)
        soft[target[i]] = p
        manual = -(soft * probs.log()).sum() + 0.1 * (probs * probs.log()).sum()
        assert float(loss[i]) == pytest.approx(float(manual), rel=1e-5)


def test_hamp_output_modification_keeps_the_rank_order_and_releases_random_scores():
    from ccl.defenses import hamp_modify

    rng = np.random.default_rng(0)
    real, random = rng.normal(size=(50, 7)), rng.normal(size=(50, 7))
    released = np.exp(hamp_modify(real, random))
    assert (released.argmax(-1) == real.argmax(-1)).all()  # the predicted label stays
    assert (released.argsort(-1) == real.argsort(-1)).all()  # so does the whole order
    softmax = np.exp(random) / np.exp(random).sum(-1, keepdims=True)
    np.testing.assert_allclose(np.sort(released, -1), np.sort(softmax, -1), rtol=1e-5)  # the random input's scores


def test_hamp_hides_from_score_attacks_but_not_from_label_only_ones(tmp_path, quiet):
    """HAMP's modified outputs bring score-based attacks to chance; label-only attacks still see the labels,
    and the headline reads the strongest attack of either kind."""
    from ccl.results import load_aggregate
    from ccl.summary import strongest_attack

    config = ExperimentConfig.from_dict(
        {
            "dataset": "digits",
            "model_options": {"hidden": [64]},
            "population_fraction": 0.8,
            "num_references": 4,
            "bootstrap": 10,
            "defenses": ["ce", "hamp"],
            "train": {"epochs": 30, "batch_size": 32, "lr": 0.05, "schedule": "constant"},
        }
    )
    run_audit(config, tmp_path / "run", runtime=quiet)
    agg = load_aggregate(tmp_path / "run")
    ce, hamp = (r for r in agg.rows)
    assert hamp.metric("lira", "auc", "pooled")[0] < 0.56 < ce.metric("lira", "auc", "pooled")[0]
    assert hamp.metric("label_only_augmentation", "auc", "pooled")[0] > 0.56
    assert strongest_attack(agg, "hamp").startswith("label_only")
    assert hamp.test_acc > 0.85  # accuracy is measured on the released outputs: the labels are kept
