"""The `ccl` command line: train, audit, compare, demo, report.

Thin by design: it parses flags, turns them into a layer of settings, lets `ccl.config.merge` apply the
precedence (defaults < the demo's settings or a resumed run's config.yaml < `--config` YAML < flags), and calls
the pipeline (`ccl.audit`). A `CclError` is printed as one line (exit 2); any other exception is a bug and shows
its traceback; `--debug` shows the traceback of every error. Run `ccl <command> --help` for examples.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
import textwrap
import threading
import warnings
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from ._malloc import tune_heap
from .config import ConfigError, ExperimentConfig, load_config, merge, parse_runtime, yaml_value
from .errors import CclError
from .layout import RunLayout
from .results import EVALUATIONS
from .training import Recipe, Runtime

__all__ = ["DEMO", "build_config", "build_runtime", "main"]

#: `ccl demo`: compare on scikit-learn's bundled digits, sized for a few minutes on a 2-core CPU.
DEMO: dict[str, Any] = {
    "dataset": "digits",
    "model": "mlp",
    "model_options": {"hidden": [256, 128]},
    # 15% of the 1,797 digits form the audit pool (135 members, 135 non-members per target), 5% (89 records) the
    # defender's reserve on which DP-SGD's recipe is chosen, the rest the population no model trains on. With few
    # training records the models overfit enough to leak measurably.
    "population_fraction": 0.8,
    "reserve_fraction": 0.05,
    "train": {
        "epochs": 40,
        "batch_size": 32,
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "constant",
    },
    # The frontier's families: the baseline, CCL at three alphas, RelaxLoss at two, and DP-SGD at epsilon 8 with
    # a recipe of its own (Poisson batches of about all 135 members, as DP-SGD favours large batches; 100 epochs,
    # plain SGD) and its learning rate chosen on the reserve. Sized to finish within 2 minutes here.
    "defenses": [
        "ce",
        "relaxloss:alpha=[0.5,1]",
        "ccel:alpha=[0.2,0.5,0.8]",
        "dpsgd:epsilon=8@batch_size=128,epochs=100,momentum=0.0,lr=[0.25,0.5,1.0]",
    ],
    "seeds": [0, 1, 2],
    # 12 reference models: with the target, 13 models, so the leave-one-out evaluation pools 13 x 135 = 1,755
    # non-member pairs per seed, enough to resolve TPR at 0.1% FPR
    "num_references": 12,
    # 20 out-of-distribution canaries per seed, each in half the models' training sets (the worst-case
    # evaluation). Mislabeled canaries are the paper's main choice, but 10 of them among a model's 135 records
    # cost 8 points of accuracy on this small task (89.4% -> 81.1%, seed 0); noise inputs cost about 1.
    "canaries": 20,
    "canary_kind": "ood",
    "bootstrap": 200,
}

EXAMPLES = {
    "train": """
        ccl train --dataset digits --loss ccel:alpha=0.5 --epochs 30 --out runs/train-digits
        ccl train --dataset cifar10 --model resnet18 --loss ce --epochs 100 --augment --out runs/r18
    """,
    "audit": """
        ccl audit --dataset digits --loss ce --num-references 16 --out runs/audit-ce
        ccl audit --config my-audit.yaml --resume --out runs/audit-ce      # continue an interrupted audit
        ccl audit --resume --num-references 32 --out runs/audit-ce         # more reference models, reusing the rest
    """,
    "compare": """
        ccl compare --dataset digits --defenses ce focal relaxloss:alpha=0.5 ccel:alpha=0.2 ccel:alpha=0.5 \\
            ccel:alpha=0.8 ccql --seeds 0 1 2 --out runs/compare-digits
        ccl compare --dataset cifar10 --model resnet18 --augment --epochs 100 --lr 0.1 --batch-size 256 \\
            --defenses ce ccel:alpha=0.5 relaxloss:alpha=1.0 --num-references 16 --out runs/cifar10   # GPU
    """,
    "demo": """
        ccl demo                      # writes runs/demo/report.html
        ccl demo --out runs/demo-seed0 --seeds 0
    """,
    "tune": """
        ccl tune --dataset digits --defense ccel --param alpha --range 0.05..1.0 --target "lira:tpr@0.01<=0.05" \\
            --num-references 8 --out runs/tune-ccel
        ccl tune --dataset digits --defense dpsgd --param epsilon --range 0.5..16 --target "auc<=0.55" --out runs/dp
    """,
    "report": """
        ccl report runs/compare-digits
    """,
}


def _min_effect(text: str) -> dict[str, Any]:
    """`auc=0.01,accuracy=1` to a mapping (checked by the config)."""
    return dict(_key_value(item) for item in text.split(",") if item.strip())


def _key_value(text: str) -> tuple[str, Any]:
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), yaml_value(value)
    except (yaml.YAMLError, RecursionError):
        raise argparse.ArgumentTypeError(f"cannot read the value of {text!r} (YAML syntax)") from None


#: Flags of the training recipe (`train:` in YAML) and of the runtime (`runtime:`), by argparse dest.
_RECIPE_FLAGS = (
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "augment",
    "precision",
)
_RUNTIME_FLAGS = ("device", "compile", "threads")
#: Top-level flags; the audit-only ones are not offered by `ccl train`.
_COMMON_FLAGS = ("dataset", "model", "defenses", "seeds", "population_fraction", "reserve_fraction")
_AUDIT_FLAGS = (
    "min_effect",
    "num_references",
    "attacks",
    "flip_queries",
    "bootstrap",
    "stacked",
    "canaries",
    "canary_kind",
    "target_members",
    "target_checkpoint",
    "target_logits",
)


_TRAIN_REFUSES = (
    "--seeds",
    "--num-references",
    "--attacks",
    "--flip-queries",
    "--bootstrap",
    "--stacked",
    "--cache-dir",
    "--canaries",
    "--canary-kind",
    "--leave-one-out",
    "--keep-checkpoints",
    "--leakage",
    "--executor",
    "--ray-address",
    "--cpus-per-model",
    "--gpus-per-model",
    "--ray-max-retries",
)


def _experiment_options(p: argparse.ArgumentParser, *, kind: str) -> None:
    """Every option of the experiment commands (`kind`: train, audit, compare, demo, tune), by group."""
    g = p.add_argument_group("experiment")
    g.add_argument("--config", type=Path, help="YAML file with any of the options below (flags override it)")
    _data_options(g)
    _defense_options(p, g, kind=kind)
    if kind != "train":
        _audit_options(g, kind=kind)
    _split_options(g)
    _recipe_options(p)
    _runtime_options(p)
    _output_options(p, kind=kind)


def _default(name: str) -> Any:
    """An `ExperimentConfig` field's default, for the help texts: spelled once, in the config."""
    f = next(f for f in dataclasses.fields(ExperimentConfig) if f.name == name)
    return f.default


def _data_options(g) -> None:
    g.add_argument(
        "--dataset",
        help="dataset name (see `ccl report --list`), a .npz file with X and y, a .csv/.parquet table (with "
        "--data-option label=COLUMN) or an image folder ending in / (one subfolder per class)",
    )
    g.add_argument(
        "--data-option",
        dest="dataset_options",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="dataset option, e.g. num_samples=2000 for synthetic (repeatable)",
    )
    g.add_argument("--model", help="architecture: mlp, cnn, resnet18, resnet34, densenet121, wrn")
    g.add_argument(
        "--model-option",
        dest="model_options",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="architecture option, e.g. hidden=[256,128] (repeatable)",
    )


def _defense_options(p: argparse.ArgumentParser, g, *, kind: str) -> None:
    """What is trained: one loss (train, audit), several defenses (compare, demo), or a defense to tune."""
    if kind == "tune":
        g.add_argument("--defense", required=True, help="the defense family to tune, e.g. ccel, relaxloss, dpsgd")
        g.add_argument("--param", required=True, help="its parameter to search, e.g. alpha or epsilon")
        g.add_argument("--range", required=True, help="the parameter's range LOW..HIGH, e.g. 0.05..1.0")
        g.add_argument("--target", required=True, help="[ATTACK:]METRIC<=VALUE, e.g. lira:tpr@0.01<=0.05 or auc<=0.6")
        g.add_argument(
            "--defense-option",
            action="append",
            type=_key_value,
            metavar="KEY=VALUE",
            help="a fixed parameter of the defense (repeatable)",
        )
        g.add_argument("--steps", type=int, default=4, help="bisection steps (default: 4)")
        g.add_argument("--grid", type=int, default=5, help="grid points when the range's ends agree (default: 5)")
    elif kind in ("train", "audit"):
        g.add_argument(
            "--loss",
            dest="defenses",
            action="append",
            metavar="SPEC",
            help="the training loss, e.g. ce, ccel:alpha=0.5, relaxloss:alpha=1.0 (default: ce; once)",
        )
    else:
        g.add_argument(
            "--defenses",
            nargs="+",
            metavar="SPEC",
            help="losses to compare, e.g. ce focal ccel:alpha=0.2 ccel:alpha=0.8 ccql",
        )
    if kind == "train":
        for flag in _TRAIN_REFUSES:  # audit options: refused with a clear message, not silently ignored
            p.add_argument(flag, dest="audit_only_" + flag[2:].replace("-", "_"), nargs="*", help=argparse.SUPPRESS)
        g.add_argument(
            "--seed",
            dest="seeds",
            type=lambda s: [int(s)],
            metavar="SEED",
            help="the seed of the split and the model (default: 0)",
        )


def _audit_options(g, *, kind: str) -> None:
    """Seeds, reference models, attacks, canaries and the evaluations (every command but `train`)."""
    g.add_argument("--seeds", nargs="+", type=int, help="seeds (each draws its own split and models; default: 0)")
    g.add_argument(
        "--num-references",
        type=int,
        help=f"reference models per target, same recipe (default: {_default('num_references')})",
    )
    g.add_argument("--attacks", nargs="+", help="attacks to run (default: all the setup supports)")
    g.add_argument(
        "--flip-queries",
        action="store_true",
        default=None,
        help="also query the flipped image (images only); default: no augmentation at query time",
    )
    if kind == "audit":
        g.add_argument(
            "--target-members",
            help="a model trained elsewhere: its members (.npy of indices or a boolean mask over the dataset)",
        )
        g.add_argument(
            "--target-checkpoint",
            help="... and its weights for --model (a state dict, loaded with weights_only=True, or .safetensors)",
        )
        g.add_argument("--target-logits", help="... or its outputs on every record of the dataset, (N, C) .npy")
    g.add_argument(
        "--canaries",
        type=int,
        help="canary records added to the audit pool, each in half the models; reported separately (even; "
        f"default: {_default('canaries')})",
    )
    g.add_argument("--canary-kind", choices=["mislabeled", "ood"], help=f"default: {_default('canary_kind')}")
    g.add_argument(
        "--leave-one-out",
        choices=["auto", "on", "off"],
        help="also evaluate every model as the target, pooled (default auto: with at least 4 reference models)",
    )
    g.add_argument(
        "--bootstrap",
        type=int,
        help=f"bootstrap resamples for confidence intervals (default: {_default('bootstrap')})",
    )
    g.add_argument(
        "--min-effect",
        type=_min_effect,
        metavar="KEY=VALUE,...",
        help="the smallest change against ce that a verdict counts, e.g. auc=0.01,accuracy=1 (accuracy and tpr in "
        "points; default auc=0.01,accuracy=1,tpr=1); changes only the summary",
    )
    g.add_argument(
        "--stacked",
        choices=["auto", "on", "off"],
        help="train reference models stacked with torch.func (default auto: on for mlp, off for "
        "convolutional models; part of the recipe)",
    )


def _split_options(g) -> None:
    g.add_argument(
        "--population-fraction",
        type=float,
        help=f"share of records no model trains on (default: {_default('population_fraction')})",
    )
    g.add_argument(
        "--reserve-fraction",
        type=float,
        help="share of records kept for the defenses that learn from non-audited data (advreg, distillation, "
        "early_stop:patience): never audited, never queried (default: 0.2 when such a defense is run, else 0)",
    )
    g.add_argument(
        "--standardize",
        choices=["auto", "on", "off"],
        help="tabular features to mean 0, variance 1, with statistics of the audit pool (default auto: "
        "on for your own .npz files, off for the registered datasets)",
    )


def _recipe_options(p: argparse.ArgumentParser) -> None:
    """The training recipe's flags, built from `ccl.training.Recipe`'s fields: their types, defaults, choices and
    help are spelled once, there."""
    t = p.add_argument_group("training recipe (YAML: train:)")
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    for name in _RECIPE_FLAGS:
        f = fields[name]
        flag, meta = "--" + name.replace("_", "-"), f.metadata
        if isinstance(f.default, bool):
            t.add_argument(flag, action="store_true", default=None, help=meta.get("help"))
        elif "choices" in meta:
            default = f"default {f.default}" + (f": {meta['help']}" if "help" in meta else "")
            t.add_argument(flag, choices=list(meta["choices"]), help=default)
        else:
            t.add_argument(flag, type=type(f.default), help=f"{meta['help']} (default: {f.default:g})")


def _runtime_options(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("runtime (YAML: runtime:; never changes a result's recipe)")
    r.add_argument("--device", help="auto, cpu, cuda, cuda:1, ... (default: auto)")
    r.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    r.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    r.add_argument(
        "--data-dir", type=Path, help="where downloaded datasets are cached (default $CCL_DATA_DIR or ~/.cache/ccl)"
    )
    r.add_argument("--quiet", action="store_true", help="no progress bars")


def _output_options(p: argparse.ArgumentParser, *, kind: str) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, help="run directory (never overwritten; see --resume)")
    o.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its config.yaml; flags may add seeds, defenses, reference "
        "models and attacks, or change runtime options",
    )
    if kind != "train":
        o.add_argument(
            "--yes",
            action="store_true",
            help=f"start a run of more than {CONFIRM_MODELS:,} models (without it, such a run is refused)",
        )
        o.add_argument("--cache-dir", type=Path, help="trained-model cache shared across runs (default: OUT/models)")
        x = p.add_argument_group("executor (YAML: runtime:)")
        x.add_argument("--executor", choices=["local", "ray"], help="where the models train (default: local)")
        x.add_argument(
            "--ray-address",
            help="a Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: start a local Ray instance)",
        )
        x.add_argument("--cpus-per-model", type=float, help="CPUs per Ray task (default: 1)")
        x.add_argument("--gpus-per-model", type=float, help="GPUs per model, fractions share a GPU (default: 0)")
        x.add_argument("--ray-max-retries", type=int, help="retries of a task whose worker died (default: 2)")
        o.add_argument(
            "--leakage",
            choices=["tpr", "auc", "epsilon_lb"],
            help="the report's frontier leakage axis (default tpr: TPR at the lowest resolvable FPR)",
        )
        o.add_argument(
            "--keep-checkpoints",
            action="store_true",
            help="keep reference models' checkpoints (default: deleted once their outputs are stored; "
            "the target's is always kept)",
        )


def flag_layer(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the flags given on the command line set (None: not given), as a layer for `merge`."""
    layer: dict[str, Any] = {}
    for key in _COMMON_FLAGS + _AUDIT_FLAGS:
        if getattr(args, key, None) is not None:
            layer[key] = getattr(args, key)
    if getattr(args, "leave_one_out", None) is not None:
        layer["leave_one_out"] = {"on": True, "off": False}.get(args.leave_one_out, args.leave_one_out)
    if getattr(args, "standardize", None) is not None:
        layer["standardize"] = {"on": True, "off": False}.get(args.standardize, args.standardize)
    for key in ("dataset_options", "model_options"):
        if getattr(args, key, None):
            layer[key] = dict(args.dataset_options if key == "dataset_options" else args.model_options)
    train = {k: getattr(args, k) for k in _RECIPE_FLAGS if getattr(args, k, None) is not None}
    if train:
        layer["train"] = train
    return layer


def _config_file(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(experiment settings, the whole `runtime:` section) of the `--config` file, read once per command."""
    if getattr(args, "config", None) is None:
        return {}, {}
    if getattr(args, "_config_file", None) is None:
        raw = load_config(args.config)
        runtime = raw.pop("runtime", None) or {}
        if not isinstance(runtime, dict):
            raise ConfigError(f"{args.config}: 'runtime:' must be a mapping (device, threads, ...).")
        args._config_file = (raw, runtime)
    raw, runtime = args._config_file
    return dict(raw), dict(runtime)


def _file_layers(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """(experiment settings, the training runtime's settings) of the `--config` file."""
    raw, runtime = _config_file(args)
    return raw, {k: v for k, v in runtime.items() if k not in _EXECUTOR_KEYS}


#: `runtime:` keys of the executor (not of the training `Runtime`): where the models train.
_EXECUTOR_KEYS = ("executor", "ray_address", "cpus_per_model", "gpus_per_model", "ray_max_retries")


def build_executor(args: argparse.Namespace):
    """The executor the flags (over the YAML `runtime:` keys) ask for: None (local) or a connected Ray one."""
    settings = {k: v for k, v in _config_file(args)[1].items() if k in _EXECUTOR_KEYS}
    for key in _EXECUTOR_KEYS:
        if getattr(args, key, None) is not None:
            settings[key] = getattr(args, key)
    kind = settings.pop("executor", "local")
    if kind not in ("local", "ray"):
        raise ConfigError(f"--executor {kind!r}: expected local or ray.")
    if kind == "local":
        if settings:
            raise ConfigError(f"{', '.join('--' + k.replace('_', '-') for k in settings)} need --executor ray.")
        return None
    from .audit.ray_executor import RayExecutor

    executor = RayExecutor(
        address=settings.get("ray_address"),
        cpus_per_model=float(settings.get("cpus_per_model", 1)),
        gpus_per_model=float(settings.get("gpus_per_model", 0)),
        max_retries=int(settings.get("ray_max_retries", 2)),
    )
    executor.connect()  # an unreachable cluster fails now, before the run directory exists
    return executor


def build_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> ExperimentConfig:
    """Defaults < `base` (e.g. the demo's settings) < the YAML file < the flags given."""
    file_raw, _ = _file_layers(args)
    return ExperimentConfig.from_dict(merge(base, file_raw, flag_layer(args)))


def build_runtime(args: argparse.Namespace) -> Runtime:
    _, file_runtime = _file_layers(args)
    flags = {k: getattr(args, k) for k in _RUNTIME_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "quiet", False):
        flags["progress"] = False
    return parse_runtime(merge({"runtime": file_runtime}, {"runtime": flags})["runtime"])


def _resolve(args: argparse.Namespace, default_out: str, base: dict[str, Any] | None = None):
    """(config, runtime, out): a new run's config from the layers, or a resumed run's from its config.yaml."""
    from .run_dir import RunDirectory

    out = args.out or Path(default_out)
    runtime = build_runtime(args)
    if args.resume:
        file_raw, _ = _file_layers(args)
        rd = RunDirectory(out)
        rd.check_target(resume=True)
        config = rd.resume_config(file_raw, flag_layer(args))
    else:
        config = build_config(args, base)
    return config, runtime, out


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`), raised where SIGINT raises KeyboardInterrupt: the same clean stop and
    resume hint, and exit status 143 (128 + 15)."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


def _exit_status(err: KeyboardInterrupt) -> int:
    return 143 if isinstance(err, Terminated) else 130


def _interrupted(command: str, out: Path, err: KeyboardInterrupt) -> int:
    print(
        f"\n{'Terminated' if isinstance(err, Terminated) else 'Interrupted'}. Completed models and results are kept "
        f"in {out}; continue with:\n  ccl {command} --resume --out {out}",
        file=sys.stderr,
    )
    return _exit_status(err)


#: A run that would train more models than this needs --yes (a 10,000-point sweep is ~30,000 models).
CONFIRM_MODELS = 1_000


def _confirm_size(args: argparse.Namespace, config: ExperimentConfig, *, settings: int | None = None) -> None:
    """Prints how many models the run trains (at most: cached ones are reused) and refuses more than
    `CONFIRM_MODELS` without --yes. `settings`: the defense settings (default: the config's)."""
    from .audit.pipeline import models_per_setting

    scale = 1 if settings is None else settings  # ccl tune: its one family at up to `settings` points
    settings = len(config.defenses) if settings is None else settings
    supplied = 1 if config.supplied_target else 0
    counts = [(models_per_setting(config, d) - supplied, _epochs_of(config, d)) for d in config.defenses]
    models = scale * len(config.seeds) * sum(n for n, _ in counts)
    model_epochs = scale * len(config.seeds) * sum(n * e for n, e in counts)
    per = "+".join(sorted({str(n) for n, _ in counts}))  # a defense whose recipe is chosen trains its candidates too
    plan = (
        f"{models:,} models ({settings} defense setting(s) x {len(config.seeds)} seed(s) x {per} model(s)): "
        f"{model_epochs:,} model-epochs of training"
    )
    if models > CONFIRM_MODELS and not getattr(args, "yes", False):
        raise ConfigError(
            f"This run would train up to {plan}; above {CONFIRM_MODELS:,} models add --yes to start it (or sweep "
            "fewer points, seeds or reference models)."
        )
    if not getattr(args, "quiet", False):
        print(f"Plan: up to {plan} (cached models are reused).")


def _epochs_of(config: ExperimentConfig, defense) -> int:
    """The most epochs a model of `defense` trains (its own recipe's, or its candidates' longest)."""
    return max(c.recipe(config.train).epochs for c in defense.candidates())


def _run_audit(args: argparse.Namespace, default_out: str, base: dict[str, Any] | None = None) -> int:
    from .audit import run_audit
    from .audit.preflight import check_dependencies
    from .report import render_report
    from .results import table_lines
    from .run_dir import RunDirectory
    from .summary import load_summary, summary_lines
    from .timing import PhaseTimer, phase

    timer = PhaseTimer()  # the command's phases, into run.json and the last line printed
    config, runtime, out = _resolve(args, default_out, base)
    if args.command == "audit" and len(config.defenses) != 1:
        raise ConfigError("`ccl audit` audits one training recipe: give one --loss (use `ccl compare` for more).")
    _confirm_size(args, config)
    check_dependencies("report")  # the report is drawn at the end: fail now, not after training
    executor = build_executor(args)
    try:
        with timer.activate():
            agg = run_audit(
                config,
                out,
                runtime=runtime,
                resume=args.resume,
                cache_dir=args.cache_dir,
                data_dir=args.data_dir,
                keep_checkpoints=args.keep_checkpoints,
                executor=executor,
                command=["ccl", *sys.argv[1:]],
            )
    except KeyboardInterrupt as err:
        return _interrupted(args.command, out, err)
    finally:
        if executor is not None:
            executor.close()
    with timer.activate(), phase("report"):
        report = render_report(out, leakage=args.leakage or "tpr")
    RunDirectory(out).record_timing(timer)
    print("\n".join(table_lines(agg)))
    summary = load_summary(out)
    if summary is not None:
        print("\n" + "\n".join(summary_lines(summary)))
    print(f"\nReport: {report}")
    print(timer.line())
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .audit import run_train

    given = [k[len("audit_only_") :] for k, v in vars(args).items() if k.startswith("audit_only_") and v is not None]
    if given:
        raise ConfigError(
            f"--{given[0].replace('_', '-')} is an option of `ccl audit`/`ccl compare`; `ccl train` trains one model "
            "and attacks nothing (use --seed for its seed)."
        )
    config, runtime, out = _resolve(args, "runs/train", {"num_references": 0})
    try:
        result = run_train(
            config, out, runtime=runtime, resume=args.resume, data_dir=args.data_dir, command=["ccl", *sys.argv[1:]]
        )
    except KeyboardInterrupt as err:
        print(
            f"\n{'Terminated' if isinstance(err, Terminated) else 'Interrupted'}; the last epoch's checkpoint is "
            f"kept. Continue with: ccl train --resume --out {out}",
            file=sys.stderr,
        )
        return _exit_status(err)
    last = result.history[-1]
    print(
        f"train acc {100 * last['member_acc']:.1f}%  held-out acc {100 * last.get('heldout_acc', float('nan')):.1f}%"
        f"  member loss var {last['member_loss_var']:.4g}\nRun directory: {out}"
    )
    return 0


def _tune_range(text: str) -> tuple[float, float] | tuple[int, int]:
    """`--range LOW..HIGH` as numbers (integers when both ends are whole numbers, e.g. epochs)."""
    low, _, high = text.partition("..")
    try:
        low_v, high_v = float(low), float(high)
        if all(t.strip().lstrip("-").isdigit() for t in (low, high)):  # e.g. epochs: whole-number settings
            low_v, high_v = int(low), int(high)
    except ValueError:
        raise ConfigError(f"--range {text!r}: expected LOW..HIGH, e.g. 0.05..1.0.") from None
    if not low_v < high_v:
        raise ConfigError(f"--range {text!r}: LOW must be below HIGH.")
    return low_v, high_v


def _tune_cost(config, points: list) -> tuple[int, int]:
    """`ccl tune`'s models per (setting, seed), with the candidates of a recipe choice, and in all."""
    from .audit.pipeline import models_per_setting

    per = models_per_setting(config, config.defenses[0])
    return per, len(points) * len(config.seeds) * per


def _print_tune(args: argparse.Namespace, target, bounds: tuple, chosen, points: list, config) -> None:
    """`ccl tune`'s table of the settings tried, its choice and its cost."""
    per, models = _tune_cost(config, points)
    print(f"Target: {args.target} (the leakage's upper 95% bound must meet it); settings by {args.param}:")
    print(f"{'setting':28s} {'test acc':>9s} {'leakage':>9s} {'upper':>9s}  attack  meets {args.target}")
    for p in sorted(points, key=lambda p: p.value):
        print(
            f"{p.defense:28s} {100 * p.accuracy:8.1f}% {p.leakage:9.4f} {p.upper:9.4f}  {p.attack:6s}  "
            f"{'yes' if p.meets(target) else 'no'}"
        )
    below = [p.defense for p in points if target.metric == "auc" and p.leakage < 0.5]
    if below:
        print(
            f"\nThe attack did worse than chance (AUC below 0.5) against {', '.join(below)}: its calibration failed "
            "there (often too few reference models), so meeting the target says little about those settings."
        )
    if chosen is None:
        print(f"\nNo setting in [{bounds[0]}, {bounds[1]}] meets {args.target}: widen --range or relax the target.")
    else:
        print(
            f"\nChosen: {chosen.defense} (test accuracy {100 * chosen.accuracy:.1f}%, {target.metric} upper bound "
            f"{chosen.upper:.4g} <= {target.bound:g})."
        )
    print(
        f"Cost: {len(points)} settings x {len(config.seeds)} seed(s) x {per} models = {models} "
        "models (cached ones reused)."
    )


def _cmd_tune(args: argparse.Namespace) -> int:
    """Bisection over one parameter of one defense; every setting is a defense of one resumable run."""
    from ._io import write_json
    from .audit import run_audit
    from .audit.preflight import check_dependencies
    from .config import parse_defense
    from .report import render_report
    from .summary import load_summary, summary_lines
    from .tune import check_target, parse_target, point_from_aggregate, search

    target = parse_target(args.target)
    low_v, high_v = _tune_range(args.range)
    fixed = dict(kv for kv in (args.defense_option or []))

    def spec(value: float) -> str:
        return args.defense + ":" + ",".join(f"{k}={v}" for k, v in {**fixed, args.param: value}.items())

    for v in (low_v, high_v):
        parse_defense(spec(v))  # a bad family, parameter or range end fails now, before any training
    args.defenses = None if args.resume else [spec(low_v)]
    config, runtime, out = _resolve(args, "runs/tune")
    check_target(target, config)  # an attack or FPR the run cannot measure fails before any training
    _confirm_size(args, config, settings=max(2 + args.steps, args.grid))  # the most settings the search tries
    check_dependencies("report")
    executor = build_executor(args)
    resume = args.resume

    def evaluate(values: list[float]):
        nonlocal resume, config
        defenses = list(config.defenses) if resume else []
        labels = {d.label for d in defenses}
        defenses += [d for d in (parse_defense(spec(v)) for v in values) if d.label not in labels]
        config = ExperimentConfig.from_dict({**config.to_dict(), "defenses": defenses})
        agg = run_audit(
            config,
            out,
            runtime=runtime,
            resume=resume,
            cache_dir=args.cache_dir,
            data_dir=args.data_dir,
            executor=executor,
            command=["ccl", *sys.argv[1:]],
        )
        resume = True
        return [point_from_aggregate(agg, parse_defense(spec(v)).label, v, target) for v in values]

    try:
        integer = isinstance(low_v, int)
        chosen, points = search(evaluate, low_v, high_v, target, steps=args.steps, grid=args.grid, integer=integer)
    except KeyboardInterrupt as err:
        return _interrupted("tune", out, err)
    _, models = _tune_cost(config, points)
    _print_tune(args, target, (low_v, high_v), chosen, points, config)
    write_json(
        RunLayout(out).tune,
        {
            "target": args.target,
            "param": args.param,
            "range": [low_v, high_v],
            "chosen": None if chosen is None else vars(chosen),
            "points": [vars(p) for p in points],
            "models": models,
        },
    )
    render_report(out)
    summary = load_summary(out)
    if summary is not None:
        print("\n" + "\n".join(summary_lines(summary)))
    print(f"Evidence: {RunLayout(out).tune}\nReport: {RunLayout(out).report}")
    return 0 if chosen is not None else 1


def _cmd_audit(args: argparse.Namespace) -> int:
    return _run_audit(args, "runs/audit")


def _cmd_compare(args: argparse.Namespace) -> int:
    return _run_audit(args, "runs/compare")


def _cmd_demo(args: argparse.Namespace) -> int:
    return _run_audit(args, "runs/demo", DEMO)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import render_report, unfinished_note
    from .results import load_aggregate, table_lines

    if args.list:
        _print_registries()
        return 0
    if args.run_dir is None:
        raise ConfigError("Give the run directory: ccl report RUN_DIR")
    if args.format != "html":  # for pipelines: print the aggregate, render nothing
        print(_export(args.run_dir, args.format, args.evaluation), end="")
        return 0
    path = render_report(args.run_dir, leakage=args.leakage)
    if RunLayout(args.run_dir).aggregate.exists():
        print("\n".join(table_lines(load_aggregate(args.run_dir))))
    unfinished = unfinished_note(args.run_dir)
    if unfinished is not None:  # the page says it too, at its top
        print(f"ccl report: warning: {unfinished}", file=sys.stderr)
    print(f"\nReport: {path}")
    return 0


def _export(run_dir: Path, fmt: str, evaluation: str) -> str:
    """A run's results as JSON, CSV or Markdown: every evaluation the run has (with the run's summary in JSON
    and Markdown), or only `evaluation`."""
    from ._io import dumps_json
    from .results import evaluation_json, load_aggregate, table_csv, table_markdown
    from .summary import load_summary, summary_lines

    agg = load_aggregate(run_dir)
    if evaluation != "all" and evaluation not in agg.evaluations:
        raise ConfigError(
            f"This run has no {evaluation!r} evaluation; it has: {', '.join(agg.evaluations)} (--evaluation)."
        )
    chosen = None if evaluation == "all" else [evaluation]
    summary = load_summary(run_dir)
    if fmt == "json":
        raw = agg.to_dict() if chosen is None else evaluation_json(agg, evaluation)
        return dumps_json(raw | ({"summary": summary.to_dict()} if summary is not None and chosen is None else {}))
    if fmt == "csv":
        return table_csv(agg, evaluations=chosen)
    bullets = [] if summary is None or chosen is not None else [f"- {line.strip()}" for line in summary_lines(summary)]
    lines = ["## Summary", "", *bullets, ""] if bullets else []
    return "\n".join(lines) + ("\n" if lines else "") + table_markdown(agg, evaluations=chosen)


def _print_registries() -> None:
    from . import attacks, data, defenses, models
    from .training import recipe_text

    for title, registry in (
        ("datasets", data),
        ("models", models),
        ("defenses (the losses of ccl.losses, and training procedures)", defenses),
        ("attacks", attacks),
    ):
        print(f"{title}:")
        for name in registry.available():
            doc, params = registry.describe(name)
            shown = ", ".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in params.items())
            print(f"  {name:20s} {doc}" + (f"\n  {'':20s} parameters: {shown}" if shown else ""))
            if registry is defenses and defenses.default_recipe(name):  # its own recipe when its entry gives none
                own = recipe_text(defenses.default_recipe(name))
                print(f"  {'':20s} default recipe: @{own} (a list: chosen on the reserve)")
            if registry is data:  # what a model trained elsewhere must have been trained on
                text = f"preprocessing: {data.preprocessing(name)}"
                indent = dict(initial_indent=" " * 23, subsequent_indent=" " * 25)
                print(textwrap.fill(text, 118, break_on_hyphens=False, **indent))
        print()
    print(
        "A defense is NAME or NAME:key=value,... e.g. ccel:alpha=0.5,beta=1 (see README for the formulas), and may\n"
        "train with a recipe of its own after '@', e.g. dpsgd:epsilon=8@batch_size=128,lr=[0.25,0.5,1]: a list is\n"
        "chosen for accuracy on the defender's reserve before the reference models train."
    )


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccl",
        description="Train classifiers that leak less, and measure how much they leak.",
        epilog="Run `ccl COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"ccl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    sub = parser.add_subparsers(dest="command", required=True)
    specs = {
        "train": ("train one model with a loss on a dataset", _cmd_train),
        "tune": ("find a defense's setting with the best accuracy whose leakage meets a target", _cmd_tune),
        "audit": ("train a target and reference models with one recipe, run every attack", _cmd_audit),
        "compare": ("compare defenses x seeds on the privacy-utility trade-off", _cmd_compare),
        "demo": ("`compare` on the bundled digits data, in a few minutes on a laptop CPU", _cmd_demo),
    }
    for name, (help_, func) in specs.items():
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="examples:\n" + textwrap.dedent(EXAMPLES[name]),
        )
        _experiment_options(p, kind=name)
        p.set_defaults(func=func)
    p = sub.add_parser(
        "report",
        help="render the report of a run directory again",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + textwrap.dedent(EXAMPLES["report"]),
    )
    p.add_argument("run_dir", type=Path, nargs="?")
    p.add_argument("--list", action="store_true", help="list the datasets, models, losses and attacks")
    p.add_argument(
        "--format",
        choices=["html", "json", "csv", "md"],
        default="html",
        help="html: render report.html (default); json/csv/md: print the results to stdout, each number labelled "
        "with its evaluation",
    )
    p.add_argument(
        "--evaluation",
        choices=["all", *EVALUATIONS],
        default="all",
        help="with --format json/csv/md: export one evaluation only (target: the single target against its "
        "reference models; pooled: every model as the target, random records; canaries; vulnerable_1pct/5pct: "
        "the most vulnerable records); default all",
    )
    p.add_argument(
        "--leakage",
        choices=["tpr", "auc", "epsilon_lb"],
        default="tpr",
        help="the frontier's leakage axis: TPR at the lowest resolvable FPR (default), AUC, or the epsilon lower bound",
    )
    p.set_defaults(func=_cmd_report)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """One line per warning, no source excerpt; on a line of its own when a progress bar is on screen (the bar
    ends with a carriage return, not a newline, so the warning would be glued to it)."""
    return ("\n" if _progress_bar_open() else "") + f"ccl: warning: {message}\n"


def _progress_bar_open() -> bool:
    try:
        from tqdm import tqdm
    except ImportError:
        return False
    return any(not getattr(bar, "disable", True) for bar in list(getattr(tqdm, "_instances", ())))


def main(argv: list[str] | None = None) -> int:
    if os.getcwd() not in sys.path:  # `--model my_module:build` finds modules of the working directory
        sys.path.insert(0, os.getcwd())
    parser = make_parser()
    args = parser.parse_args(argv)
    tune_heap()  # freed tensors back to the heap, not to the system: see ccl._malloc
    formatwarning = warnings.formatwarning
    on_main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    sigterm = signal.signal(signal.SIGTERM, _on_sigterm) if on_main else None
    if not args.debug:  # one line per warning, no source excerpt, never glued to a progress bar
        warnings.formatwarning = _format_warning
    try:
        return args.func(args)
    except CclError as err:
        if args.debug:
            raise
        print(f"ccl {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Terminated:  # before any work was kept (the commands catch it once the run directory exists)
        print(f"ccl {args.command}: terminated.", file=sys.stderr)
        return 143
    finally:
        warnings.formatwarning = formatwarning
        if on_main:
            signal.signal(signal.SIGTERM, sigterm if sigterm is not None else signal.SIG_DFL)


if __name__ == "__main__":
    raise SystemExit(main())
