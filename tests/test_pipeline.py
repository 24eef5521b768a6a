"""The audit pipeline's seams: cache keys, settings precedence, aggregation, resume, imports and errors."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest

import ccl
from ccl import cli
from ccl.audit import plan_jobs, run_audit
from ccl.config import ExperimentConfig, merge
from ccl.errors import CclError, ConfigError
from ccl.results import DefenseResult, aggregate, load_results, write_aggregate
from ccl.training import Recipe, Runtime, fit

SRC = Path(ccl.__file__).parent
TINY_RAW = {
    "dataset": "synthetic",
    "dataset_options": {"num_samples": 160, "num_features": 8},
    "model_options": {"hidden": [16]},
    "num_references": 4,
    "bootstrap": 5,
    "train": {"epochs": 2, "batch_size": 16, "lr": 0.05},
}


def keys(raw: dict, seed: int = 0) -> list[str]:
    config = ExperimentConfig.from_dict(raw)
    split = ccl.data.membership_split(160, num_references=config.num_references, seed=seed)
    return [j.key for j in plan_jobs(config, config.defenses[0], seed, split)]


# ------------------------------------------------------------------ cache keys
def test_cache_keys_follow_the_recipe_and_nothing_else():
    base = keys(TINY_RAW)
    assert len(set(base)) == len(base) == 5  # target + 4 references, all distinct
    assert keys(TINY_RAW) == base  # deterministic
    # every recipe option changes every key
    for change in ({"lr": 0.1}, {"epochs": 3}, {"batch_size": 8}, {"weight_decay": 0.0}, {"optimizer": "adam"}):
        changed = keys(merge(TINY_RAW, {"train": change}))
        assert not set(changed) & set(base), change
    assert not set(keys({**TINY_RAW, "defenses": ["ccel"]})) & set(base)
    assert not set(keys({**TINY_RAW, "model_options": {"hidden": [17]}})) & set(base)
    assert not set(keys(TINY_RAW, seed=1)) & set(base)
    # attacks, bootstrap and FPRs do not determine a model: keys unchanged
    for change in ({"bootstrap": 7}, {"attacks": ["loss"]}, {"fprs": [0.05]}):
        assert keys({**TINY_RAW, **change}) == base, change
    # the trainer is part of a reference model's key, not of the target's (always trained alone)
    off = keys({**TINY_RAW, "stacked": "off"})
    assert off[0] == base[0] and not set(off[1:]) & set(base[1:])
    # more reference models keep the first ones' keys
    assert keys({**TINY_RAW, "num_references": 8})[:5] == base


def test_a_checkpoint_resumes_under_another_runtime(tmp_path, quiet):
    """Runtime options (progress, eval_every, threads) never invalidate a checkpoint; the recipe does."""
    data = ccl.data.load("synthetic", num_samples=100, num_features=6, num_classes=3)
    model = lambda: ccl.models.create("mlp", num_classes=3, input_shape=(6,), hidden=(8,), seed=0)  # noqa: E731
    recipe = Recipe(epochs=2, batch_size=16, lr=0.05)
    fit(model(), ccl.losses.create("ce"), (data.x, data.y), recipe=recipe, runtime=quiet, checkpoint_dir=tmp_path)
    again = fit(
        model(),
        ccl.losses.create("ce"),
        (data.x, data.y),
        recipe=recipe.replace(epochs=3),
        runtime=Runtime(progress=True, eval_every=3, threads=1),
        checkpoint_dir=tmp_path / "b",
    )
    assert again.resumed_from_epoch == 0
    resumed = fit(
        model(),
        ccl.losses.create("ce"),
        (data.x, data.y),
        recipe=recipe,
        runtime=Runtime(progress=True, eval_every=2, threads=1),
        checkpoint_dir=tmp_path,
    )
    assert resumed.resumed_from_epoch == 2
    with pytest.raises(CclError, match="another recipe"):
        fit(
            model(),
            ccl.losses.create("ce"),
            (data.x, data.y),
            recipe=recipe.replace(lr=0.2),
            runtime=quiet,
            checkpoint_dir=tmp_path,
        )


# ------------------------------------------------------------------ settings precedence
def test_settings_merge_defaults_base_file_flags_in_that_order(tmp_path):
    base = {"dataset": "synthetic", "train": {"epochs": 5, "lr": 0.3}, "seeds": [0, 1]}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 0.2\n  batch_size: 8\nseeds: [2]\nruntime:\n  threads: 1\n")
    args = cli.make_parser().parse_args(["compare", "--config", str(cfg), "--batch-size", "4", "--quiet"])
    config = cli.build_config(args, base)
    assert config.train.epochs == 5  # base, not overridden
    assert config.train.lr == 0.2  # file over base
    assert config.train.batch_size == 4  # flag over file
    assert config.train.momentum == Recipe().momentum  # default
    assert config.seeds == [2]  # top-level keys are replaced whole
    runtime = cli.build_runtime(args)
    assert runtime.threads == 1 and runtime.progress is False  # runtime: file, then flags


@pytest.mark.parametrize(
    ("yaml_text", "hint"),
    [
        ("epochs: 3\n", "under 'train:'"),
        ("device: cpu\n", "under 'runtime:'"),
        ("loss: ccel\n", "'defenses:'"),
        ("train:\n  device: cpu\n", "runtime option"),
        ("train:\n  seeds: [1]\n", "top-level key"),
    ],
)
def test_misplaced_yaml_keys_say_where_they_belong(tmp_path, capsys, yaml_text, hint):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    assert cli.main(["compare", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert hint in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ aggregation
def _result(defense: str, seed: int, acc: float, auc: float, tpr: float | None) -> DefenseResult:
    attack = {
        "auc": auc,
        "auc_ci": [auc - 0.1, auc + 0.1],
        "advantage": auc - 0.5,
        "advantage_ci": [0, 1],
        "tpr@0.01": tpr,
        "tpr@0.01_ci": [None, None],
        "n_members": 10,
        "n_nonmembers": 10,
    }
    return DefenseResult(
        defense,
        defense,
        {"loss": defense, "params": {}},
        seed,
        "k",
        acc,
        acc,
        0.1,
        0.1,
        0.2,
        0.2,
        0.3,
        4,
        10,
        10,
        5,
        [0.01],
        {"loss": attack},
        [],
    )


def test_aggregate_is_the_mean_and_std_over_seeds_and_writes_valid_json(tmp_path):
    results = [_result("ce", 0, 0.8, 0.6, 0.1), _result("ce", 1, 0.9, 0.7, None), _result("focal", 0, 0.7, 0.55, 0.0)]
    agg = aggregate(results, order=["focal", "ce"], fprs=[0.01])
    assert [r.defense for r in agg.rows] == ["focal", "ce"]
    ce = agg.rows[1]
    assert ce.seeds == [0, 1]
    assert ce.values["test_acc"] == pytest.approx(0.85) and ce.values["test_acc_std"] == pytest.approx(
        np.std([0.8, 0.9], ddof=1)
    )
    assert ce.metric("loss", "auc")[:2] == pytest.approx((0.65, np.std([0.6, 0.7], ddof=1)))
    assert ce.metric("loss", "tpr@0.01")[0] == pytest.approx(0.1)  # NaN/None seeds are left out of the mean
    assert ce.metric("loss", "auc")[2] is None  # intervals are carried only for a single seed
    assert agg.rows[0].metric("loss", "auc")[2] == pytest.approx([0.45, 0.65])
    write_aggregate(tmp_path, agg)
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and json.loads(text)["rows"][0]["defense"] == "focal"
    assert (tmp_path / "table.csv").read_text().splitlines()[0].startswith("defense,seeds,test_acc")
    nan_agg = aggregate([_result("ce", 0, 0.8, math.nan, None)], fprs=[0.01])
    write_aggregate(tmp_path, nan_agg)
    assert json.loads((tmp_path / "metrics.json").read_text())["rows"][0]["attacks"]["loss"]["auc"] is None


# ------------------------------------------------------------------ the pipeline end to end
def test_resume_with_only_runtime_changes_trains_nothing(tmp_path):
    out = tmp_path / "run"
    argv = [
        "audit",
        "--dataset",
        "synthetic",
        "--data-option",
        "num_samples=160",
        "--data-option",
        "num_features=8",
        "--model-option",
        "hidden=[16]",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--num-references",
        "4",
        "--bootstrap",
        "5",
        "--out",
        str(out),
    ]
    assert cli.main([*argv, "--quiet"]) == 0
    files = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("*") if p.is_file() and p.name != ".lock"}
    metrics = (out / "metrics.json").read_bytes()
    assert cli.main(["audit", "--resume", "--quiet", "--threads", "1", "--out", str(out)]) == 0
    now = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("*") if p.is_file() and p.name != ".lock"}
    assert now == files  # no model trained, no checkpoint rewritten
    assert (out / "metrics.json").read_bytes() == metrics
    history = json.loads((out / "run.json").read_text())["invocations"]
    assert len(history) == 2 and history[1]["resume"] and history[1]["runtime"]["threads"] == 1
    # each invocation has its own seconds per phase; the resume found every result done: nothing trained
    first, second = (h["timing"]["phases"] for h in history)
    assert {"preflight", "train", "score", "summary", "report"} <= set(first)
    assert "train" not in second and "score" not in second and "report" in second


def test_resume_that_adds_a_seed_and_a_defense_runs_only_the_new_work(tmp_path, quiet):
    out = tmp_path / "run"
    config = ExperimentConfig.from_dict(TINY_RAW)
    run_audit(config, out, runtime=quiet)
    first = {p: p.stat().st_mtime_ns for p in (out / "models").glob("*/outputs.npz")}
    first_result = (out / "results" / "ce" / "seed-0" / "metrics.json").read_bytes()
    more = ExperimentConfig.from_dict({**TINY_RAW, "seeds": [0, 1], "defenses": ["ce", "focal"]})
    phases = json.loads((out / "run.json").read_text())["invocations"][0]["timing"]["phases"]
    assert {"preflight", "train", "score", "summary"} <= set(phases) and "report" not in phases  # from Python
    agg = run_audit(more, out, runtime=quiet, resume=True)
    after = {p: p.stat().st_mtime_ns for p in (out / "models").glob("*/outputs.npz")}
    assert all(after[p] == t for p, t in first.items())  # the old models untouched
    assert len(after) == 4 * 5  # (ce, focal) x (seed 0, 1) x (1 + 4) models
    assert (out / "results" / "ce" / "seed-0" / "metrics.json").read_bytes() == first_result
    assert [r.defense for r in agg.rows] == ["ce", "focal"] and agg.rows[0].seeds == [0, 1]
    # dropping work is refused
    with pytest.raises(ConfigError, match="may add seeds but not drop"):
        run_audit(
            ExperimentConfig.from_dict({**TINY_RAW, "seeds": [1], "defenses": ["ce", "focal"]}),
            out,
            runtime=quiet,
            resume=True,
        )


def test_two_identical_audits_write_byte_identical_metrics(tmp_path, quiet):
    config = ExperimentConfig.from_dict({**TINY_RAW, "defenses": ["ce", "ccel:alpha=0.5"]})
    run_audit(config, tmp_path / "a", runtime=quiet)
    run_audit(config, tmp_path / "b", runtime=quiet)
    for name in ("metrics.json", "table.csv", "results/ce/seed-0/metrics.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


# ------------------------------------------------------------------ structure
def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            found.add((node.module or "").split(".")[0])
            found.update(a.name for a in node.names if not node.module)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ccl"):
            found.add(node.module.split(".")[1] if "." in node.module else "")
    return found


CORE = ("losses", "attacks", "metrics", "signals", "theory", "bounds", "data", "models")
#: What the core must not import: training, the experiment's configuration, the pipeline and what renders it.
NOT_CORE = {"training", "stacked", "config", "audit", "run_dir", "cli", "report", "results", "summary", "tune"}


def test_the_core_imports_nothing_of_training_the_pipeline_or_the_report():
    for name in CORE:
        files = sorted((SRC / name).rglob("*.py")) if (SRC / name).is_dir() else [SRC / f"{name}.py"]
        for path in files:
            assert not _imports(path) & NOT_CORE, (path.relative_to(SRC), _imports(path) & NOT_CORE)


def test_the_engine_and_the_report_do_not_import_the_pipeline():
    policy = {"config", "audit", "run_dir", "cli", "report", "results"}
    for module in ("training.py", "stacked.py"):
        assert not _imports(SRC / module) & policy, module
    assert not _imports(SRC / "report.py") & {"audit", "config", "run_dir", "cli"}
    assert not _imports(SRC / "results.py") & {"audit", "config", "run_dir", "cli", "report"}


def test_the_engine_and_the_audit_import_no_defense_by_name():
    """A defense reaches the loop and the audit only through its procedure's hooks (`ccl._hooks`)."""
    defense_modules = {"defenses", "dp", "advreg", "distillation", "dpsgd", "early_stop", "hamp"}
    for module in ("training.py", "stacked.py", "audit/execute.py", "audit/plan.py", "audit/score.py"):
        assert not _imports(SRC / module) & defense_modules, module
    assert _imports(SRC / "_hooks.py") <= {"training"}  # the protocol: the recipe's type, for type checkers only


def test_the_cli_prints_ccl_errors_as_one_line_and_bugs_with_a_traceback(monkeypatch, capsys, tmp_path):
    assert cli.main(["compare", "--epochs", "0", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`epochs`" in err
    with pytest.raises(ConfigError):
        cli.main(["--debug", "compare", "--epochs", "0", "--out", str(tmp_path / "x")])

    def bug(*args, **kwargs):
        raise KeyError("a bug")

    import ccl.audit

    monkeypatch.setattr(ccl.audit, "run_audit", bug)
    with pytest.raises(KeyError):
        cli.main(["compare", "--dataset", "synthetic", "--out", str(tmp_path / "y"), "--quiet"])


def test_the_example_yaml_is_a_valid_configuration():
    example = Path(__file__).resolve().parents[1] / "examples" / "compare.yaml"
    args = cli.make_parser().parse_args(["compare", "--config", str(example)])
    config = cli.build_config(args)
    assert config.dataset == "digits" and [d.label for d in config.defenses][0] == "ce"
    assert config.train.epochs == 60 and cli.build_runtime(args).device == "auto"


def test_models_answer_perturbed_queries_only_when_a_label_only_attack_may_run(tmp_path, quiet):

    for attacks, expect in ((["loss", "lira"], False), (["loss", "label_only_augmentation"], True)):
        out = tmp_path / "-".join(attacks)
        run_audit(ExperimentConfig.from_dict({**TINY_RAW, "attacks": attacks}), out, runtime=quiet)
        for folder in (out / "models").glob("*/outputs.npz"):
            with np.load(folder) as f:
                assert ("augment_labels" in f.files) == expect
    (result,) = load_results(tmp_path / "loss-label_only_augmentation")
    assert "label_only_augmentation" in result.attacks and "label_only_augmentation" in result.evaluations["pooled"]


@pytest.mark.parametrize("name", ["purchase100", "texas100", "location30", "cifar10"])
def test_the_reproduction_configs_are_valid(name):
    example = Path(__file__).resolve().parents[1] / "examples" / f"{name}.yaml"
    args = cli.make_parser().parse_args(["compare", "--config", str(example)])
    config = cli.build_config(args)
    assert config.dataset == name and config.uses_leave_one_out
    families = {d.family for d in config.defenses}
    assert {"ce", "ccel", "relaxloss"} <= families and len(config.defenses) >= 7
    cli.build_runtime(args)  # its runtime: section, if any, is valid


def test_the_experiment_config_is_frozen_once_validated():
    import dataclasses

    config = ExperimentConfig.from_dict({**TINY_RAW, "seeds": 3, "fprs": [0.01, 0.001]})
    assert config.seeds == [3] and config.fprs == [0.001, 0.01]  # normalised by validation
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seeds = [1]
    assert dataclasses.replace(config, num_references=6).num_references == 6  # a changed copy is validated again
