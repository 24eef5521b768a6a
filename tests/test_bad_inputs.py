"""A catalogue of bad inputs, one row per input: each must fail with a clear error.

For the Python API, a row asserts the exact error class (every deliberate error of ccl derives from
`ccl.errors.CclError`) and that the message names the offending argument. For the command line (run in-process
with `ccl.cli.main`), a row asserts exit code 2, one line on stderr without a traceback that names the flag or
file, and that nothing is left behind: no run directory for a new run, an unchanged config.yaml for a resume,
no report.html for a report. Malformed flags are argparse's business (exit 2 with its usage message).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from ccl import attacks, cli, data, losses, metrics, models, signals, stacked, theory, training
from ccl.attacks import AttackInputs, NotEnoughReferencesError
from ccl.audit import ModelCache
from ccl.errors import (
    CclError,
    DataError,
    InvalidArgumentError,
    InvalidArgumentTypeError,
    RunDirectoryError,
    TrainingError,
)
from ccl.training import Recipe, Runtime

CUDA = torch.cuda.is_available()
NEEDS_NO_CUDA = pytest.mark.skipif(CUDA, reason="CUDA is available")

# ==========================================================================================================
# Python API
# ==========================================================================================================
IAE, IATE = InvalidArgumentError, InvalidArgumentTypeError


def logits(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape)


def labels(n: int, c: int = 3) -> np.ndarray:
    return np.arange(n) % c


def inputs(**overrides) -> AttackInputs:
    """AttackInputs of 6 records, 3 classes, 4 reference models and a population of 5, with `overrides`."""
    kw = dict(
        target_logits=logits(6, 3),
        labels=labels(6),
        reference_logits=logits(4, 6, 3, seed=1),
        reference_in=np.arange(24).reshape(4, 6) % 2 == 0,
        population_target_logits=logits(5, 3, seed=2),
        population_labels=labels(5),
        population_reference_logits=logits(4, 5, 3, seed=3),
    )
    kw.update(overrides)
    return AttackInputs(**kw)


def mlp(features: int = 4, classes: int = 3) -> torch.nn.Module:
    return models.create("mlp", num_classes=classes, input_shape=(features,), hidden=[8], seed=0)


def xy(n: int = 8, features: int = 4, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, features), torch.arange(n) % classes


def fit(train, **kw):
    kw.setdefault("recipe", Recipe(epochs=1, batch_size=4))
    kw.setdefault("runtime", Runtime(progress=False))
    return training.fit(kw.pop("model", mlp()), losses.create("ce"), train, **kw)


def write_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def truncated(path: Path) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return path


def truncated_checkpoint(tmp: Path) -> Path:
    """A `fit` checkpoint cut in half, where `fit(checkpoint_dir=tmp)` loads it."""
    fit(xy(), checkpoint_dir=tmp)
    return truncated(tmp / training.CHECKPOINT)


def fit_stacked(tmp: Path, *, checkpoint: Path | None = None, members=None, seeds=(0, 1), recipe=None):
    x, y = xy(8)
    return stacked.fit_stacked(
        [mlp(), mlp()],
        losses.create("ce"),
        x,
        y,
        members if members is not None else [np.arange(4), np.arange(4, 8)],
        recipe=recipe or Recipe(epochs=1, batch_size=4),
        seeds=list(seeds),
        runtime=Runtime(progress=False),
        checkpoint=checkpoint,
    )


def truncated_stacked_checkpoint(tmp: Path) -> Path:
    path = tmp / "stacked" / "group.pt"
    fit_stacked(tmp, checkpoint=path)
    return truncated(path)


def a_file(tmp: Path, name: str = "file") -> Path:
    path = tmp / name
    path.write_text("not a directory")
    return path


def corrupt_cached_outputs(tmp: Path):
    """A model cache whose job's outputs.npz holds random bytes."""
    from ccl.audit.plan import ModelJob
    from ccl.config import DefenseSpec

    cache = ModelCache(tmp / "cache")
    job = ModelJob("abc", "target", DefenseSpec("ce"), "mlp", {}, Recipe(), np.arange(4), "single", "g")
    (tmp / "cache" / "abc").mkdir(parents=True)
    (tmp / "cache" / "abc" / "outputs.npz").write_bytes(b"\x00garbage" * 10)
    return cache.outputs(job, np.arange(4))


@dataclass
class Api:
    """One bad call: `call(tmp_path)` must raise exactly `error` with a message matching `match`."""

    call: Callable[[Path], object]
    error: type[CclError]
    match: str


def api(id_: str, call, error, match, *marks):
    return pytest.param(Api(call, error, match), id=id_, marks=marks)


# Short spellings for the table's rows.
def model(name="mlp", shape=(4,), classes=3, **kw):
    return models.create(name, num_classes=classes, input_shape=shape, **kw)


def loss(name, z, y, **kw):
    return losses.create(name, **kw)(z, y)


def gauss(mu=0.0, sigma=1.0, mu_n=1.0, sigma_n=1.0, fpr=0.1):
    return theory.gaussian_advantage(mu, sigma, mu_n, sigma_n, fpr=fpr)


def load_npz(tmp: Path, name: str, **arrays):
    return data.load(str(write_npz(tmp / name, **arrays)))


Z, Y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.long)  # logits of 2 records over 3 classes, their targets
NAN = float("nan")
NO_POP = {"population_target_logits": None, "population_labels": None, "population_reference_logits": None}
S, M = [0.1, 0.2], [True, False]  # scores and membership of two records

API_CASES = [
    # ---- models -------------------------------------------------------------------------------------------
    api("model-input-shape-str", lambda t: model(shape="64"), IATE, "`input_shape`"),
    api("model-input-shape-zero", lambda t: model(shape=(0,)), IAE, "`input_shape`"),
    api("model-image-flat-shape", lambda t: model("cnn", shape=(64,)), IAE, "`input_shape`.*'cnn'"),
    api("model-one-class", lambda t: model(classes=1), IAE, "`num_classes`"),
    api("model-hidden-str", lambda t: model(hidden="abc"), IAE, "`hidden`"),
    api("model-hidden-negative", lambda t: model(hidden=[-5]), IAE, "`hidden`"),
    api("model-unknown-option", lambda t: model(foo=1), IAE, "'foo'"),
    api("model-typo", lambda t: model("mlpp"), IAE, "Unknown model 'mlpp'.*Did you mean 'mlp'"),
    api("model-activation", lambda t: model(activation="gelu"), IAE, "`activation`"),
    api("model-wrn-depth", lambda t: model("wrn", shape=(3, 8, 8), depth=27), IAE, "`depth`"),
    api("model-cnn-width-zero", lambda t: model("cnn", shape=(3, 8, 8), width=0), IAE, "`width`"),
    # ---- losses -------------------------------------------------------------------------------------------
    api("loss-unknown", lambda t: losses.create("nope"), IAE, r"Unknown loss 'nope'\. Valid losses: "),
    api("loss-param-typo", lambda t: losses.create("ccel", alpah=0.5), IAE, "'alpah'.*Did you mean 'alpha'"),
    api("loss-alpha-range", lambda t: losses.create("ccel", alpha=2.0), IAE, r"`alpha`.*\[0, 1\]"),
    api("loss-alpha-str", lambda t: losses.create("ccel", alpha="half"), IATE, "`alpha`"),
    api("loss-focal-gamma", lambda t: losses.create("focal", gamma=-1.0), IAE, "`gamma`"),
    api("loss-reduction", lambda t: losses.create("ce", reduction="avg"), IAE, "`reduction`"),
    api("loss-relax-epoch", lambda t: losses.create("relaxloss").set_epoch(-1), IAE, "`epoch`"),
    api("loss-empty-batch-mean", lambda t: loss("ce", Z[:0], Y[:0]), IAE, "`logits`.*non-empty"),
    api("loss-logits-1d", lambda t: loss("ce", Z[0], Y), IAE, "`logits`"),
    api("loss-logits-int", lambda t: loss("ce", Z.long(), Y), IATE, "`logits`"),
    api("loss-logits-numpy", lambda t: loss("ce", Z.numpy(), Y), IATE, "`logits`"),
    api("loss-logits-nan", lambda t: loss("ccel", Z + NAN, Y), IAE, "`logits`.*finite"),
    api("loss-target-float", lambda t: loss("ce", Z, Y.float()), IATE, "`target`"),
    api("loss-target-range", lambda t: loss("focal", Z, Y + 3), IAE, r"`target`.*\[0, 3\)"),
    api("loss-target-shape", lambda t: loss("ce", Z, Y[:1]), IAE, "`target`"),
    # ---- training: Recipe, Runtime, devices ---------------------------------------------------------------
    api("recipe-lr-negative", lambda t: Recipe(lr=-1), IAE, r"`lr`.*\(0, inf\)"),
    api("recipe-lr-nan", lambda t: Recipe(lr=NAN), IAE, "`lr`"),
    api("recipe-epochs-zero", lambda t: Recipe(epochs=0), IAE, "`epochs`"),
    api("recipe-epochs-float", lambda t: Recipe(epochs=2.5), IATE, "`epochs`"),
    api("recipe-epochs-bool", lambda t: Recipe(epochs=True), IATE, "`epochs`"),
    api("recipe-batch-size", lambda t: Recipe(batch_size=-1), IAE, "`batch_size`"),
    api("recipe-momentum", lambda t: Recipe(momentum=1.5), IAE, r"`momentum`.*\[0, 1\)"),
    api("recipe-optimizer", lambda t: Recipe(optimizer="rmsprop"), IAE, "`optimizer`"),
    api("recipe-schedule", lambda t: Recipe(schedule="linear"), IAE, "`schedule`"),
    api("recipe-milestones-str", lambda t: Recipe(milestones="ab"), IATE, "`milestones`"),
    api("recipe-milestones-range", lambda t: Recipe(milestones=[1.5]), IAE, "`milestones`"),
    api("recipe-lr-decay", lambda t: Recipe(lr_decay=0), IAE, "`lr_decay`"),
    api("recipe-precision", lambda t: Recipe(precision="fp64"), IAE, "`precision`"),
    api("recipe-augment-str", lambda t: Recipe(augment="yes"), IATE, "`augment`"),
    api("recipe-seed-float", lambda t: Recipe(seed=1.5), IATE, "`seed`"),
    api("recipe-seed-negative", lambda t: Recipe(seed=-1), IAE, "`seed`"),
    api("runtime-eval-every", lambda t: Runtime(eval_every=0), IAE, "`eval_every`"),
    api("runtime-threads", lambda t: Runtime(threads=0), IAE, "`threads`"),
    api("runtime-device-int", lambda t: Runtime(device=0), IATE, "`device`"),
    api("device-unknown", lambda t: training.resolve_device("tpu"), IAE, "`device`"),
    api("device-cuda-absent", lambda t: training.resolve_device("cuda"), IAE, "`device`.*CUDA", NEEDS_NO_CUDA),
    # ---- training: fit, predict_logits, stacked -----------------------------------------------------------
    api("fit-not-a-pair", lambda t: fit(torch.zeros(8, 4)), IATE, "`train`"),
    api("fit-empty", lambda t: fit(xy(n=0)), IAE, "`train`"),
    api("fit-xy-mismatch", lambda t: fit((torch.zeros(8, 4), Y)), IAE, "`train labels`"),
    api("fit-labels-range", lambda t: fit((torch.zeros(8, 4), torch.full((8,), 3))), IAE, r"`train labels`.*\[0, 3\)"),
    api("fit-labels-float", lambda t: fit((torch.zeros(8, 4), torch.zeros(8))), IATE, "`train labels`"),
    api("fit-inputs-str", lambda t: fit((np.array(["a"] * 8), torch.zeros(8, dtype=torch.long))), IATE, "`train`"),
    api("fit-heldout-shape", lambda t: fit(xy(), heldout=xy(features=5)), IAE, "`heldout`"),
    api("fit-heldout-labels", lambda t: fit(xy(), heldout=(torch.zeros(2, 4), Y + 7)), IAE, "`heldout labels`"),
    api("fit-wrong-width", lambda t: fit(xy(features=5)), IAE, r"model cannot take inputs of shape \(5,\)"),
    api("fit-augment-tabular", lambda t: fit(xy(), recipe=Recipe(epochs=1, augment=True)), IAE, "`augment`"),
    api("fit-recipe-dict", lambda t: fit(xy(), recipe={"epochs": 1}), IATE, "`recipe`"),
    api("fit-runtime-dict", lambda t: fit(xy(), runtime={"device": "cpu"}), IATE, "`runtime`"),
    api(
        "fit-truncated-checkpoint",
        lambda t: fit(xy(), checkpoint_dir=truncated_checkpoint(t).parent),
        RunDirectoryError,
        r"checkpoint\.pt.*truncated",
    ),
    api(
        "predict-flip-tabular",
        lambda t: training.predict_logits(mlp(), torch.zeros(2, 4), flip_queries=True),
        IAE,
        "`flip_queries`",
    ),
    api(
        "stacked-truncated-checkpoint",
        lambda t: fit_stacked(t, checkpoint=truncated_stacked_checkpoint(t)),
        RunDirectoryError,
        r"group\.pt.*truncated",
    ),
    api("stacked-unequal-members", lambda t: fit_stacked(t, members=[np.arange(4), np.arange(3)]), IAE, "`members`"),
    api("stacked-seed-count", lambda t: fit_stacked(t, seeds=(0,)), IAE, "`seeds`"),
    api("stacked-augment-tabular", lambda t: fit_stacked(t, recipe=Recipe(epochs=1, augment=True)), IAE, "`augment`"),
    # ---- data ---------------------------------------------------------------------------------------------
    api("split-too-few-records", lambda t: data.membership_split(3), IAE, "`num_records`"),
    api("split-negative-references", lambda t: data.membership_split(100, num_references=-1), IAE, "`num_references`"),
    api(
        "split-population-fraction",
        lambda t: data.membership_split(100, population_fraction=0.95),
        IAE,
        r"`population_fraction`.*\[0, 0\.9\]",
    ),
    api("split-negative-seed", lambda t: data.membership_split(100, seed=-1), IAE, "`seed`"),
    api("split-seed-str", lambda t: data.membership_split(100, seed="a"), IATE, "`seed`"),
    api("shadow-split-too-few", lambda t: data.shadow_split(2), IAE, "`num_records`"),
    api("shadow-split-negative-seed", lambda t: data.shadow_split(100, seed=-3), IAE, "`seed`"),
    api("split-file-corrupt", lambda t: data.MembershipSplit.load(a_file(t, "s.npz")), RunDirectoryError, r"s\.npz"),
    api("arrays-x-1d", lambda t: data.from_arrays(np.zeros(4), labels(4)), DataError, "`X`"),
    api("arrays-x-strings", lambda t: data.from_arrays(np.array([["a"], ["b"]]), labels(2)), DataError, "`X`"),
    api("arrays-x-ragged", lambda t: data.from_arrays([[1.0], [1.0, 2.0]], labels(2)), DataError, "`X`"),
    api("arrays-x-nan", lambda t: data.from_arrays(np.full((2, 3), NAN), labels(2)), DataError, "`X`"),
    api("arrays-y-mismatch", lambda t: data.from_arrays(np.zeros((4, 2)), labels(3)), DataError, "`y`"),
    api("arrays-y-negative", lambda t: data.from_arrays(np.zeros((2, 2)), np.array([-1, 0])), DataError, "`y`"),
    api("arrays-y-fractional", lambda t: data.from_arrays(np.zeros((2, 2)), np.array([0.5, 1])), DataError, "`y`"),
    api("arrays-y-strings", lambda t: data.from_arrays(np.zeros((2, 2)), np.array(["a", "b"])), DataError, "`y`"),
    api("npz-missing", lambda t: data.load(str(t / "absent.npz")), DataError, r"absent\.npz"),
    api("npz-garbage", lambda t: data.load(str(a_file(t, "garbage.npz"))), DataError, r"garbage\.npz"),
    api("npz-no-y", lambda t: load_npz(t, "noy.npz", X=np.zeros((4, 2))), DataError, r"noy\.npz.*'y'"),
    api(
        "npz-x-strings",
        lambda t: load_npz(t, "str.npz", X=np.array(["a", "b"]), y=labels(2)),
        DataError,
        r"str\.npz.*`X`",
    ),
    api("npz-x-object", lambda t: load_npz(t, "obj.npz", X=np.array([{}, {}]), y=labels(2)), DataError, r"obj\.npz"),
    api(
        "npz-unknown-option",
        lambda t: data.load(str(write_npz(t / "ok.npz", X=np.zeros((4, 2)), y=labels(4))), num_samples=9),
        IAE,
        r"'num_samples'.*ok\.npz",
    ),
    api("dataset-unknown", lambda t: data.load("cifar11"), IAE, "Unknown dataset 'cifar11'.*Did you mean 'cifar10'"),
    api("dataset-option-str", lambda t: data.load("synthetic", num_samples="abc"), IATE, "`num_samples`"),
    api("dataset-option-unknown", lambda t: data.load("synthetic", bogus=1), IAE, "'bogus'"),
    api("dataset-noise-str", lambda t: data.load("synthetic", noise="loud"), IATE, "`noise`"),
    api("dataset-seed-negative", lambda t: data.load("synthetic", seed=-1), IAE, "`seed`"),
    # ---- metrics ------------------------------------------------------------------------------------------
    api("auc-length-mismatch", lambda t: metrics.roc_auc([0.1, 0.2, 0.3], M), IAE, "`is_member`"),
    api("auc-non-binary", lambda t: metrics.roc_auc(S, [0, 2]), IAE, "`is_member`"),
    api("auc-string-members", lambda t: metrics.roc_auc(S, ["in", "out"]), IAE, "`is_member`"),
    api("auc-nan-scores", lambda t: metrics.roc_auc([0.1, NAN], M), IAE, "`scores`.*NaN"),
    api("auc-2d-scores", lambda t: metrics.roc_auc([S], [M]), IAE, "`scores`"),
    api("auc-str-scores", lambda t: metrics.roc_auc(["a", "b"], M), IATE, "`scores`"),
    api("tpr-fpr-zero", lambda t: metrics.tpr_at_fpr(S, M, fpr=0), IAE, "`fpr`"),
    api(
        "bootstrap-resamples",
        lambda t: metrics.bootstrap_ci(metrics.roc_auc, S, M, n_resamples=1),
        IAE,
        "`n_resamples`",
    ),
    api(
        "bootstrap-confidence",
        lambda t: metrics.bootstrap_ci(metrics.roc_auc, S, M, confidence=1.0),
        IAE,
        "`confidence`",
    ),
    api("evaluate-fprs", lambda t: metrics.evaluate(S, M, fprs=[2.0]), IAE, "`fprs`"),
    api("evaluate-fprs-str", lambda t: metrics.evaluate(S, M, fprs="0.01"), IATE, "`fprs`"),
    api("evaluate-resamples", lambda t: metrics.evaluate(S, M, n_resamples=-1), IAE, "`n_resamples`.*0"),
    # ---- signals ------------------------------------------------------------------------------------------
    api("signal-logits-1d", lambda t: signals.loss(np.zeros(3), labels(3)), IAE, "`logits`"),
    api("signal-logits-int", lambda t: signals.loss(np.zeros((2, 3), int), labels(2)), IATE, "`logits`"),
    api("signal-logits-str", lambda t: signals.loss(np.array([["a", "b"]]), labels(1)), IATE, "`logits`"),
    api("signal-logits-nan", lambda t: signals.confidence(np.full((2, 3), NAN), labels(2)), IAE, "`logits`.*finite"),
    api("signal-labels-float", lambda t: signals.entropy(np.zeros((2, 3)), np.zeros(2)), IATE, "`labels`"),
    api("signal-labels-shape", lambda t: signals.scaled_logit(np.zeros((2, 3)), labels(3)), IAE, "`labels`"),
    api(
        "signal-labels-range",
        lambda t: signals.modified_entropy(np.zeros((2, 3)), np.array([0, 5])),
        IAE,
        r"`labels`.*\[0, 3\)",
    ),
    # ---- theory -------------------------------------------------------------------------------------------
    api("gauss-negative-sigma", lambda t: gauss(sigma=-1.0), IAE, "`sigma_member`"),
    api("gauss-fpr-zero", lambda t: gauss(fpr=0.0), IAE, "`fpr`"),
    api("gauss-mu-nan", lambda t: gauss(mu=NAN), IAE, "`mu_member`"),
    api("gauss-mu-str", lambda t: gauss(mu="low"), IATE, "`mu_member`"),
    api("gauss-shapes", lambda t: gauss(mu=np.zeros(2), sigma=np.ones(3)), IAE, "`sigma_member`"),
    api("gauss-fpr-shape", lambda t: gauss(mu=np.zeros(2), fpr=[0.1, 0.2, 0.3]), IAE, "`fpr`"),
    api(
        "gauss-best-zero-sigma", lambda t: theory.gaussian_best_advantage(0.0, 1.0, 1.0, 0.0), IAE, "`sigma_nonmember`"
    ),
    # ---- attacks: AttackInputs (K=4 reference models, N=6 records, Z=5 population records, C=3) -----------
    api(
        "inputs-population-classes",
        lambda t: inputs(population_target_logits=logits(5, 4), population_reference_logits=logits(4, 5, 4)),
        IAE,
        "`population_target_logits`.*3 classes",
    ),
    api(
        "inputs-population-ref-classes",
        lambda t: inputs(population_reference_logits=logits(4, 5, 4)),
        IAE,
        "`population_reference_logits`.*3 classes",
    ),
    api(
        "inputs-reference-queries",
        lambda t: inputs(target_logits=logits(6, 2, 3), reference_logits=logits(4, 6, 3, 3), **NO_POP),
        IAE,
        "`reference_logits`.*2 augmented queries",
    ),
    api(
        "inputs-population-queries",
        lambda t: inputs(
            target_logits=logits(6, 2, 3),
            reference_logits=logits(4, 6, 2, 3),
            population_target_logits=logits(5, 2, 3),
            population_reference_logits=logits(4, 5, 3, 3),
        ),
        IAE,
        "`population_reference_logits`.*2 augmented queries",
    ),
    api(
        "inputs-population-target-queries",
        lambda t: inputs(population_target_logits=logits(5, 2, 3), population_reference_logits=None),
        IAE,
        "`population_target_logits`.*1 augmented query",
    ),
    api(
        "inputs-reference-classes",
        lambda t: inputs(reference_logits=logits(4, 6, 4), **NO_POP),
        IAE,
        "`reference_logits`.*3 classes",
    ),
    api(
        "inputs-reference-records",
        lambda t: inputs(reference_logits=logits(4, 5, 3)),
        IAE,
        r"`reference_logits`.*\(4, 6, '?C'?\)",
    ),
    api("inputs-target-1d", lambda t: inputs(target_logits=np.zeros(6)), IAE, "`target_logits`"),
    api("inputs-target-int", lambda t: inputs(target_logits=np.zeros((6, 3), int)), IATE, "`target_logits`"),
    api("inputs-target-nan", lambda t: inputs(target_logits=np.full((6, 3), NAN)), IAE, "`target_logits`.*finite"),
    api("inputs-labels-float", lambda t: inputs(labels=np.zeros(6)), IATE, "`labels`"),
    api("inputs-labels-range", lambda t: inputs(labels=np.full(6, 3)), IAE, r"`labels`.*\[0, 3\)"),
    api("inputs-reference-in-missing", lambda t: inputs(reference_in=None, **NO_POP), IAE, "`reference_in`"),
    api(
        "inputs-reference-logits-missing", lambda t: inputs(reference_logits=None, **NO_POP), IAE, "`reference_logits`"
    ),
    api("inputs-reference-in-shape", lambda t: inputs(reference_in=np.ones((4, 5), bool)), IAE, "`reference_in`"),
    api("inputs-reference-in-values", lambda t: inputs(reference_in=np.full((4, 6), 2)), IAE, "`reference_in`"),
    api("inputs-population-labels-missing", lambda t: inputs(population_labels=None), IAE, "`population_labels`"),
    api(
        "inputs-population-labels-alone",
        lambda t: inputs(population_target_logits=None, population_reference_logits=None),
        IAE,
        "`population_target_logits`.*`population_labels`",
    ),
    api(
        "inputs-population-without-references",
        lambda t: inputs(reference_logits=None, reference_in=None),
        IAE,
        "`reference_logits`",
    ),
    # ---- attacks ------------------------------------------------------------------------------------------
    api("attack-unknown", lambda t: attacks.create("lirra"), IAE, "Unknown attack 'lirra'.*Did you mean 'lira'"),
    api("attack-lira-variance", lambda t: attacks.create("lira", variance="pooled"), IAE, "`variance`"),
    api("attack-rmia-gamma", lambda t: attacks.create("rmia", gamma=0), IAE, "`gamma`"),
    api("attack-shadow-hidden", lambda t: attacks.create("shadow_classifier", hidden=0), IAE, "`hidden`"),
    api("attack-unknown-param", lambda t: attacks.create("lira", bogus=1), IAE, "'bogus'"),
    api(
        "attack-lira-too-few-references",
        lambda t: attacks.create("lira").score(
            inputs(reference_logits=logits(2, 6, 3), reference_in=np.eye(2, 6, dtype=bool), **NO_POP)
        ),
        NotEnoughReferencesError,
        "'lira'.*at least 4",
    ),
    api(
        "attack-rmia-without-population",
        lambda t: attacks.create("rmia").score(inputs(**NO_POP)),
        IAE,
        "`population_target_logits`",
    ),
    api(
        "attack-shadow-all-in",
        lambda t: attacks.create("shadow_classifier").score(inputs(reference_in=np.ones((4, 6)))),
        IAE,
        "`reference_in`.*only IN",
    ),
    api(
        "attack-score-all-unknown", lambda t: attacks.score_all(inputs(), names=["nope"]), IAE, "Unknown attack 'nope'"
    ),
    api(
        "attack-qmia-tiny-population",
        lambda t: attacks.create("qmia").score(
            inputs(
                features=logits(6, 2),
                population_features=logits(2, 2),
                population_target_logits=logits(2, 3),
                population_labels=labels(2),
                population_reference_logits=logits(4, 2, 3),
            )
        ),
        IAE,
        "`calibration_fraction`.*2 population records",
    ),
    # ---- audit internals ----------------------------------------------------------------------------------
    api("cache-dir-is-file", lambda t: ModelCache(a_file(t)), RunDirectoryError, "--cache-dir.*is a file"),
    api("cache-dir-below-file", lambda t: ModelCache(a_file(t) / "sub"), RunDirectoryError, "--cache-dir.*is a file"),
    api("cache-outputs-corrupt", corrupt_cached_outputs, RunDirectoryError, r"outputs\.npz.*corrupt"),
]


@pytest.mark.parametrize("case", API_CASES)
def test_api_bad_input(case: Api, tmp_path):
    with pytest.raises(case.error, match=case.match) as info:
        case.call(tmp_path)
    assert type(info.value) is case.error, f"{type(info.value).__name__}: {info.value}"
    assert "\n" not in str(info.value)


def test_messages_have_no_typos():
    with pytest.raises(InvalidArgumentError) as info:
        losses.create("nope")
    assert "Valid losses:" in str(info.value) and "losss" not in str(info.value)
    with pytest.raises(InvalidArgumentError) as info:
        Recipe(lr=-1)
    msg = str(info.value)
    assert "(0, inf)" in msg
    assert msg.count("(") == msg.count(")") and msg.count("[") == msg.count("]")


# ==========================================================================================================
# Command line
# ==========================================================================================================
SYNTHETIC = ["--dataset", "synthetic", "--data-option", "num_samples=160", "--data-option", "num_features=8"]
RECIPE = ["--model-option", "hidden=[16]", "--epochs", "2", "--batch-size", "16", "--quiet"]
TINY = [*SYNTHETIC, *RECIPE]
AUDIT = [*TINY, "--bootstrap", "5", "--num-references", "2"]


def audit(*extra: str) -> list[str]:
    return ["audit", *AUDIT, *extra]


def compare(*extra: str) -> list[str]:
    return ["compare", *AUDIT, *extra]


def train(*extra: str) -> list[str]:
    return ["train", *TINY, *extra]


def tune(target: str, *extra: str) -> list[str]:
    """`ccl tune` of ccel's alpha toward `target`."""
    return ["tune", *AUDIT, "--defense", "ccel", "--param", "alpha", "--range", "0.1..0.9", "--target", target, *extra]


def supplied(kind: str, path: str) -> list[str]:
    """`ccl audit` of a supplied target: its members (50 of the 160 synthetic records) and `kind` (logits or
    checkpoint) at `path`."""
    return audit("--target-members", "{tmp}/members.npy", f"--target-{kind}", path)


def audit_file(path: str) -> list[str]:
    """`ccl audit` of a user's .npz file (which takes no --data-option of the synthetic data)."""
    return ["audit", "--dataset", path, *RECIPE, "--bootstrap", "5", "--num-references", "2"]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, match: str) -> str:
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.search(match, lines[0]), lines[0]
    return lines[0]


# ---- files the rows need ---------------------------------------------------------------------------------
def text(name: str, content: str | bytes):
    def setup(tmp: Path) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def folder(name: str):
    return lambda tmp: (tmp / name).mkdir(parents=True)


def npz(name: str, x, y):
    return lambda tmp: write_npz(tmp / name, X=x, y=y)


RNG = np.random.default_rng(0)
XS = RNG.normal(size=(40, 4)).astype(np.float32)


def image_folder(name: str, per_class: int = 12):
    """An image folder of two classes, `per_class` random 8x8 PNGs each."""

    def setup(tmp: Path) -> None:
        from PIL import Image

        rng = np.random.default_rng(0)
        for c in range(2):
            (tmp / name / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                pixels = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp / name / f"c{c}" / f"{i}.png")

    return setup


def members_and(name: str, content: bytes | np.ndarray):
    """The supplied target's members (`members.npy`: 50 indices) and the file `name` holding `content`."""

    def setup(tmp: Path) -> None:
        np.save(tmp / "members.npy", np.arange(50))
        if isinstance(content, np.ndarray):
            np.save(tmp / name, content, allow_pickle=True)
        else:
            (tmp / name).write_bytes(content)

    return setup


@dataclass
class Cli:
    """One bad command line. `{tmp}` in `argv` is the test's tmp_path; in `match`, its regex-escaped form."""

    argv: list[str]
    match: str
    setup: Callable[[Path], object] | None = None


def cli_case(id_: str, argv, match, setup=None, *marks):
    return pytest.param(Cli(argv, match, setup), id=id_, marks=marks)


CLI_CASES = [
    # ---- the experiment's settings -------------------------------------------------------------------------
    cli_case("seeds-duplicate", compare("--seeds", "0", "0"), "`seeds`.*distinct"),
    cli_case("seeds-negative", compare("--seeds", "-1"), "`seeds`.*non-negative"),
    cli_case("epochs-zero", audit("--epochs", "0"), "`epochs`"),
    cli_case("batch-size-negative", audit("--batch-size", "-1"), "`batch_size`"),
    cli_case("lr-nan", audit("--lr", "nan"), "`lr`"),
    cli_case("lr-zero", train("--lr", "0"), r"`lr`.*\(0, inf\)"),
    cli_case("momentum-too-large", audit("--momentum", "1.5"), "`momentum`"),
    cli_case("weight-decay-negative", audit("--weight-decay", "-1"), "`weight_decay`"),
    cli_case("population-fraction", audit("--population-fraction", "0.95"), "`population_fraction`"),
    cli_case("bootstrap-negative", audit("--bootstrap", "-1"), "`bootstrap`"),
    cli_case("num-references-negative", audit("--num-references", "-2"), "`num_references`"),
    cli_case("attacks-unknown", audit("--attacks", "nope"), "Unknown attack 'nope'"),
    cli_case("attacks-need-references", audit("--attacks", "lira"), "'lira'.*--num-references is 2"),
    cli_case(
        "attacks-need-population",
        audit("--attacks", "rmia", "--population-fraction", "0"),
        "'rmia'.*--population-fraction",
    ),
    cli_case("dataset-unknown", audit("--dataset", "nope"), "Unknown dataset 'nope'"),
    cli_case("model-typo", audit("--model", "mlpp"), "Unknown model 'mlpp'.*Did you mean 'mlp'"),
    cli_case("model-image-on-tabular", audit("--model", "cnn"), "`input_shape`.*'cnn'"),
    cli_case("defense-unknown", compare("--defenses", "ce", "nope"), "Unknown defense 'nope'"),
    cli_case("defense-bad-value", compare("--defenses", "ccel:alpha=5"), r"ccel\(alpha=5\).*`alpha`"),
    cli_case("defense-bad-param", compare("--defenses", "ccel:beta2=1"), "'beta2'"),
    cli_case("defense-malformed", compare("--defenses", "ccel:alpha"), "`defense`.*'ccel:alpha'"),
    cli_case("defense-duplicate", compare("--defenses", "ce", "ce"), "`defenses`.*distinct"),
    cli_case(
        "audit-two-defenses",
        ["audit", *AUDIT, "--config", "{tmp}/two.yaml"],
        "--loss",
        text("two.yaml", "defenses: [ce, focal]\n"),
    ),
    cli_case("data-option-str", audit("--data-option", "num_samples=abc"), "`num_samples`"),
    cli_case("data-option-unknown", audit("--data-option", "bogus=1"), "'bogus'"),
    cli_case("model-option-hidden-str", audit("--model-option", "hidden=abc"), "`hidden`"),
    cli_case("model-option-hidden-negative", audit("--model-option", "hidden=[-5]"), "`hidden`"),
    cli_case("model-option-unknown", audit("--model-option", "foo=1"), "'foo'"),
    cli_case("augment-tabular", audit("--augment"), "`augment`"),
    cli_case("flip-queries-tabular", audit("--flip-queries"), "`flip_queries`"),
    cli_case("device-unknown", audit("--device", "tpu"), "`device`.*'tpu'"),
    cli_case(
        "device-cuda-absent",
        audit("--device", "cuda"),
        "`device`.*'cuda'",
        None,
        pytest.mark.skipif(CUDA, reason="CUDA is available"),
    ),
    cli_case("threads-zero", audit("--threads", "0"), "`threads`"),
    cli_case("train-refuses-seeds", train("--seeds", "1"), "--seeds.*ccl audit"),
    cli_case("train-refuses-references", train("--num-references", "2"), "--num-references"),
    # ---- data files ------------------------------------------------------------------------------------------
    cli_case("npz-missing", audit_file("{tmp}/absent.npz"), r"{tmp}/absent\.npz"),
    cli_case("npz-one-class", audit_file("{tmp}/one.npz"), r"one\.npz.*1 class", npz("one.npz", XS, np.zeros(40, int))),
    cli_case(
        "npz-x-strings",
        audit_file("{tmp}/str.npz"),
        r"str\.npz.*`X`",
        npz("str.npz", np.array(["a", "b"] * 20), np.arange(40) % 2),
    ),
    cli_case("npz-garbage", audit_file("{tmp}/garbage.npz"), r"garbage\.npz", text("garbage.npz", b"\x00\x01garbage")),
    cli_case(
        "npz-no-labels",
        audit_file("{tmp}/nolabels.npz"),
        r"nolabels\.npz.*'y'",
        lambda t: write_npz(t / "nolabels.npz", X=XS),
    ),
    cli_case(
        "npz-synthetic-option",
        audit("--dataset", "{tmp}/ok.npz"),
        r"'num_samples'.*ok\.npz",
        npz("ok.npz", XS, np.arange(40) % 2),
    ),
    cli_case(
        "csv-column-twice",
        ["audit", "--dataset", "{tmp}/dup.csv", "--data-option", "label=y", *RECIPE, "--num-references", "0"],
        r"dup\.csv has more than one column named 'a'",
        text("dup.csv", "a,b,a,y\n" + "".join(f"{i},{2 * i},{i % 3},{i % 2}\n" for i in range(40))),
    ),
    # ---- --config files --------------------------------------------------------------------------------------
    cli_case("config-missing", audit("--config", "{tmp}/absent.yaml"), r"{tmp}/absent\.yaml"),
    cli_case("config-is-directory", audit("--config", "{tmp}/confdir"), r"{tmp}/confdir.*directory", folder("confdir")),
    cli_case(
        "config-not-utf8",
        audit("--config", "{tmp}/bin.yaml"),
        r"{tmp}/bin\.yaml.*UTF-8",
        text("bin.yaml", b"\xff\xfe\x00"),
    ),
    cli_case(
        "config-yaml-syntax",
        audit("--config", "{tmp}/syntax.yaml"),
        r"{tmp}/syntax\.yaml.*line \d",
        text("syntax.yaml", "train: {epochs: 3\n  lr: [\n"),
    ),
    cli_case(
        "config-key-twice",
        audit("--config", "{tmp}/twice.yaml"),
        r"{tmp}/twice\.yaml as YAML \(line 2, column 1\).*'seeds' is given twice",
        text("twice.yaml", "seeds: [0]\nseeds: [1]\n"),
    ),
    cli_case(
        "config-nested-key-twice",
        audit("--config", "{tmp}/nested.yaml"),
        r"'lr' is given twice",
        text("nested.yaml", "train: {lr: 0.1, lr: 0.2}\n"),
    ),
    cli_case("loss-twice", audit("--loss", "ce", "--loss", "focal"), "give one --loss"),
    cli_case("defense-param-twice", compare("--defenses", "ccel:alpha=0.1,alpha=0.2"), "'alpha' is given twice"),
    cli_case("defense-sweep-param-twice", compare("--defenses", "ccel:alpha=[0.1,0.2],alpha=0.3"), "given twice"),
    cli_case(
        "early-stop-after-the-recipe",
        compare("--defenses", "ce", "early_stop:epochs=100"),
        r"early_stop\(epochs=100\).*`epochs`.*at most the recipe's 2 epochs",
    ),
    cli_case(
        "sweep-too-large-without-yes",
        compare("--defenses", "ccel:alpha=0.01..0.99/400"),
        r"would train up to 1,200 models \(400 defense setting\(s\) x 1 seed\(s\) x 3 model\(s\)\).*--yes",
    ),
    cli_case(
        "tune-too-large-without-yes",
        tune("auc<=0.6", "--grid", "400"),
        r"would train up to 1,200 models.*--yes",
    ),
    cli_case("defense-yaml-scanner-error", compare("--defenses", "ccel:alpha=["), r"ccel\(alpha=\[\).*`alpha`.*'\['"),
    cli_case("model-option-num-classes", audit("--model-option", "num_classes=3"), "`model_options`.*num_classes"),
    cli_case(
        "config-nested-deeply",
        audit("--config", "{tmp}/deep.yaml"),
        r"{tmp}/deep\.yaml.*nested too deeply",
        text("deep.yaml", "[" * 5000 + "]" * 5000 + "\n"),
    ),
    cli_case(
        "config-num-references-huge",
        ["audit", *TINY, "--config", "{tmp}/big.yaml"],
        r"`num_references`.*<= 10,000",
        text("big.yaml", "num_references: 100000000000000000000\n"),
    ),
    cli_case(
        "config-top-level-list",
        audit("--config", "{tmp}/list.yaml"),
        "`config file`.*mapping",
        text("list.yaml", "- epochs\n"),
    ),
    cli_case(
        "config-epochs-top-level", audit("--config", "{tmp}/c.yaml"), "'epochs'.*train:", text("c.yaml", "epochs: 3\n")
    ),
    cli_case(
        "config-device-top-level",
        audit("--config", "{tmp}/c.yaml"),
        "'device'.*runtime:",
        text("c.yaml", "device: cpu\n"),
    ),
    cli_case(
        "config-unknown-key",
        audit("--config", "{tmp}/c.yaml"),
        "Unknown key 'datset'.*Did you mean 'dataset'",
        text("c.yaml", "datset: digits\n"),
    ),
    cli_case(
        "config-runtime-in-train",
        audit("--config", "{tmp}/c.yaml"),
        "'device'.*runtime",
        text("c.yaml", "train: {device: cpu}\n"),
    ),
    cli_case(
        "config-train-in-runtime",
        audit("--config", "{tmp}/c.yaml"),
        "'epochs'.*runtime",
        text("c.yaml", "runtime: {epochs: 3}\n"),
    ),
    cli_case(
        "config-runtime-not-mapping",
        audit("--config", "{tmp}/c.yaml"),
        "runtime:.*mapping",
        text("c.yaml", "runtime: 5\n"),
    ),
    cli_case(
        "config-defenses-string", compare("--config", "{tmp}/c.yaml"), "`defenses`", text("c.yaml", "defenses: 5\n")
    ),
    cli_case("config-seeds-strings", compare("--config", "{tmp}/c.yaml"), "`seeds`", text("c.yaml", "seeds: [a, b]\n")),
    cli_case("config-fprs-range", audit("--config", "{tmp}/c.yaml"), "`fprs`", text("c.yaml", "fprs: [0.5, 2]\n")),
    cli_case(
        "qmia-population-too-small",
        ["audit", "--dataset", "{tmp}/imgs/", "--model", "cnn", *RECIPE[2:], "--attacks", "qmia"],
        r"'qmia' needs at least 3 population records; --population-fraction 0\.1 .* leaves 2",
        image_folder("imgs"),
    ),
    # ---- ccl tune's target: checked before any model trains -------------------------------------------------
    cli_case("tune-target-fpr-not-a-number", tune("tpr@..<=0.1"), r"`target`.*'\.\.'"),
    cli_case("tune-target-bound-not-a-number", tune("auc<=1e"), r"`target`.*'1e'"),
    cli_case("tune-target-unknown-attack", tune("nope:auc<=0.6"), r"--target.*Unknown attack 'nope'"),
    cli_case("tune-target-fpr-above-1", tune("tpr@2<=0.6"), r"`target`.*false-positive rate in \(0, 1\)"),
    cli_case("tune-target-fpr-not-reported", tune("tpr@0.3<=0.6"), r"--target.*tpr@0\.3.*does not report"),
    cli_case("tune-target-attack-needs-references", tune("lira:auc<=0.6"), r"--target.*'lira'.*--num-references is 2"),
    cli_case("tune-target-attack-left-out", tune("lira:auc<=0.6", "--attacks", "loss"), r"'lira'.*--attacks"),
    # ---- a supplied target: its files are read before the run directory exists ------------------------------
    cli_case(
        "target-logits-random-bytes",
        supplied("logits", "{tmp}/t.npy"),
        r"--target-logits {tmp}/t\.npy",
        members_and("t.npy", np.random.default_rng(0).bytes(1000)),
    ),
    cli_case(
        "target-logits-object-array",
        supplied("logits", "{tmp}/t.npy"),
        r"--target-logits {tmp}/t\.npy.*Object arrays",
        members_and("t.npy", np.array([{"a": 1}] * 160, dtype=object)),
    ),
    cli_case(
        "target-logits-wrong-shape",
        supplied("logits", "{tmp}/t.npy"),
        r"`target_logits`.*\(160, 5\)",
        members_and("t.npy", np.zeros((160, 3))),
    ),
    cli_case(
        "target-logits-nan",
        supplied("logits", "{tmp}/t.npy"),
        r"`target_logits`.*finite",
        members_and("t.npy", np.full((160, 5), np.nan)),
    ),
    cli_case(
        "target-checkpoint-random-bytes",
        supplied("checkpoint", "{tmp}/t.pt"),
        r"--target-checkpoint {tmp}/t\.pt",
        members_and("t.pt", np.random.default_rng(0).bytes(1000)),
    ),
    cli_case(
        "target-members-random-bytes",
        supplied("logits", "{tmp}/t.npy"),
        r"--target-members {tmp}/members\.npy",
        lambda t: [members_and("t.npy", np.zeros((160, 5)))(t), (t / "members.npy").write_bytes(b"\x93NUMPY garbage")],
    ),
    # ---- --out and --cache-dir -------------------------------------------------------------------------------
    cli_case("out-is-file", ["audit", *AUDIT, "--out", "{tmp}/afile"], r"{tmp}/afile.*is a file", text("afile", "x")),
    cli_case(
        "out-below-file", ["audit", *AUDIT, "--out", "{tmp}/afile/run"], r"{tmp}/afile.*is a file", text("afile", "x")
    ),
    cli_case(
        "cache-dir-is-file",
        audit("--cache-dir", "{tmp}/cachefile"),
        r"--cache-dir {tmp}/cachefile.*file",
        text("cachefile", "x"),
    ),
    cli_case(
        "cache-dir-below-file",
        audit("--cache-dir", "{tmp}/cachefile/sub"),
        r"--cache-dir {tmp}/cachefile/sub.*{tmp}/cachefile is a file",
        text("cachefile", "x"),
    ),
    # ---- --resume of what is not a run ----------------------------------------------------------------------
    cli_case(
        "resume-missing",
        ["audit", "--resume", "--quiet", "--out", "{tmp}/nothing"],
        r"Nothing to resume: {tmp}/nothing",
    ),
    cli_case(
        "resume-not-a-run",
        ["audit", "--resume", "--quiet", "--out", "{tmp}/notrun"],
        r"{tmp}/notrun.*no config\.yaml",
        text("notrun/data.txt", "x"),
    ),
]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_input(case: Cli, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    if case.setup is not None:
        case.setup(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    argv = [a.replace("{tmp}", str(tmp_path)) for a in case.argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    rc, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err, case.match.replace("{tmp}", re.escape(str(tmp_path))))
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert after == before, "left behind: " + ", ".join(str(p) for p in sorted(set(after) - set(before)))


USER_MODELS = """
import torch


def raises_key_error(num_classes, input_shape, **options):
    raise KeyError("oops")


class Slice(torch.nn.Module):  # outputs of the right shape, but nothing to train
    def forward(self, x):
        return x[:, :5] * 1.0


def no_parameters(num_classes, input_shape, **options):
    return Slice()


class FailsInTraining(torch.nn.Module):
    def __init__(self, features, classes):
        super().__init__()
        self.fc = torch.nn.Linear(features, classes)

    def forward(self, x):
        if self.training:
            raise IndexError("only in training")
        return self.fc(x)


def fails_in_training(num_classes, input_shape, **options):
    return FailsInTraining(input_shape[0], num_classes)
"""


@pytest.mark.parametrize(
    "factory, match",
    [
        pytest.param("raises_key_error", r"Cannot build model '\w+:raises_key_error'.*KeyError: 'oops'", id="raises"),
        pytest.param("no_parameters", r"'\w+:no_parameters' has no trainable parameters", id="no-parameters"),
        pytest.param(
            "fails_in_training", r"'\w+:fails_in_training'.*training mode.*IndexError", id="fails-in-training"
        ),
    ],
)
@pytest.mark.parametrize("command", ["audit", "train"])
def test_cli_user_model_fails(factory, match, command, tmp_path, monkeypatch, capsys):
    """Your own model's code may raise anything: the error is one line naming the model, before any run
    directory exists (a model that fails only in training mode is caught by preflight's training step)."""
    name = f"bad_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / f"{name}.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    monkeypatch.chdir(tmp_path)
    argv = (audit if command == "audit" else train)("--model", f"{name}:{factory}", "--out", str(tmp_path / "out"))
    rc, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err, match)
    assert not (tmp_path / "out").exists()


def test_exponent_floats_are_numbers():
    """YAML 1.1 (PyYAML) reads `1e-6` as a string; defense parameters, flags and config files read it as YAML 1.2
    does, a number."""
    from ccl.config import expand_defense, yaml_value

    assert expand_defense("ccel:alpha=5e-1")[0].params == {"alpha": 0.5}
    assert expand_defense("dpsgd:epsilon=1e-6")[0].params["epsilon"] == 1e-6
    assert [d.params["alpha"] for d in expand_defense("ccel:alpha=[1e-1,5E-1]")] == [0.1, 0.5]
    assert yaml_value("1e3") == 1000.0 and yaml_value("-2.5e-2") == -0.025 and yaml_value("1e") == "1e"
    assert yaml_value("12") == 12 and isinstance(yaml_value("12"), int)


ARGPARSE_CASES = [
    pytest.param(audit("--epochs", "abc"), "--epochs", id="epochs-not-int"),
    pytest.param(audit("--lr", "fast"), "--lr", id="lr-not-float"),
    pytest.param(compare("--seeds", "a"), "--seeds", id="seeds-not-int"),
    pytest.param(audit("--precision", "fp64"), "--precision", id="precision-choice"),
    pytest.param(audit("--optimizer", "rmsprop"), "--optimizer", id="optimizer-choice"),
    pytest.param(audit("--stacked", "maybe"), "--stacked", id="stacked-choice"),
    pytest.param(audit("--model-option", "hidden"), "--model-option", id="model-option-no-equals"),
    pytest.param(audit("--data-option", "num_samples=[1"), "--data-option", id="data-option-bad-yaml"),
    pytest.param(["audit", "--bogus-flag"], "--bogus-flag", id="unknown-flag"),
    pytest.param(["nope"], "nope", id="unknown-command"),
]


@pytest.mark.parametrize("argv, flag", ARGPARSE_CASES)
def test_cli_malformed_flag(argv, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main([*argv, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and flag in err
    assert not (tmp_path / "out").exists()


def test_cli_diverging_training_names_the_epoch(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    rc, err = run_cli(audit("--lr", "1e30", "--epochs", "1", "--num-references", "0", "--out", str(out)), capsys)
    line = assert_one_line_error(rc, err, r"non-finite at epoch 0|diverged at epoch 0")
    assert "--lr" in line
    assert not (out / "report.html").exists()
    assert not (out / "metrics.json").exists()
    with pytest.raises(TrainingError, match="epoch 0"):  # --debug raises the error itself: its type
        cli.main(["--debug", *audit("--lr", "1e30", "--epochs", "1", "--num-references", "0", "--out", str(out) + "2")])
    assert not (tmp_path / "out2" / "report.html").exists()


# ==========================================================================================================
# Finished runs: report and resume
# ==========================================================================================================
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One tiny finished audit (target + 2 stacked reference models), copied by each test that spoils it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    with warnings.catch_warnings():  # the tiny run's population is too small for RMIA at low FPRs: it says so
        warnings.simplefilter("ignore")
        assert cli.main(audit("--out", str(out))) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def scores_file(run: Path) -> Path:
    return run / "results" / "ce" / "seed-0" / "scores.npz"


def delete(path: Path) -> None:
    path.unlink()


def random_bytes(path: Path) -> None:
    path.write_bytes(b"\xff\xfe" + np.random.default_rng(0).bytes(500))


REPORT_CASES = [
    pytest.param(scores_file, delete, r"results/ce/seed-0/scores\.npz is missing", id="scores-deleted"),
    pytest.param(scores_file, truncated, r"results/ce/seed-0/scores\.npz is corrupt", id="scores-truncated"),
    pytest.param(scores_file, random_bytes, r"results/ce/seed-0/scores\.npz is corrupt", id="scores-random-bytes"),
    pytest.param(lambda r: r / "config.yaml", random_bytes, r"run/config\.yaml is corrupt", id="config-random-bytes"),
    pytest.param(
        lambda r: r / "config.yaml", delete, r"run is not a ccl run directory \(no config\.yaml\)", id="config-deleted"
    ),
    pytest.param(
        lambda r: r / "results" / "ce" / "seed-0" / "metrics.json",
        random_bytes,
        r"results/ce/seed-0/metrics\.json is corrupt",
        id="result-random-bytes",
    ),
]


@pytest.mark.parametrize("target, spoil, match", REPORT_CASES)
def test_report_of_a_spoiled_run(run_copy, target, spoil, match, capsys):
    (run_copy / "report.html").unlink()
    spoil(target(run_copy))
    rc, err = run_cli(["report", str(run_copy)], capsys)
    assert_one_line_error(rc, err, match)
    assert not (run_copy / "report.html").exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        pytest.param(["report", "{tmp}/nothing"], r"{tmp}/nothing is not a ccl run directory", id="missing"),
        pytest.param(["report", "{tmp}/afile"], r"{tmp}/afile is not a ccl run directory", id="a-file"),
        pytest.param(["report"], "RUN_DIR", id="no-directory"),
    ],
)
def test_report_of_what_is_not_a_run(argv, match, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    a_file(tmp_path, "afile")
    rc, err = run_cli([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert_one_line_error(rc, err, match.replace("{tmp}", re.escape(str(tmp_path))))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


RESUME_CASES = [
    pytest.param(["--epochs", "3"], r"train\.epochs 2 -> 3", id="recipe-epochs"),
    pytest.param(["--lr", "0.5"], r"train\.lr", id="recipe-lr"),
    pytest.param(["--dataset", "digits"], r"dataset 'synthetic' -> 'digits' \(--dataset\)", id="dataset"),
    pytest.param(["--data-option", "num_samples=200"], r"--data-option", id="dataset-options"),
    pytest.param(["--model-option", "hidden=[32]"], r"--model-option", id="model-options"),
    pytest.param(["--stacked", "off"], r"stacked 'auto' -> 'off' \(--stacked\)", id="stacked"),
    pytest.param(["--bootstrap", "7"], r"bootstrap 5 -> 7 \(--bootstrap\)", id="bootstrap"),
    pytest.param(["--population-fraction", "0.2"], r"--population-fraction", id="population-fraction"),
    pytest.param(["--num-references", "0"], r"--num-references.*\(2 -> 0\)", id="fewer-references"),
    pytest.param(["--seeds", "1"], r"seeds.*\[0\]", id="drop-seed"),
    pytest.param(["--loss", "focal"], r"defenses.*\['ce'\]", id="drop-defense"),
    pytest.param(["--attacks", "loss"], r"--attacks", id="restrict-attacks"),
    pytest.param(["--epochs", "0"], r"`epochs`", id="invalid-epochs"),
]


@pytest.mark.parametrize("flags, match", RESUME_CASES)
def test_resume_that_changes_finished_work(run_copy, flags, match, capsys):
    config, history = (run_copy / "config.yaml").read_bytes(), (run_copy / "run.json").read_bytes()
    rc, err = run_cli(["audit", "--resume", "--quiet", *flags, "--out", str(run_copy)], capsys)
    assert_one_line_error(rc, err, match)
    assert (run_copy / "config.yaml").read_bytes() == config
    assert (run_copy / "run.json").read_bytes() == history


def test_rerun_without_resume_is_refused(run_copy, capsys):
    config = (run_copy / "config.yaml").read_bytes()
    rc, err = run_cli(audit("--out", str(run_copy)), capsys)
    assert_one_line_error(rc, err, r"run already exists and is not empty.*--resume")
    assert (run_copy / "config.yaml").read_bytes() == config


def test_resume_of_a_corrupt_config(run_copy, capsys):
    random_bytes(run_copy / "config.yaml")
    spoiled = (run_copy / "config.yaml").read_bytes()
    rc, err = run_cli(["audit", "--resume", "--quiet", "--out", str(run_copy)], capsys)
    assert_one_line_error(rc, err, r"run/config\.yaml is corrupt")
    assert (run_copy / "config.yaml").read_bytes() == spoiled


@pytest.mark.parametrize("cut", [0, 0.5, 0.9], ids=["empty", "half", "last-key-cut"])
def test_resume_of_a_truncated_config(run_copy, cut, capsys):
    """An empty or cut config.yaml is refused, not filled with defaults, rewritten and retrained."""
    raw = (run_copy / "config.yaml").read_bytes()
    text = raw.decode()
    cut_at = text.rindex("\n", 0, int(len(text) * cut)) + 1 if cut else 0  # at a line end: still valid YAML
    (run_copy / "config.yaml").write_bytes(raw[:cut_at])
    rc, err = run_cli(["audit", "--resume", "--quiet", "--out", str(run_copy)], capsys)
    assert_one_line_error(rc, err, r"run/config\.yaml is truncated or incomplete \(no \w+")
    assert (run_copy / "config.yaml").read_bytes() == raw[:cut_at]


def test_resume_with_a_truncated_stacked_checkpoint(run_copy, capsys):
    """The reference models' outputs are gone, so a resume retrains their stacked group, from the group's
    checkpoint (`cache/stacked/<hash of the jobs' keys>.pt`, see `ccl.audit.execute.train_group`), which is
    truncated: the error names it."""
    jobs = {}
    for job in (run_copy / "models").glob("*/job.json"):
        role = json.loads(job.read_text())["role"]
        if role.startswith("reference-"):
            jobs[int(role.split("-")[1])] = job.parent.name
            (job.parent / "outputs.npz").unlink()
    name = hashlib.sha256("-".join(jobs[k] for k in sorted(jobs)).encode()).hexdigest()[:20]
    checkpoint = run_copy / "models" / "stacked" / f"{name}.pt"
    if not checkpoint.exists():  # reference models' checkpoints may be deleted once their outputs are stored
        checkpoint.parent.mkdir(exist_ok=True)
        torch.save({"params": {"w": torch.zeros(64, 64)}, "epoch": 1}, checkpoint)
    truncated(checkpoint)
    (run_copy / "results" / "ce" / "seed-0" / "metrics.json").unlink()
    config = (run_copy / "config.yaml").read_bytes()
    rc, err = run_cli(["audit", "--resume", "--quiet", "--out", str(run_copy)], capsys)
    assert_one_line_error(rc, err, re.escape(str(checkpoint)) + ".*truncated")
    assert (run_copy / "config.yaml").read_bytes() == config


# ==========================================================================================================
# Ray: resources the cluster does not have
# ==========================================================================================================
@pytest.mark.parametrize(
    "asks, match",
    [
        pytest.param({"gpus_per_model": 1}, r"--gpus-per-model 1: .*1 GPU.*has 0 GPU", id="gpu-on-a-cpu-cluster"),
        pytest.param({"cpus_per_model": 64}, r"--cpus-per-model 64: .*64 CPU.*has 2 CPU", id="more-cpus-than-cluster"),
    ],
)
def test_ray_refuses_resources_the_cluster_lacks(asks, match):
    """A task asking for a GPU on a cluster without one waited forever; the executor refuses it when it connects
    (here against a stand-in for `ray` that reports a 2-CPU cluster)."""
    pytest.importorskip("ray")
    from types import SimpleNamespace

    from ccl.audit.ray_executor import RayExecutor
    from ccl.errors import ConfigError

    executor = RayExecutor(**asks)
    executor._ray = SimpleNamespace(cluster_resources=lambda: {"CPU": 2.0}, is_initialized=lambda: True)
    with pytest.raises(ConfigError, match=match):
        executor.check_resources()


def test_qmia_is_skipped_by_default_with_a_tiny_population():
    """A 24-image folder leaves 2 population records: too few for QMIA's calibration. Named, it is refused before
    training (`qmia-population-too-small`); left to the default, it is not run (it failed after training)."""
    qmia = attacks.create("qmia")
    assert qmia.min_population == 3
    assert attacks.create("qmia", calibration_fraction=0).min_population == 2
    tiny = inputs(
        features=logits(6, 2),
        population_features=logits(2, 2),
        population_target_logits=logits(2, 3),
        population_labels=labels(2),
        population_reference_logits=logits(4, 2, 3),
    )
    assert not attacks.runnable(qmia, tiny)
    assert attacks.runnable(attacks.create("loss"), tiny)


def test_report_of_an_unfinished_run_says_so(run_copy, capsys):
    """A run killed before its second seed (config.yaml asks for seeds 0 and 1; only seed 0's result exists): the
    report renders the complete results and says, on stderr and at the top of the page, what is missing."""
    import yaml

    config = yaml.safe_load((run_copy / "config.yaml").read_text())
    (run_copy / "config.yaml").write_text(yaml.safe_dump({**config, "seeds": [0, 1]}, sort_keys=False))
    (run_copy / "metrics.json").unlink()  # the aggregate is written at the very end
    rc, err = run_cli(["report", str(run_copy)], capsys)
    assert rc == 0, err
    assert re.search(r"warning: This run is unfinished: 1 of 2 results .* missing: ce seed 1\..*--resume", err), err
    assert "This run is unfinished" in (run_copy / "report.html").read_text()
    (run_copy / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    rc, err = run_cli(["report", str(run_copy)], capsys)
    assert rc == 0 and "unfinished" not in err


def test_a_large_run_starts_with_yes_and_prints_its_plan(capsys):
    import argparse

    from ccl.config import ExperimentConfig

    config = ExperimentConfig.from_dict({"dataset": "synthetic", "defenses": ["ccel:alpha=0.01..0.99/400"]})
    cli._confirm_size(argparse.Namespace(yes=True, quiet=False), config)  # 400 x 1 x 9 models: no error
    out = capsys.readouterr().out
    assert out.startswith("Plan: up to 3,600 models (400 defense setting(s) x 1 seed(s) x 9 model(s)): 108,000 model")
    # a recipe chosen among three trains three candidate targets too, with their own epochs
    config = ExperimentConfig.from_dict({"dataset": "synthetic", "defenses": ["ce", "ce@epochs=10,lr=[0.1,0.2,0.3]"]})
    cli._confirm_size(argparse.Namespace(yes=True, quiet=False), config)
    out = capsys.readouterr().out
    assert out.startswith("Plan: up to 21 models (2 defense setting(s) x 1 seed(s) x 12+9 model(s)): 390 model-epochs")


# ==========================================================================================================
# Faults: a full disk, truncated or edited files of a run
# ==========================================================================================================
def full_disk_at(monkeypatch, name: str) -> None:
    """Every atomic write of a file called `name` fails as on a full disk (ENOSPC at its fsync)."""
    import errno
    import os

    from ccl import _io

    fsync = os.fsync

    def failing(fd):
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{name}."):
            raise OSError(errno.ENOSPC, "No space left on device")
        return fsync(fd)

    monkeypatch.setattr(_io.os, "fsync", failing)


def test_full_disk_at_start_leaves_nothing(tmp_path, monkeypatch, capsys):
    """A disk full when config.yaml is written: one line naming it, and no directory holding only .lock."""
    monkeypatch.chdir(tmp_path)
    full_disk_at(monkeypatch, "config.yaml")
    rc, err = run_cli(audit("--out", str(tmp_path / "out")), capsys)
    assert_one_line_error(rc, err, r"No space left on device writing .*out/config\.yaml")
    assert not (tmp_path / "out").exists()


def test_full_disk_mid_run_is_resumable(tmp_path, monkeypatch, capsys):
    """A disk full when a model's outputs are stored: one line naming the file; once space is back, --resume
    finishes the run."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = audit("--num-references", "0", "--epochs", "1", "--out", str(out))
    with monkeypatch.context() as m:
        full_disk_at(m, "outputs.npz")
        rc, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err, r"No space left on device writing .*outputs\.npz.*--resume")
    assert (out / "config.yaml").exists() and not (out / "metrics.json").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["audit", "--resume", "--quiet", "--out", str(out)]) == 0
    assert (out / "metrics.json").exists()


def test_torch_write_failure_is_named():
    """torch.save on a full disk raises RuntimeError ("file write failed"), not OSError: named the same way."""
    from ccl._io import atomic_path

    with pytest.raises(RunDirectoryError, match=r"No space left on device writing .*model\.pt"):
        with atomic_path(Path("/tmp") / "ccl-test-model.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file")
    assert not list(Path("/tmp").glob(".ccl-test-model.pt.*"))


def test_sigterm_stops_like_sigint_with_the_resume_hint(tmp_path, monkeypatch, capsys):
    """SIGTERM (a scheduler's stop) mid-run: the resume hint SIGINT prints, and exit status 143."""
    import os
    import signal

    import ccl.audit

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not stop the run")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ccl.audit, "run_audit", terminated)
    before = signal.getsignal(signal.SIGTERM)
    rc, err = run_cli(audit("--out", str(tmp_path / "out")), capsys)
    assert rc == 143, err
    assert "Terminated. Completed models and results are kept" in err and "ccl audit --resume --out" in err
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is ccl.cli.main's only while it runs


def target_folder(run: Path) -> Path:
    return next(j.parent for j in (run / "models").glob("*/job.json") if json.loads(j.read_text())["role"] == "target")


def flip_a_bit(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))


def edit_a_logit(path: Path) -> None:
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["logits"] = arrays["logits"].copy()
    arrays["logits"].flat[0] += 1.0
    np.savez(path, **arrays)


CACHED_FILE_CASES = [
    pytest.param("outputs.npz", flip_a_bit, r"outputs\.npz does not match the SHA-256", id="outputs-bit-flip"),
    pytest.param("outputs.npz", edit_a_logit, r"outputs\.npz does not match the SHA-256", id="outputs-edited"),
    pytest.param("log.jsonl", truncated, r"log\.jsonl does not match the SHA-256", id="log-truncated"),
    pytest.param("job.json", truncated, r"job\.json is corrupt or truncated", id="job-record-truncated"),
]


@pytest.mark.parametrize("name, spoil, match", CACHED_FILE_CASES)
def test_resume_checks_cached_files(run_copy, name, spoil, match, capsys):
    """A cached model's files are checked against the digests its job.json recorded: a resume that scores the
    model again names the spoiled file (a truncated job.json would have dropped DP's epsilon silently)."""
    spoil(target_folder(run_copy) / name)
    (run_copy / "results" / "ce" / "seed-0" / "metrics.json").unlink()  # the result is computed again
    rc, err = run_cli(["audit", "--resume", "--quiet", "--out", str(run_copy)], capsys)
    assert_one_line_error(rc, err, match)


def test_resume_keeps_the_thread_count(run_copy, capsys):
    """On a CPU the thread count changes results (~1e-7 in logits): run.json records the number that ran (not
    null), and a resume with another is refused."""
    runs = json.loads((run_copy / "run.json").read_text())["invocations"]
    assert runs[-1]["runtime"]["threads"] == 1  # a small model on a CPU trains with one thread
    history = (run_copy / "run.json").read_bytes()
    rc, err = run_cli(["audit", "--resume", "--quiet", "--threads", "2", "--out", str(run_copy)], capsys)
    assert_one_line_error(rc, err, r"--threads 2: this run's models were trained with 1 CPU thread")
    assert (run_copy / "run.json").read_bytes() == history


def test_the_thread_count_is_in_a_cpu_models_key_unless_it_is_one():
    """Two thread counts give weights ~1e-7 apart: a shared --cache-dir never hands one count's model to a run
    with another; one thread (small models' default) keeps the keys older runs wrote."""
    from ccl.audit.plan import plan_jobs
    from ccl.config import ExperimentConfig
    from ccl.data import membership_split

    config = ExperimentConfig(num_references=2)
    split = membership_split(1797, seed=0, num_references=2, population_fraction=0.1)
    keys = {t: [j.key for j in plan_jobs(config, config.defenses[0], 0, split, threads=t)] for t in (None, 1, 2, 4)}
    assert keys[None] == keys[1]
    assert len({tuple(k) for k in keys.values()}) == 3 and set(keys[2]).isdisjoint(keys[4])
