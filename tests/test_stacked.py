"""Stacked (torch.func) training of reference models against the plain path, fit(), one model at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ccl
from ccl.audit import run_audit, stacking
from ccl.config import ExperimentConfig
from ccl.stacked import fit_stacked
from ccl.training import Recipe, fit


@pytest.mark.parametrize(
    ("model", "params", "loss", "loss_params", "optimizer", "augment"),
    [
        ("mlp", {"hidden": (32,)}, "ce", {}, "sgd", False),
        ("mlp", {"hidden": (32,)}, "relaxloss", {"alpha": 1.0}, "adam", False),  # epoch-dependent loss
        ("cnn", {"width": 4}, "ccel", {"alpha": 0.5}, "sgd", True),  # BatchNorm buffers and augmentation
    ],
)
def test_stacked_models_equal_models_trained_one_by_one(model, params, loss, loss_params, optimizer, augment, quiet):
    data = ccl.data.load("digits", as_image=model == "cnn")
    split = ccl.data.membership_split(400, num_references=3, seed=0)  # the first 400 digits
    members = [split.reference_members(k) for k in range(3)]
    cfgs = [
        Recipe(
            epochs=3,
            batch_size=64,
            lr=0.01 if optimizer == "adam" else 0.05,
            optimizer=optimizer,
            augment=augment,
            seed=100 + k,
        )
        for k in range(3)
    ]

    def build(k):
        return ccl.models.create(model, num_classes=10, input_shape=data.input_shape, seed=k, **params)

    stack = fit_stacked(
        [build(k) for k in range(3)],
        ccl.losses.create(loss, **loss_params),
        data.x,
        data.y,
        members,
        recipe=cfgs[0],
        seeds=[c.seed for c in cfgs],
    )
    for k in range(3):
        single = fit(
            build(k), ccl.losses.create(loss, **loss_params), data.subset(members[k]), recipe=cfgs[k], runtime=quiet
        )
        stacked_state = stack.state_dict(k)
        for name, value in single.model.state_dict().items():
            torch.testing.assert_close(stacked_state[name], value, rtol=1e-4, atol=1e-5, msg=name)


def test_stacked_training_refuses_unequal_sizes_and_missing_seeds():
    data = ccl.data.load("synthetic", num_samples=100, num_features=5, num_classes=3)
    mods = [ccl.models.create("mlp", num_classes=3, input_shape=(5,), hidden=(8,), seed=k) for k in range(2)]
    cfg = Recipe(epochs=1)
    with pytest.raises(ValueError, match="`members`.*equal size"):
        fit_stacked(
            mods, ccl.losses.create("ce"), data.x, data.y, [np.arange(10), np.arange(12)], recipe=cfg, seeds=[0, 1]
        )
    with pytest.raises(ValueError, match="`seeds`"):
        fit_stacked(
            mods, ccl.losses.create("ce"), data.x, data.y, [np.arange(10), np.arange(10)], recipe=cfg, seeds=[0]
        )


def test_the_stacking_choice_is_a_deterministic_part_of_the_recipe():
    base = {"dataset": "synthetic", "model_options": {"hidden": [16]}, "train": {"batch_size": 32}}
    assert stacking(ExperimentConfig.from_dict({**base, "stacked": "on"}))
    assert not stacking(ExperimentConfig.from_dict({**base, "stacked": "off"}))
    assert stacking(ExperimentConfig.from_dict(base))  # auto: mlp stacks
    assert not stacking(ExperimentConfig.from_dict({**base, "model": "cnn", "model_options": {}}))
    # same answer every time: no timing is involved
    assert {stacking(ExperimentConfig.from_dict(base)) for _ in range(5)} == {True}


def test_audit_scores_agree_between_stacked_and_plain_paths(tmp_path, quiet):
    raw = {
        "dataset": "synthetic",
        "dataset_options": {"num_samples": 160, "num_features": 8},
        "model_options": {"hidden": [16]},
        "num_references": 4,
        "bootstrap": 0,
        "train": {"epochs": 3, "batch_size": 16, "lr": 0.05},
    }
    runs = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        run_audit(ExperimentConfig.from_dict({**raw, "stacked": mode}), out, runtime=quiet)
        with np.load(out / "results" / "ce" / "seed-0" / "scores.npz") as f:
            runs[mode] = {k: f[k] for k in f.files}
    for key in ("score_lira", "score_rmia", "score_loss"):
        np.testing.assert_allclose(runs["on"][key], runs["off"][key], rtol=1e-3, atol=1e-3)


def test_a_diverging_stacked_model_is_named():
    from ccl.training import TrainingError

    data = ccl.data.load("synthetic", num_samples=100, num_features=5, num_classes=3)
    mods = [ccl.models.create("mlp", num_classes=3, input_shape=(5,), hidden=(8,), seed=k) for k in range(2)]
    cfg = Recipe(epochs=5, batch_size=8, lr=1e30)
    with pytest.raises(TrainingError, match="stacked model [01] .*epoch [0-4]"):
        members = [np.arange(50), np.arange(50, 100)]
        fit_stacked(mods, ccl.losses.create("ccel"), data.x, data.y, members, recipe=cfg, seeds=[0, 1])
