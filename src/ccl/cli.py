"""The `ccl` command line: train, audit, compare, demo, report.

Every option can also come from a YAML file (`--config`); flags given on the command line win over the file,
and the file wins over the defaults. Run `ccl <command> --help` for examples.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from . import __version__
from .config import ConfigError, ExperimentConfig, load_config

__all__ = ["DEMO", "build_config", "main"]

#: `ccl demo`: compare on scikit-learn's bundled digits, sized for a few minutes on a 2-core CPU.
DEMO: dict[str, Any] = {
    "dataset": "digits",
    "model": "mlp",
    "model_options": {"hidden": [256, 128]},
    # 15% of the 1,797 digits form the audit pool (135 members, 135 non-members per target); the rest is the
    # population no model trains on. With fewer training records the models overfit enough to leak
    # measurably: the loss attack's AUC against CE is 0.63 (mean of seeds 0-2).
    "population_fraction": 0.85,
    "train": {
        "epochs": 60,
        "batch_size": 32,
        "optimizer": "sgd",
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "schedule": "constant",
    },
    "defenses": [
        "ce",
        "focal:gamma=2",
        "label_smoothing",
        "confidence_penalty",
        "relaxloss:alpha=0.5",
        "ccel:alpha=0.2",
        "ccel:alpha=0.5",
        "ccel:alpha=0.8",
        "ccql:alpha=0.5",
    ],
    "seeds": [0, 1, 2],
    "num_references": 16,
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
    "report": """
        ccl report runs/compare-digits
    """,
}


def _key_value(text: str) -> tuple[str, Any]:
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def _experiment_options(p: argparse.ArgumentParser, *, defenses: str) -> None:
    g = p.add_argument_group("experiment")
    g.add_argument("--config", type=Path, help="YAML file with any of the options below (flags override it)")
    g.add_argument("--dataset", help="dataset name (see `ccl report --list`) or a .npz file with X and y")
    g.add_argument(
        "--data-option",
        dest="dataset_options",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="dataset option, e.g. num_samples=2000 for synthetic (repeatable)",
    )
    g.add_argument("--data-dir", help="where downloaded datasets are cached (default $CCL_DATA_DIR or ~/.cache/ccl)")
    g.add_argument("--model", help="architecture: mlp, cnn, resnet18, resnet34, densenet121, wrn")
    g.add_argument(
        "--model-option",
        dest="model_options",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="architecture option, e.g. hidden=[256,128] (repeatable)",
    )
    if defenses == "one":
        g.add_argument(
            "--loss",
            dest="defenses",
            type=lambda s: [s],
            metavar="SPEC",
            help="the training loss, e.g. ce, ccel:alpha=0.5, relaxloss:alpha=1.0",
        )
    else:
        g.add_argument(
            "--defenses",
            nargs="+",
            metavar="SPEC",
            help="losses to compare, e.g. ce focal ccel:alpha=0.2 ccel:alpha=0.8 ccql",
        )
    g.add_argument("--seeds", nargs="+", type=int, help="seeds (each draws its own split and models)")
    if defenses != "train":
        g.add_argument("--num-references", type=int, help="reference models per target (same recipe)")
        g.add_argument("--attacks", nargs="+", help="attacks to run (default: all the setup supports)")
        g.add_argument(
            "--flip-queries",
            action="store_true",
            default=None,
            help="also query the flipped image (images only); off: no augmentation at query time",
        )
        g.add_argument("--bootstrap", type=int, help="bootstrap resamples for confidence intervals (0: none)")
        g.add_argument(
            "--stacked",
            choices=["auto", "on", "off"],
            help="train reference models stacked with torch.func (auto: measured, the faster path)",
        )
    g.add_argument("--population-fraction", type=float, help="share of records no model trains on")
    t = p.add_argument_group("training recipe")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    t.add_argument("--lr", type=float)
    t.add_argument("--momentum", type=float)
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--schedule", choices=["constant", "multistep", "cosine"])
    t.add_argument("--augment", action="store_true", default=None, help="random crop + flip while training (images)")
    t.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    t.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, help="run directory (never overwritten; see --resume)")
    o.add_argument("--resume", action="store_true", help="continue the run in --out, reusing what it holds")
    o.add_argument("--cache-dir", type=Path, help="trained-model cache shared across runs (default: OUT/models)")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


_TRAIN_FLAGS = (
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "schedule",
    "augment",
    "device",
    "precision",
    "compile",
)
_TOP_FLAGS = (
    "dataset",
    "model",
    "defenses",
    "seeds",
    "num_references",
    "attacks",
    "flip_queries",
    "bootstrap",
    "stacked",
    "population_fraction",
)


def build_config(args: argparse.Namespace, base: dict[str, Any] | None = None) -> ExperimentConfig:
    """Defaults, then `base` (e.g. the demo's settings), then the YAML file, then the flags given."""
    raw: dict[str, Any] = dict(base or {})
    raw["train"] = dict(raw.get("train", {}))
    if getattr(args, "config", None) is not None:
        file_raw = load_config(args.config)
        train_file = file_raw.pop("train", {}) or {}
        raw.update(file_raw)
        if isinstance(train_file, dict):
            raw["train"].update(train_file)
        else:
            raw["train"] = train_file
    for key in _TOP_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            raw[key] = value
    for key in ("dataset_options", "model_options"):
        pairs = getattr(args, key, None)
        if pairs:
            raw[key] = {**raw.get(key, {}), **dict(pairs)}
    for key in _TRAIN_FLAGS:
        value = getattr(args, key, None)
        if value is not None:
            raw["train"][key] = value
    if getattr(args, "quiet", False):
        raw["train"]["progress"] = False
    return ExperimentConfig.from_dict(raw)


def _run_experiment(args: argparse.Namespace, config: ExperimentConfig, default_out: str) -> int:
    from .experiment import run_experiment
    from .report import render_report

    out = args.out or Path(default_out)
    if args.resume and (out / "config.yaml").exists() and args.config is None and _given_only_resume_flags(args):
        saved = load_config(out / "config.yaml")
        if args.num_references is not None:
            saved["num_references"] = args.num_references
        config = ExperimentConfig.from_dict(saved)
    try:
        run_experiment(config, out, resume=args.resume, cache_dir=args.cache_dir, progress=not args.quiet)
    except KeyboardInterrupt:
        print(
            f"\nInterrupted. Completed models and results are kept in {out}; continue with:\n"
            f"  ccl {args.command} --resume --out {out}",
            file=sys.stderr,
        )
        return 130
    report = render_report(out)
    _print_table(out)
    print(f"\nReport: {report}")
    return 0


def _given_only_resume_flags(args: argparse.Namespace) -> bool:
    """True when no experiment option but --num-references was given: resume the saved config as it is."""
    keys = [k for k in _TOP_FLAGS if k != "num_references"] + list(_TRAIN_FLAGS) + ["dataset_options", "model_options"]
    return all(getattr(args, k, None) in (None, []) for k in keys)


def _print_table(out: Path) -> None:
    import json

    rows = json.loads((out / "metrics.json").read_text())["rows"]
    attacks = [a for a in ("loss", "lira", "rmia") if a in rows[0]["attacks"]]
    header = f"{'defense':24s} {'test acc':>9s}" + "".join(f" {a + ' AUC':>10s} {a + ' TPR@1%':>12s}" for a in attacks)
    print(header)
    for r in rows:
        line = f"{r['defense']:24s} {100 * r['test_acc']:8.1f}%"
        for a in attacks:
            e = r["attacks"][a]
            tpr = e["tpr@0.01"]
            line += f" {e['auc']:10.3f} {'n/a' if tpr != tpr else f'{100 * tpr:.1f}%':>12s}"
        print(line)


def _cmd_train(args: argparse.Namespace) -> int:
    from . import data
    from ._io import write_json
    from .experiment import load_dataset
    from .run_dir import prepare_run_dir
    from .training import fit

    config = build_config(args, {"num_references": 0})
    if len(config.defenses) != 1 or len(config.seeds) != 1:
        raise ConfigError("`ccl train` trains one model: give one --loss and one seed.")
    out = args.out or Path("runs/train")
    dataset = load_dataset(config)  # before the run directory exists: a failed download leaves nothing behind
    prepare_run_dir(out, config, resume=args.resume)
    seed = config.seeds[0]
    split = data.membership_split(len(dataset), seed=seed, population_fraction=config.population_fraction)
    split.save(out / "splits" / f"seed-{seed}.npz")
    model = config.build_model(dataset, seed=seed)
    try:
        result = fit(
            model,
            config.defenses[0].build(),
            dataset.subset(split.target_members),
            heldout=dataset.subset(split.target_nonmembers),
            config=config.train,
            checkpoint_dir=out / "model",
            resume=True,
        )
    except KeyboardInterrupt:
        print(
            f"\nInterrupted; the last epoch's checkpoint is kept. Continue with: ccl train --resume --out {out}",
            file=sys.stderr,
        )
        return 130
    last = result.history[-1]
    write_json(out / "metrics.json", {"defense": config.defenses[0].label, "seed": seed, **last})
    print(
        f"train acc {100 * last['member_acc']:.1f}%  held-out acc {100 * last.get('heldout_acc', float('nan')):.1f}%"
        f"  member loss var {last['member_loss_var']:.4g}\nRun directory: {out}"
    )
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    config = build_config(args)
    if len(config.defenses) != 1:
        raise ConfigError("`ccl audit` audits one training recipe: give one --loss (use `ccl compare` for more).")
    return _run_experiment(args, config, "runs/audit")


def _cmd_compare(args: argparse.Namespace) -> int:
    return _run_experiment(args, build_config(args), "runs/compare")


def _cmd_demo(args: argparse.Namespace) -> int:
    return _run_experiment(args, build_config(args, DEMO), "runs/demo")


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import render_report

    if args.list:
        from . import attacks, data, losses, models

        for title, names in (
            ("datasets", data.available()),
            ("models", models.available()),
            ("losses", losses.available()),
            ("attacks", attacks.available()),
        ):
            print(f"{title}: {', '.join(names)}")
        return 0
    if args.run_dir is None:
        raise ConfigError("Give the run directory: ccl report RUN_DIR")
    path = render_report(args.run_dir)
    _print_table(args.run_dir)
    print(f"\nReport: {path}")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ccl",
        description="Train classifiers that leak less, and measure how much they leak.",
        epilog="Run `ccl COMMAND --help` for a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"ccl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    specs = {
        "train": ("train one model with a loss on a dataset", _cmd_train, "train"),
        "audit": ("train a target and reference models with one recipe, run every attack", _cmd_audit, "one"),
        "compare": ("compare defenses x seeds on the privacy-utility trade-off", _cmd_compare, "many"),
        "demo": ("`compare` on the bundled digits data, in a few minutes on a laptop CPU", _cmd_demo, "many"),
    }
    for name, (help_, func, kind) in specs.items():
        p = sub.add_parser(
            name,
            help=help_,
            description=help_,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog="examples:\n" + textwrap.dedent(EXAMPLES[name]),
        )
        _experiment_options(p, defenses="one" if kind == "train" else kind)
        if kind == "train":
            p.set_defaults(num_references=None)
        p.set_defaults(func=func)
    p = sub.add_parser(
        "report",
        help="render the report of a run directory again",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + textwrap.dedent(EXAMPLES["report"]),
    )
    p.add_argument("run_dir", type=Path, nargs="?")
    p.add_argument("--list", action="store_true", help="list the datasets, models, losses and attacks")
    p.set_defaults(func=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if getattr(args, "data_dir", None):
        os.environ["CCL_DATA_DIR"] = str(args.data_dir)
    try:
        return args.func(args)
    except (ConfigError, ValueError, TypeError, RuntimeError) as err:
        print(f"ccl {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
