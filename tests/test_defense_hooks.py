"""The defense protocol: a defense is one module of settings and hooks (`ccl._hooks`) that the one training loop
and the audit call; adding one touches no other file. A toy defense, written here as its own module would be,
is registered from the test and must reach every hook through `fit` and through a whole audit."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import ccl
import ccl.dp
from ccl import defenses
from ccl.audit import run_audit
from ccl.config import ExperimentConfig
from ccl.defenses import Defense, DefenseHooks, Procedure
from ccl.training import Recipe, Runtime, fit, load_checkpoint

QUIET = Runtime(progress=False)
CALLS: list[str] = []  # the hooks the toy defense saw, in order


# ------------------------------------------------------------------ the toy defense: one module's worth of code
@dataclass(frozen=True)
class Toy(Procedure):
    """Shifts the released outputs by `shift` and logs each epoch; every hook records its call."""

    shift: float = 0.0

    def hooks(self) -> DefenseHooks:
        return _ToyHooks()

    def query_transform(self, forward_all, logits, x_all, *, seed):
        CALLS.append("query_transform")
        return [lg + self.shift for lg in logits]


class _ToyHooks(DefenseHooks):
    def __init__(self) -> None:
        self.epochs_seen = 0

    def prepare(self, setup):
        CALLS.append("prepare")
        return setup

    def wrap(self, model, setup):
        CALLS.append("wrap")
        return model, None

    def wrap_loss(self, loss, *, forward, model, setup):
        CALLS.append("wrap_loss")
        return loss

    def optimizer(self, optimizer):
        CALLS.append("optimizer")
        return optimizer

    def start_epoch(self, optimizer, *, seed, epoch, device):
        CALLS.append("start_epoch")

    def batches(self, generator, device):
        CALLS.append("batches")
        return None  # the loop's own seeded shuffle

    def end_epoch(self, epoch, model, record, setup):
        CALLS.append("end_epoch")
        self.epochs_seen += 1
        record["toy_epochs_seen"] = self.epochs_seen
        return False

    def state_dict(self):
        CALLS.append("state_dict")
        return {"toy": self.epochs_seen}

    def load_state_dict(self, state):
        CALLS.append("load_state_dict")
        self.epochs_seen = state["toy"]

    def release(self, model):
        CALLS.append("release")


def create_toy(*, shift: float = 0.0, loss: str = "ce") -> Defense:
    return Defense(ccl.losses.create(loss), Toy(float(shift)))


# ------------------------------------------------------------------ the tests
@pytest.fixture
def toy():
    CALLS.clear()
    defenses.register("toy", create_toy, doc="a test's defense")
    yield
    defenses._REGISTRY._factories.pop("toy")


def digits(n=200):
    data = ccl.data.load("digits")
    return data.subset(np.arange(n)), data.subset(np.arange(n, 2 * n))


def mlp():
    return ccl.models.create("mlp", num_classes=10, input_shape=(64,), hidden=(16,), seed=0)


def test_a_registered_defense_is_listed_described_and_created(toy):
    assert "toy" in defenses.available()
    assert defenses.describe("toy") == ("a test's defense", {"shift": 0.0, "loss": "ce"})
    d = defenses.create("toy", shift=1)
    assert d.procedure == Toy(1.0) and d.procedure.identity == "Toy(shift=1.0)"
    assert not d.procedure.stackable  # it has hooks: stacked training would skip them
    assert Procedure().stackable and not Procedure().needs_reserve


@pytest.mark.usefixtures("checkpoint_every_epoch")
def test_fit_calls_every_training_hook_in_order_and_resumes_their_state(toy, tmp_path):
    train, heldout = digits()
    d = defenses.create("toy")
    kw = dict(heldout=heldout, runtime=QUIET, procedure=d.procedure, checkpoint_dir=tmp_path)
    result = fit(mlp(), d.loss, train, recipe=Recipe(epochs=2, batch_size=64), **kw)
    epoch = ["start_epoch", "batches", "end_epoch", "state_dict"]
    assert CALLS == ["prepare", "wrap", "wrap_loss", "optimizer", *epoch, *epoch, "release"]
    assert [r["toy_epochs_seen"] for r in result.history] == [1, 2]
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["toy"] == 2 and state["recipe"]["procedure"] == "Toy(shift=0.0)"

    CALLS.clear()  # a longer recipe's checkpoint would not match: resume the same one, with one more epoch left
    fit(mlp(), d.loss, train, recipe=Recipe(epochs=2, batch_size=64), **kw)
    assert CALLS[:4] == ["prepare", "wrap", "wrap_loss", "load_state_dict"]
    assert "end_epoch" not in CALLS  # nothing left to train


def test_an_audit_trains_and_releases_through_the_hooks_of_a_registered_defense(toy, tmp_path):
    raw = {
        "dataset": "synthetic",
        "dataset_options": {"num_samples": 160, "num_features": 8},
        "model_options": {"hidden": [16]},
        "num_references": 2,
        "bootstrap": 5,
        "train": {"epochs": 1, "batch_size": 16, "lr": 0.05},
    }
    run_audit(ExperimentConfig.from_dict({**raw, "defenses": ["toy"]}), tmp_path / "plain", runtime=QUIET)
    assert CALLS.count("prepare") == 3 and CALLS.count("query_transform") == 3  # the target, 2 references
    run_audit(ExperimentConfig.from_dict({**raw, "defenses": ["toy:shift=5"]}), tmp_path / "shift", runtime=QUIET)
    outputs = {}
    for name in ("plain", "shift"):
        for job in sorted((tmp_path / name / "models").glob("*/job.json")):
            info = json.loads(job.read_text())
            assert info["trainer"] == "single" and info["defense"]["name"] == "toy"
            if info["role"] == "target":
                with np.load(job.parent / "outputs.npz") as f:
                    outputs[name] = f["logits"]
    np.testing.assert_allclose(outputs["shift"], outputs["plain"] + 5, rtol=0, atol=1e-5)  # the released outputs


def test_the_built_in_defenses_keep_the_checkpoint_identity_they_were_written_with():
    """A checkpoint records its procedure; these are the strings of checkpoints written before each defense had
    its own module (they must still resume)."""
    none = dict.fromkeys(["dp", "stop_after", "modify_outputs", "patience", "adversary", "distill"], "None")
    expected = {
        ("ce", ()): none,
        ("dpsgd", (("epsilon", 8),)): none
        | {"dp": "DPSGD(epsilon=8.0, delta=1e-05, max_grad_norm=1.0, noise_multiplier=None, accountant='rdp')"},
        ("early_stop", (("epochs", 2),)): none | {"stop_after": "2"},
        ("early_stop", (("patience", 3),)): none | {"patience": "3"},
        ("advreg", ()): none | {"adversary": "AdvReg(alpha=3.0, steps=1, lr=0.001)"},
        ("distillation", ()): none | {"distill": "Distillation(temperature=1.0)"},
        ("hamp", ()): none | {"modify_outputs": "'hamp'"},
    }
    for (name, params), fields in expected.items():
        text = "Procedure(" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"
        assert defenses.create(name, **dict(params)).procedure.identity == text, name


def test_every_built_in_defense_is_one_module_and_the_old_names_still_import():
    params = {"dpsgd": {"epsilon": 8}, "early_stop": {"epochs": 1}, "advreg": {}, "distillation": {}, "hamp": {}}
    for name, kw in params.items():
        module = importlib.import_module(f"ccl.defenses.{name}")
        assert module.NAME == name and module.DOC == defenses.describe(name)[0]
        assert type(defenses.create(name, **kw).procedure).__module__ == module.__name__
    for name in defenses.__all__:
        assert getattr(defenses, name) is not None
    for name in ccl.dp.__all__:
        assert getattr(ccl.dp, name) is getattr(defenses.dpsgd, name)


def test_hooks_need_one_model():
    from ccl.stacked import StackedModels
    from ccl.training import train_models

    with pytest.raises(ccl.errors.InvalidArgumentError, match="one model"):
        train_models(
            StackedModels([mlp(), mlp()]),
            torch.nn.CrossEntropyLoss(),
            torch.zeros(4, 64),
            torch.zeros(4, dtype=torch.long),
            torch.zeros(2, 2, dtype=torch.long),
            recipe=Recipe(epochs=1),
            seeds=[0, 1],
            device=torch.device("cpu"),
            hooks=DefenseHooks(),
        )
