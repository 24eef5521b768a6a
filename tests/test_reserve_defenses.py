"""The defenses that learn from the defender's reserve: adversarial regularisation, distillation (DMP) and early
stopping by patience; and the reserve itself (split, config, resume)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ccl
from ccl import defenses
from ccl.audit import run_audit
from ccl.config import ExperimentConfig, parse_defense
from ccl.defenses.advreg import AdversarialLoss, InferenceModel, inference_gain
from ccl.defenses.distillation import DistillationLoss, soft_labels
from ccl.errors import ConfigError, InvalidArgumentError
from ccl.training import Recipe, fit, predict_logits


def digits_parts():
    data = ccl.data.load("digits")
    order = np.random.default_rng(0).permutation(len(data))
    return data, order[:120], order[120:240], order[240:480]  # members, non-members, reserve


def mlp(seed=0, hidden=(32,)):
    return ccl.models.create("mlp", num_classes=10, input_shape=(64,), hidden=hidden, seed=seed)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.fixture
def train(quiet):
    """`train(defense, ...)`: fits an MLP on digits' members with the defense, the non-members held out and the
    reserve given."""

    def train(defense, *, epochs=8, seed=0, checkpoint_dir=None, loss=None, model=None, lr=0.05):
        data, mem, non, res = digits_parts()
        d = defenses.create(*defense) if isinstance(defense, tuple) else defense
        return fit(
            model or mlp(seed),
            loss or d.loss,
            data.subset(mem),
            heldout=data.subset(non),
            recipe=Recipe(epochs=epochs, batch_size=32, lr=lr, schedule="constant", seed=seed),
            runtime=quiet,
            procedure=d.procedure,
            reserve=data.subset(res),
            checkpoint_dir=checkpoint_dir,
        )

    return train


class Interrupting(torch.nn.Module):
    """A loss that interrupts training at the start of epoch `at` (as Ctrl-C would)."""

    def __init__(self, inner, at):
        super().__init__()
        self.inner, self.at = inner, at

    def set_epoch(self, epoch):
        if epoch == self.at:
            raise KeyboardInterrupt

    def forward(self, out, y):
        return self.inner(out, y)


# ------------------------------------------------------------------ adversarial regularisation
def test_the_inference_gain_is_the_mean_log_likelihood_of_members_and_non_members():
    torch.manual_seed(0)
    h = InferenceModel(5)
    pm, pn = torch.softmax(torch.randn(7, 5), -1), torch.softmax(torch.randn(9, 5), -1)
    ym, yn = torch.randint(0, 5, (7,)), torch.randint(0, 5, (9,))
    with torch.no_grad():
        by_hand = (
            sum(math.log(float(h(pm[i : i + 1], ym[i : i + 1]))) for i in range(7)) / 7
            + sum(math.log(1 - float(h(pn[i : i + 1], yn[i : i + 1]))) for i in range(9)) / 9
        )
    assert float(inference_gain(h, pm, ym, pn, yn).detach()) == pytest.approx(by_hand, rel=1e-5)


def test_advreg_at_alpha_zero_trains_exactly_the_plain_loss_while_its_adversary_learns(train):
    """The inner adversary runs (h trains, the classifier is queried in eval mode) but, at alpha 0, leaves the
    classifier's weights bit-identical to plain CE training: the wrapper adds nothing else."""
    plain = train(("ce",))
    adv = train(defenses.create("advreg", alpha=0.0))
    assert same_weights(plain.model, adv.model)
    gains = [r["inference_gain"] for r in adv.history]
    assert all(np.isfinite(gains)) and max(gains) > -2 * math.log(2)  # better than chance on an overfit model


def test_advreg_classifier_loss_is_the_base_loss_plus_alpha_times_the_flagged_rate():
    data, mem, _, res = digits_parts()
    model = mlp()
    loss = AdversarialLoss(
        ccl.losses.create("ce"),
        classifier=model,
        module=model,
        members=data.subset(mem),
        reserve=data.subset(res),
        num_classes=10,
        alpha=2.5,
        steps=2,
        lr=1e-3,
        batch_size=16,
        seed=0,
    )
    x, y = data.subset(mem[:10])
    logits = model(x)
    value = loss(logits, y)  # trains h for 2 steps first, then scores the batch with the updated h
    flagged = loss.inference(torch.softmax(logits, -1), y).mean()
    expected_value = F.cross_entropy(logits, y) + 2.5 * (flagged - 0.5)
    assert float(value.detach()) == pytest.approx(float(expected_value.detach()), rel=1e-6)
    assert not any(n.startswith("_module") or n.startswith("_classifier") for n in loss.state_dict())


@pytest.mark.usefixtures("checkpoint_every_epoch")
def test_an_interrupted_advreg_model_resumes_to_the_same_weights(tmp_path, train):
    d = defenses.create("advreg", alpha=1.0)
    full = train(d, epochs=4, checkpoint_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(d, epochs=4, checkpoint_dir=tmp_path / "cut", loss=Interrupting(d.loss, 2))
    resumed = train(d, epochs=4, checkpoint_dir=tmp_path / "cut")
    assert resumed.resumed_from_epoch == 2
    assert same_weights(full.model, resumed.model)


# ------------------------------------------------------------------ distillation
def test_the_distillation_loss_is_t_squared_kl_and_its_gradient_the_closed_form():
    torch.manual_seed(0)
    t = 3.0
    q = soft_labels(torch.randn(6, 4), t)
    s = torch.randn(6, 4, requires_grad=True)
    loss = DistillationLoss(temperature=t)(s, q)
    reference = t * t * F.kl_div(F.log_softmax(s / t, -1), q, reduction="batchmean")
    assert float(loss) == pytest.approx(float(reference), rel=1e-6)
    loss.backward()
    closed_form = t * (torch.softmax(s.detach() / t, -1) - q) / 6  # d/ds of the batch mean
    assert torch.allclose(s.grad, closed_form, atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="soft labels"):
        DistillationLoss()(s, torch.zeros(6, dtype=torch.long))


def test_the_distilled_student_learns_only_the_teachers_soft_labels_on_the_reserve(tmp_path, quiet, train):
    """The teacher is the plain model on the members; the student starts from the same weights and trains on
    the reserve against the teacher's soft labels, with the recipe (so it equals training on those pairs)."""
    data, mem, non, res = digits_parts()
    recipe = Recipe(epochs=6, batch_size=32, lr=0.05, schedule="constant")
    d = defenses.create("distillation", temperature=2.0)
    student = train(d, epochs=6, checkpoint_dir=tmp_path / "d").model
    teacher = train(("ce",), epochs=6).model
    from ccl.training import _fit  # the loop on pre-checked (x, soft labels): the reference path

    rx = data.subset(res)[0]
    soft = soft_labels(torch.as_tensor(predict_logits(teacher, rx)), 2.0)
    by_hand = _fit(
        mlp(),
        DistillationLoss(temperature=2.0),
        (rx, soft),
        recipe=recipe,
        runtime=quiet,
        heldout=None,
        checkpoint_dir=None,
        log_path=None,
        resume=False,
        description="student",
        procedure=None,
    ).model
    assert same_weights(student, by_hand)
    assert (tmp_path / "d" / "teacher" / "checkpoint.pt").exists()
    assert not same_weights(student, teacher)


# ------------------------------------------------------------------ early stopping by patience
def test_patience_releases_the_best_validation_epoch_as_a_brute_force_over_epochs_finds_it(train):
    """Slow and obvious: train to every epoch e with `early_stop:epochs=e` (same schedule), compute the
    validation loss on the reserve, apply the patience rule by hand; the patience run must release exactly
    the weights after the best epoch and stop `patience` epochs after it."""
    data, _, _, res = digits_parts()
    rx, ry = data.subset(res)
    epochs, patience = 14, 2
    losses, models = [], []
    for e in range(1, epochs + 1):
        m = train(defenses.create("early_stop", epochs=e), epochs=epochs).model
        losses.append(float(F.cross_entropy(m(rx), ry)))
        models.append(m)
    best, best_epoch, bad, stopped_at = math.inf, 0, 0, epochs
    for e, v in enumerate(losses, 1):
        if v < best:
            best, best_epoch, bad = v, e, 0
        else:
            bad += 1
        if bad >= patience:
            stopped_at = e
            break
    result = train(defenses.create("early_stop", patience=patience), epochs=epochs)
    assert len(result.history) == stopped_at and result.history[-1]["released_epoch"] == best_epoch
    assert [r["val_loss"] for r in result.history] == pytest.approx(losses[:stopped_at], rel=1e-5)
    assert same_weights(result.model, models[best_epoch - 1])


def test_the_patience_checkpoint_and_last_record_are_those_of_the_released_model(tmp_path, train):
    data, _, non, _ = digits_parts()
    d = defenses.create("early_stop", patience=2)
    result = train(d, epochs=30, checkpoint_dir=tmp_path / "p", model=mlp(hidden=(128,)), lr=0.3)
    last = result.history[-1]
    assert last["released_epoch"] < last["epoch"] < 30  # it stopped, after the best epoch
    state = ccl.training.load_checkpoint(tmp_path / "p" / "checkpoint.pt")
    released = mlp(hidden=(128,))
    released.load_state_dict(state["model"])
    assert same_weights(released, result.model)
    hx, hy = data.subset(non)
    assert last["heldout_acc"] == pytest.approx(float((result.model(hx).argmax(1) == hy).float().mean()))


def test_an_interrupted_patience_run_resumes_to_the_same_model(tmp_path, train):
    d = defenses.create("early_stop", patience=2)
    full = train(d, epochs=14, checkpoint_dir=tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        train(d, epochs=14, checkpoint_dir=tmp_path / "cut", loss=Interrupting(d.loss, 3))
    resumed = train(d, epochs=14, checkpoint_dir=tmp_path / "cut")
    assert same_weights(full.model, resumed.model) and resumed.history == [
        {**r, "seconds": s["seconds"]} for r, s in zip(full.history, resumed.history, strict=True)
    ]
    again = train(d, epochs=14, checkpoint_dir=tmp_path / "cut")  # a finished run: nothing more is trained
    assert same_weights(full.model, again.model) and len(again.history) == len(full.history)


# ------------------------------------------------------------------ parameters and the reserve
@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("early_stop:epochs=3,patience=2", "epochs"),
        ("early_stop:patience=0", "`patience`"),
        ("advreg:alpha=-1", "`alpha`"),
        ("advreg:k=0", "`k`"),
        ("advreg:lr=0", "`lr`"),
        ("advreg:loss=relaxloss", "`loss`"),
        ("distillation:temperature=0", "`temperature`"),
        ("distillation:alpha=1", "alpha"),
    ],
)
def test_bad_parameters_of_the_reserve_defenses_are_named(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_defense(spec)


def test_fit_refuses_a_reserve_defense_without_a_reserve(quiet):
    data, mem, _, _ = digits_parts()
    d = defenses.create("advreg")
    with pytest.raises(InvalidArgumentError, match="`reserve`"):
        fit(mlp(), d.loss, data.subset(mem), recipe=Recipe(epochs=1), runtime=quiet, procedure=d.procedure)


def test_the_reserve_is_disjoint_from_the_audit_and_drawn_only_when_a_defense_needs_it():
    assert ExperimentConfig(defenses=["ce", "ccel"]).reserve_fraction == 0.0
    assert ExperimentConfig(defenses=["ce", "advreg"]).reserve_fraction == 0.2
    assert ExperimentConfig(defenses=["distillation"], reserve_fraction=0.3).reserve_fraction == 0.3
    with pytest.raises(ConfigError, match="reserve_fraction"):
        ExperimentConfig(defenses=["early_stop:patience=3"], reserve_fraction=0)
    with pytest.raises(ConfigError, match="reserve_fraction"):
        ExperimentConfig(defenses=["advreg"], population_fraction=0.8)
    plain = ccl.data.membership_split(1000, num_references=4, seed=3, population_fraction=0.1)
    split = ccl.data.membership_split(1000, num_references=4, seed=3, population_fraction=0.1, reserve_fraction=0.2)
    assert np.array_equal(split.population, plain.population)  # the reserve follows the population
    assert split.reserve.size == 200 and split.pool.size == 700
    assert not np.intersect1d(split.reserve, np.r_[split.pool, split.population]).size
    assert np.array_equal(np.sort(np.r_[split.pool, split.population, split.reserve]), np.arange(1000))


def test_a_resume_cannot_add_a_reserve_defense_to_a_run_split_without_one(tmp_path, capsys):
    from ccl.cli import main

    common = ["--dataset", "digits", "--num-references", "0", "--epochs", "1", "--attacks", "loss", "--quiet"]
    assert main(["compare", *common, "--defenses", "ce", "--out", str(tmp_path / "r")]) == 0
    capsys.readouterr()
    assert main(["compare", "--resume", "--defenses", "ce", "advreg", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "advreg" in err and "reserve_fraction is 0" in err and "--reserve-fraction" in err


@pytest.mark.slow
def test_the_reserve_defenses_lower_leakage_on_digits_and_never_audit_the_reserve(tmp_path, quiet):
    """On digits with 135 members, where CE overfits: each lowers the pooled LiRA AUC. The reserve's records
    are never queried, and every model of a defense (target and references) used the same reserve."""
    config = ExperimentConfig.from_dict(
        {
            "dataset": "digits",
            "model_options": {"hidden": [256, 128]},
            "population_fraction": 0.65,
            "num_references": 4,
            "bootstrap": 20,
            "attacks": ["loss", "lira", "rmia"],
            "defenses": ["ce", "advreg", "distillation", "early_stop:patience=3"],
            "train": {"epochs": 40, "batch_size": 32, "lr": 0.05, "schedule": "constant"},
        }
    )
    agg = run_audit(config, tmp_path / "run", runtime=quiet)
    rows = {r.defense: r for r in agg.rows}
    ce = rows["ce"].metric("lira", "auc", "pooled")[0]
    for name in ("advreg", "distillation", "early_stop(patience=3)"):
        assert rows[name].metric("lira", "auc", "pooled")[0] < ce - 0.02, name
        assert rows[name].values["test_acc"] > 0.7, name
    split = ccl.data.MembershipSplit.load(tmp_path / "run" / "splits" / "seed-0.npz")
    assert split.reserve.size == round(0.2 * 1797)
    import json

    jobs = [json.loads(p.read_text()) for p in (tmp_path / "run" / "models").glob("*/job.json")]
    assert sum(j["defense"]["name"] == "advreg" for j in jobs) == 5
    with np.load(next((tmp_path / "run" / "models").glob("*/outputs.npz"))) as f:
        assert not np.intersect1d(f["query_index"], split.reserve).size
