"""The command line end to end on tiny settings: run directory, report, resume, caching and errors."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ccl import cli
from ccl.config import ConfigError, ExperimentConfig
from ccl.results import load_aggregate

TINY = [
    "--dataset",
    "synthetic",
    "--data-option",
    "num_samples=160",
    "--data-option",
    "num_features=8",
    "--model-option",
    "hidden=[32]",
    "--epochs",
    "3",
    "--batch-size",
    "16",
    "--lr",
    "0.05",
    "--bootstrap",
    "10",
    "--quiet",
]


def run_cli(*args: str) -> int:
    return cli.main(list(args))


def model_folders(out: Path) -> set[str]:
    return {p.name for p in (out / "models").iterdir() if p.is_dir() and p.name != "stacked"}


def test_compare_end_to_end_writes_a_complete_run_directory(tmp_path, capsys):
    out = tmp_path / "run"
    started = time.perf_counter()
    assert (
        run_cli(
            "compare",
            *TINY,
            "--defenses",
            "ce",
            "ccel:alpha=0.5",
            "--seeds",
            "0",
            "--num-references",
            "4",
            "--out",
            str(out),
        )
        == 0
    )
    wall = time.perf_counter() - started
    printed = capsys.readouterr().out
    assert "ccel(alpha=0.5)" in printed and "Report:" in printed
    # run.json: the seconds of each phase, within the command's own; the split is the last line printed
    timing = json.loads((out / "run.json").read_text())["invocations"][-1]["timing"]
    phases = timing["phases"]
    top = {name: v for name, v in phases.items() if "/" not in name}
    assert set(top) == {"preflight", "train", "score", "summary", "report"}
    assert {"score/attack/lira", "score/leave_one_out/lira", "score/evaluation/pooled"} <= set(phases)
    assert all(v["wall_s"] >= 0 and v["cpu_s"] >= 0 and v["calls"] >= 1 for v in phases.values())
    assert phases["train"]["calls"] == phases["score/attack/lira"]["calls"] == 2  # one per defense
    assert sum(v["wall_s"] for v in top.values()) <= timing["wall_s"] <= wall
    assert sum(v["wall_s"] for k, v in phases.items() if k.startswith("score/")) <= phases["score"]["wall_s"]
    last = printed.strip().splitlines()[-1]
    assert re.fullmatch(r"time: preflight .* \| train .* \| score .* \| summary .* \| report .* \| total .*", last)
    for name in ("config.yaml", "run.json", "metrics.json", "table.csv", "report.html", "splits/seed-0.npz"):
        assert (out / name).exists(), name
    for plot in ("roc", "privacy_utility", "loss_histograms", "loss_variance", "gaussian_model"):
        assert (out / "plots" / f"{plot}.png").stat().st_size > 1000
    summary = json.loads((out / "metrics.json").read_text())
    assert [r["defense"] for r in summary["rows"]] == ["ce", "ccel(alpha=0.5)"]
    attacks = set(summary["rows"][0]["attacks"])
    assert {"loss", "lira", "lira_offline", "rmia", "shadow_classifier"} <= attacks
    per_seed = json.loads((out / "results" / "ce" / "seed-0" / "metrics.json").read_text())
    assert per_seed["num_members"] == per_seed["num_nonmembers"]  # balanced
    assert len(per_seed["target_history"]) == 3
    assert len(model_folders(out)) == 2 * 5  # (target + 4 references) per defense
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert not re.search(r"""(src|href)=["']?https?:""", html)  # opens offline
    table = list(csv.DictReader(io.StringIO((out / "table.csv").read_text())))
    assert {"test_acc", "evaluation", "attack", "tpr@0.01", "epsilon_lb"} <= set(table[0])
    lira = {(r["defense"], r["evaluation"]) for r in table if r["attack"] == "lira"}
    assert {("ce", "target"), ("ce", "pooled"), ("ccel(alpha=0.5)", "pooled")} <= lira  # every evaluation, labelled
    pooled_labels = {r["evaluation_label"] for r in table if r["evaluation"] == "pooled"}
    assert pooled_labels == {"pooled leave-one-out, random records"}
    assert summary["evaluation_labels"]["attacks"] == "single target, random records"
    assert summary["evaluation_labels"]["evaluations.pooled"] == "pooled leave-one-out, random records"
    # each evaluation exports on its own, labelled, in every format
    capsys.readouterr()
    assert run_cli("report", str(out), "--format", "csv", "--evaluation", "pooled") == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["evaluation"] for r in rows} == {"pooled"}
    assert len(rows) == sum(r["evaluation"] == "pooled" for r in table)
    ce_lira = next(r for r in rows if r["defense"] == "ce" and r["attack"] == "lira")
    assert float(ce_lira["auc"]) == pytest.approx(summary["rows"][0]["evaluations"]["pooled"]["lira"]["auc"], rel=1e-5)
    assert run_cli("report", str(out), "--format", "json", "--evaluation", "target") == 0
    single = json.loads(capsys.readouterr().out)
    assert single["label"] == "single target, random records"
    assert single["rows"][0]["attacks"] == summary["rows"][0]["attacks"]
    assert run_cli("report", str(out), "--format", "md", "--evaluation", "pooled") == 0
    md = capsys.readouterr().out
    assert md.startswith("### pooled leave-one-out, random records") and "single target" not in md
    # the summary is a pipeline step: saved in metrics.json, exported, equal to recomputing it
    from ccl._io import dumps_json
    from ccl.results import load_results
    from ccl.summary import load_summary, summarize

    saved = load_summary(out)
    assert saved is not None and saved.headline.baseline == "ce"
    recomputed = summarize(out, load_aggregate(out), load_results(out))
    assert dumps_json(saved.to_dict()) == dumps_json(recomputed.to_dict())  # NaN as null on both sides
    assert [c.defense for c in saved.headline.comparisons] == ["ccel(alpha=0.5)"]
    assert run_cli("report", str(out), "--format", "json") == 0
    assert json.loads(capsys.readouterr().out)["summary"]["headline"]["baseline"] == "ce"
    assert run_cli("report", str(out), "--format", "md") == 0
    assert capsys.readouterr().out.startswith("## Summary\n\n- Summary (pooled leave-one-out")
    assert run_cli("report", str(out), "--format", "md", "--evaluation", "canaries") == 2
    assert "has no 'canaries' evaluation" in capsys.readouterr().err
    # report re-renders from the directory alone
    (out / "report.html").unlink()
    assert run_cli("report", str(out)) == 0
    assert (out / "report.html").exists()


def test_existing_run_is_never_overwritten_and_resume_reuses_models(tmp_path, capsys):
    out = tmp_path / "run"
    base = [*TINY, "--loss", "ce", "--seeds", "0", "--num-references", "2", "--out", str(out)]
    assert run_cli("audit", *base) == 0
    before = model_folders(out)
    assert run_cli("audit", *base) == 2
    assert "already exists" in capsys.readouterr().err
    # a lost result is recomputed from cached models: no model is trained again
    (out / "results" / "ce" / "seed-0" / "metrics.json").unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "models").rglob("outputs.npz")}
    assert run_cli("audit", *base, "--resume") == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "models").rglob("outputs.npz")} == mtimes
    # raising K trains only the new reference models
    assert run_cli("audit", "--resume", "--num-references", "4", "--out", str(out), "--quiet") == 0
    after = model_folders(out)
    assert before < after and len(after) == 5
    assert json.loads((out / "results" / "ce" / "seed-0" / "metrics.json").read_text())["num_references"] == 4
    # a changed recipe is never mixed with finished work: the resume is refused and nothing changes
    first = (out / "results" / "ce" / "seed-0" / "metrics.json").read_text()
    config_before = (out / "config.yaml").read_text()
    assert run_cli("audit", *base, "--resume", "--num-references", "4", "--epochs", "2") == 2
    err = capsys.readouterr().err
    assert "--resume cannot change train.epochs 3 -> 2" in err and "another --out" in err
    assert (out / "results" / "ce" / "seed-0" / "metrics.json").read_text() == first
    assert (out / "config.yaml").read_text() == config_before
    # every invocation that ran is in run.json's history (the refused one never opened the directory)
    history = json.loads((out / "run.json").read_text())["invocations"]
    assert len(history) == 3 and all(h["resume"] for h in history[1:])


def test_yaml_config_is_validated_and_flags_override_it(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("dataset: synthetic\nnum_refrences: 3\n")
    assert run_cli("audit", "--config", str(cfg), "--out", str(tmp_path / "x")) == 2
    assert "Did you mean 'num_references'" in capsys.readouterr().err
    cfg.write_text("dataset: synthetic\ntrain:\n  epochs: 7\n  lr: 0.2\ndefenses: [ccql]\n")
    args = cli.make_parser().parse_args(["audit", "--config", str(cfg), "--lr", "0.01"])
    config = cli.build_config(args)
    assert (config.train.epochs, config.train.lr, config.defenses[0].loss) == (7, 0.01, "ccql")
    cfg.write_text("- not a mapping\n")
    assert run_cli("audit", "--config", str(cfg)) == 2
    assert "mapping" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compare", "--dataset", "mnist"], "Unknown dataset 'mnist'"),
        (["compare", "--model", "resnet50"], "Unknown model 'resnet50'.*resnet18"),
        (["compare", "--defenses", "cce"], "Unknown defense 'cce'.*Did you mean"),
        (["compare", "--defenses", "ccel:alpha=2"], "`alpha`.*2"),
        (["compare", "--attacks", "lira2"], "Unknown attack 'lira2'"),
        (["compare", "--epochs", "0"], "`epochs`"),
        (["compare", "--attacks", "lira", "--num-references", "2"], "'lira' needs at least 4 reference models"),
        (["report", "does-not-exist"], "not a ccl run directory"),
        (["audit", "--defenses", "ce"], None),  # audit takes --loss, not --defenses: argparse exits 2
    ],
)
def test_bad_input_gets_a_clear_error(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if message is None:
        with pytest.raises(SystemExit) as err:
            cli.main(argv)
        assert err.value.code == 2
        return
    assert cli.main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_a_failed_download_leaves_no_run_directory(tmp_path, monkeypatch, capsys):
    from ccl.data import datasets
    from ccl.data.download import RemoteFile

    monkeypatch.setenv("CCL_DATA_DIR", str(tmp_path / "cache"))  # main() sets it from --data-dir; undone after
    missing = tmp_path / "nowhere" / "cifar-10-python.tar.gz"
    monkeypatch.setitem(datasets.REMOTE, "cifar10", RemoteFile(missing.name, (missing.as_uri(),), "md5", "0" * 32))
    out = tmp_path / "run"
    assert (
        run_cli(
            "audit",
            "--dataset",
            "cifar10",
            "--model",
            "cnn",
            "--loss",
            "ce",
            "--data-dir",
            str(tmp_path / "cache"),
            "--out",
            str(out),
            "--quiet",
        )
        == 2
    )
    assert "Fetch it by hand" in capsys.readouterr().err
    assert not out.exists()


def test_demo_settings_are_valid_and_sized_for_a_laptop():
    args = cli.make_parser().parse_args(["demo"])
    config = cli.build_config(args, cli.DEMO)
    assert isinstance(config, ExperimentConfig)
    assert config.dataset == "digits"  # bundled with scikit-learn: offline
    labels = [d.label for d in config.defenses]
    for required in (
        "ce",
        "ccel(alpha=0.2)",
        "ccel(alpha=0.5)",
        "ccel(alpha=0.8)",
        "relaxloss(alpha=0.5)",
        "relaxloss(alpha=1)",
    ):
        assert required in labels
    # DP-SGD with a recipe of its own, its learning rate chosen on the defender's reserve
    dp = next(d for d in config.defenses if d.loss == "dpsgd")
    assert dp.params == {"epsilon": 8} and dp.selects and config.reserve_fraction > 0
    assert config.uses_leave_one_out and config.canaries > 0  # the worst-case evaluation, by default
    models = len(config.defenses) * len(config.seeds) * (1 + config.num_references)
    assert models <= 500 and config.train.epochs <= 100 and config.train.augment is False
    assert not config.flip_queries  # no augmentation at query time


def test_help_shows_examples():
    out = subprocess.run([sys.executable, "-m", "ccl", "compare", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "examples:" in out.stdout and "ccl compare --dataset cifar10" in out.stdout


def test_ctrl_c_keeps_completed_models_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "ccl",
        "compare",
        *TINY,
        "--epochs",
        "40",
        "--defenses",
        "ce",
        "focal",
        "--seeds",
        "0",
        "--num-references",
        "2",
        "--stacked",
        "off",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "models").glob("*/outputs.npz")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before the interrupt landed")
    assert proc.returncode == 130 and "--resume" in err
    kept = list((out / "models").glob("*/outputs.npz"))
    assert kept and not (out / "report.html").exists()
    assert cli.main(["compare", "--resume", "--out", str(out), "--quiet"]) == 0
    assert (out / "report.html").exists()
    assert all(p.exists() for p in kept)


def test_train_command(tmp_path, capsys):
    out = tmp_path / "t"
    tiny = [a for a in TINY if a not in ("--bootstrap", "10")]
    assert run_cli("train", *tiny, "--loss", "ccel:alpha=0.5", "--out", str(out)) == 0
    assert (out / "model" / "checkpoint.pt").exists() and (out / "model" / "log.jsonl").exists()
    assert "held-out acc" in capsys.readouterr().out
    with pytest.raises(ConfigError):
        cli.build_config(cli.make_parser().parse_args(["train", "--loss", "nope"]))


def test_train_uses_the_audit_seed_rule(tmp_path):
    """`ccl train --seed 3` trains the very model an audit with seed 3 trains as its target."""
    tiny = [a for a in TINY if a not in ("--bootstrap", "10")]
    assert run_cli("train", *tiny, "--seed", "3", "--out", str(tmp_path / "t")) == 0
    assert run_cli("audit", *TINY, "--seeds", "3", "--num-references", "2", "--out", str(tmp_path / "a")) == 0
    from ccl.training import load_checkpoint

    trained = load_checkpoint(tmp_path / "t" / "model" / "checkpoint.pt")["model"]
    (target,) = [p for p in (tmp_path / "a" / "models").glob("*/checkpoint.pt")]
    for name, value in load_checkpoint(target)["model"].items():
        assert torch.equal(value, trained[name]), name


@pytest.mark.parametrize(
    "flag", [["--attacks", "loss"], ["--num-references", "4"], ["--seeds", "1"], ["--stacked", "on"]]
)
def test_train_refuses_audit_flags_by_name(tmp_path, capsys, flag):
    out = tmp_path / "T"
    assert run_cli("train", "--dataset", "digits", *flag, "--out", str(out)) == 2
    err = capsys.readouterr().err
    assert flag[0] in err and "Traceback" not in err
    assert not out.exists()
