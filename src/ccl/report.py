"""Aggregating a run's results into a table, plots and an HTML report that opens offline.

`aggregate(run_dir)` reads every `results/<defense>/seed-<s>/metrics.json` and writes `metrics.json` and
`table.csv`; `render_report(run_dir)` draws the plots (PNG, also embedded in the page) and writes
`report.html`: one self-contained file, no external scripts, styles or fonts.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ._io import write_bytes, write_json, write_text
from .metrics import roc_curve
from .run_dir import RunDirectoryError

__all__ = ["aggregate", "render_report"]

HEADLINE = ("auc", "advantage", "tpr@0.001", "tpr@0.01")


def _load_results(run_dir: Path) -> list[dict]:
    results_dir = run_dir / "results"
    if not (run_dir / "config.yaml").exists():
        raise RunDirectoryError(f"{run_dir} is not a ccl run directory (no config.yaml).")
    out = []
    for path in sorted(results_dir.glob("*/seed-*/metrics.json")):
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise RunDirectoryError(f"{path} is corrupt ({err}); delete it and resume the run.") from err
    return out


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def aggregate(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Mean and spread over seeds of every defense's utility and attack metrics; writes metrics.json and
    table.csv. With one seed the spread is the bootstrap interval of that seed."""
    run_dir = Path(run_dir)
    results = _load_results(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    order = [
        d["loss"] + (f"({','.join(f'{k}={v}' for k, v in sorted(d['params'].items()))})" if d["params"] else "")
        for d in config["defenses"]
    ]
    by_defense: dict[str, list[dict]] = {}
    for r in results:
        by_defense.setdefault(r["defense"], []).append(r)
    rows = []
    for label in [o for o in order if o in by_defense] + sorted(set(by_defense) - set(order)):
        runs = sorted(by_defense[label], key=lambda r: r["seed"])
        row: dict[str, Any] = {"defense": label, "seeds": [r["seed"] for r in runs]}
        for key in ("test_acc", "train_acc", "member_loss_std", "gaussian_predicted_advantage"):
            row[key], row[key + "_std"] = _mean_std([r[key] for r in runs])
        row["attacks"] = {}
        for attack in runs[0]["attacks"]:
            entry = {}
            for metric in HEADLINE:
                entry[metric], entry[metric + "_std"] = _mean_std([r["attacks"][attack].get(metric) for r in runs])
                if len(runs) == 1:
                    entry[metric + "_ci"] = runs[0]["attacks"][attack].get(metric + "_ci")
            row["attacks"][attack] = entry
        rows.append(row)
    summary = {"run_dir": run_dir.name, "num_results": len(results), "rows": rows}
    write_json(run_dir / "metrics.json", summary)
    _write_csv(run_dir / "table.csv", rows)
    return summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    attacks = sorted({a for r in rows for a in r["attacks"]})
    header = ["defense", "seeds", "test_acc", "test_acc_std", "train_acc"]
    for a in attacks:
        for m in HEADLINE:
            header += [f"{a}_{m}", f"{a}_{m}_std"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        line = [r["defense"], len(r["seeds"]), r["test_acc"], r["test_acc_std"], r["train_acc"]]
        for a in attacks:
            e = r["attacks"].get(a, {})
            for m in HEADLINE:
                line += [e.get(m, ""), e.get(m + "_std", "")]
        w.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in line])
    write_text(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------------------
# Plots (figure/axes API; each function returns its figure)
# ----------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _scores(run_dir: Path, defense_slug: str, seed: int) -> dict[str, np.ndarray]:
    with np.load(run_dir / "results" / defense_slug / f"seed-{seed}" / "scores.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def plot_roc(run_dir: Path, results: list[dict], slugs: dict[str, str]):
    """ROC curves on log-log axes, one panel per attack, one line per defense (first seed)."""
    plt = _plt()
    first = {r["defense"]: r for r in sorted(results, key=lambda r: r["seed"], reverse=True)}
    attacks = list(next(iter(first.values()))["attacks"])
    cols = min(3, len(attacks))
    rows = math.ceil(len(attacks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax, attack in zip(axes.flat, attacks, strict=False):
        for label, r in first.items():
            s = _scores(run_dir, slugs[label], r["seed"])
            curve = roc_curve(s[f"score_{attack}"], s["is_member"])
            ax.plot(np.maximum(curve.fpr, 1e-5), np.maximum(curve.tpr, 1e-5), label=label, lw=1.2)
        ax.plot([1e-5, 1], [1e-5, 1], color="grey", ls=":", lw=0.8)
        ax.set(
            xscale="log",
            yscale="log",
            xlim=(1e-3 / 2, 1),
            ylim=(1e-3 / 2, 1),
            title=attack,
            xlabel="false-positive rate",
            ylabel="true-positive rate",
        )
    for ax in list(axes.flat)[len(attacks) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_loss_histograms(run_dir: Path, results: list[dict], slugs: dict[str, str]):
    """Member vs non-member cross-entropy of the target (log10 axis: fitted records sit near 0), one panel per
    defense (first seed)."""
    plt = _plt()
    first = {r["defense"]: r for r in sorted(results, key=lambda r: r["seed"], reverse=True)}
    cols = min(4, len(first))
    rows = math.ceil(len(first) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, (label, r) in zip(axes.flat, first.items(), strict=False):
        s = _scores(run_dir, slugs[label], r["seed"])
        loss, m = np.log10(np.maximum(s["target_loss"], 1e-8)), s["is_member"]
        bins = np.linspace(loss.min(), loss.max() + 1e-9, 40)
        ax.hist(loss[m], bins, alpha=0.6, label="members", density=True)
        ax.hist(loss[~m], bins, alpha=0.6, label="non-members", density=True)
        ax.set(title=label, xlabel="log10 cross-entropy")
    for ax in list(axes.flat)[len(first) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _primary_attack(rows: list[dict]) -> str:
    attacks = rows[0]["attacks"]
    return next((a for a in ("lira", "rmia", "loss") if a in attacks), next(iter(attacks)))


def plot_privacy_utility(rows: list[dict]):
    """Test accuracy against AUC, TPR at 1% FPR and advantage of the strongest attack, error bars over seeds."""
    plt = _plt()
    attacks = [a for a in ("loss", _primary_attack(rows)) if a in rows[0]["attacks"]]
    attacks = list(dict.fromkeys(attacks))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    markers = dict(zip(attacks, "os", strict=False))
    for ax, metric, name in zip(
        axes, ("auc", "tpr@0.01", "advantage"), ("AUC", "TPR at 1% FPR", "advantage"), strict=True
    ):
        for attack, marker in markers.items():
            for i, r in enumerate(rows):
                e = r["attacks"][attack]
                ax.errorbar(
                    e[metric],
                    r["test_acc"],
                    xerr=e[metric + "_std"],
                    yerr=r["test_acc_std"],
                    fmt=marker,
                    color=f"C{i}",
                    label=r["defense"] if marker == "o" else None,
                    capsize=2,
                )
        ax.set(xlabel=name, ylabel="test accuracy")
    axes[0].legend(fontsize=7, title="defense")
    handles = [axes[1].plot([], [], m, color="black")[0] for m in markers.values()]
    axes[1].legend(handles, [f"{a} attack" for a in markers], fontsize=7, title="marker")
    fig.tight_layout()
    return fig


def plot_loss_variance(results: list[dict]):
    """Variance of the members' training loss per epoch (the paper's mechanism), target of the first seed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    first = {r["defense"]: r for r in sorted(results, key=lambda r: r["seed"], reverse=True)}
    for label, r in first.items():
        hist = [h for h in r.get("target_history", []) if "member_loss_var" in h]
        if hist:
            ax.plot([h["epoch"] for h in hist], [h["member_loss_var"] for h in hist], label=label)
    ax.set(xlabel="epoch", ylabel="variance of members' CE", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_gaussian_model(rows: list[dict], results: list[dict]):
    """The Gaussian model's predicted advantage next to the measured loss-attack advantage."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    labels = [r["defense"] for r in rows]
    x = np.arange(len(labels))
    measured = [r["attacks"]["loss"]["advantage"] if "loss" in r["attacks"] else math.nan for r in rows]
    ax.bar(x - 0.2, [r["gaussian_predicted_advantage"] for r in rows], 0.4, label="Gaussian model")
    ax.bar(x + 0.2, measured, 0.4, label="measured (loss attack)")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="membership advantage")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    write_bytes(path, buf.getvalue())
    return base64.b64encode(buf.getvalue()).decode()


def _fmt(v: Any, std: Any = None, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    scale = 100 if pct else 1
    text = f"{v * scale:.1f}" if pct else f"{v:.3f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)) and std:
        text += f" ± {std * scale:.1f}" if pct else f" ± {std:.3f}"
    return text


def render_report(run_dir: str | os.PathLike) -> Path:
    """Draws the plots and writes `report.html` (self-contained); returns its path."""
    run_dir = Path(run_dir)
    summary = aggregate(run_dir)
    results = _load_results(run_dir)
    if not results:
        raise RunDirectoryError(f"{run_dir} holds no completed results yet; resume the run first.")
    rows = summary["rows"]
    slugs = {r["defense"]: r["slug"] for r in results}
    plots_dir = run_dir / "plots"
    figures = [
        ("roc", "ROC curves (log-log), per attack and defense", plot_roc(run_dir, results, slugs)),
        ("privacy_utility", "Privacy-utility trade-off (mean ± std over seeds)", plot_privacy_utility(rows)),
        (
            "loss_histograms",
            "Members' and non-members' loss, per defense",
            plot_loss_histograms(run_dir, results, slugs),
        ),
        ("loss_variance", "Variance of the members' training loss per epoch", plot_loss_variance(results)),
        ("gaussian_model", "Gaussian model of the loss attack vs measurement", plot_gaussian_model(rows, results)),
    ]
    images = [(name, title, _save(fig, plots_dir / f"{name}.png")) for name, title, fig in figures]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    write_text(run_dir / "report.html", _html(rows, images, config, run_info, results))
    return run_dir / "report.html"


def _html(rows: list[dict], images, config: dict, run_info: dict, results: list[dict]) -> str:
    attacks = list(rows[0]["attacks"])
    seeds = sorted({r["seed"] for r in results})
    spread = "mean ± std over seeds" if len(seeds) > 1 else "one seed; 95% bootstrap intervals in metrics.json"
    headline = [a for a in ("loss", "lira", "rmia") if a in attacks] or attacks[:3]
    head = "".join(f"<th colspan=2>{html.escape(a)}</th>" for a in headline)
    sub = "".join("<th>AUC</th><th>TPR@1%FPR %</th>" for _ in headline)
    body = []
    for r in rows:
        cells = [
            f"<td>{html.escape(r['defense'])}</td>",
            f"<td>{_fmt(r['test_acc'], r['test_acc_std'], True)}</td>",
            f"<td>{_fmt(r['train_acc'], r['train_acc_std'], True)}</td>",
        ]
        for a in headline:
            e = r["attacks"][a]
            cells += [
                f"<td>{_fmt(e['auc'], e['auc_std'])}</td>",
                f"<td>{_fmt(e['tpr@0.01'], e['tpr@0.01_std'], True)}</td>",
            ]
        body.append("<tr>" + "".join(cells) + "</tr>")
    full = []  # every attack, one row per (defense, attack)
    for r in rows:
        for i, a in enumerate(attacks):
            e = r["attacks"][a]
            name = f"<td rowspan={len(attacks)}>{html.escape(r['defense'])}</td>" if i == 0 else ""
            full.append(
                f"<tr>{name}<td>{html.escape(a)}</td><td>{_fmt(e['auc'], e['auc_std'])}</td>"
                f"<td>{_fmt(e['advantage'], e['advantage_std'])}</td>"
                f"<td>{_fmt(e['tpr@0.001'], e['tpr@0.001_std'], True)}</td>"
                f"<td>{_fmt(e['tpr@0.01'], e['tpr@0.01_std'], True)}</td></tr>"
            )
    figs = "".join(f"<h2>{html.escape(t)}</h2><img alt='{n}' src='data:image/png;base64,{b}'>" for n, t, b in images)
    first = results[0]
    queries = "original + flipped" if config.get("flip_queries") else "without augmentation"
    protocol = (
        f"Dataset <b>{html.escape(str(config['dataset']))}</b>, model <b>{html.escape(str(config['model']))}</b>, "
        f"{first['num_members']} members and {first['num_nonmembers']} non-members audited per target "
        f"(disjoint, balanced), {first['num_population']} population records never trained on, "
        f"{config['num_references']} reference models per target trained with the same loss, hyperparameters and "
        f"epochs, seeds {seeds}. Queries {queries}. "
        "Test accuracy is measured on records the target never trained on. TPR at 0.1% FPR is n/a when fewer than "
        "1,000 non-members are audited."
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>ccl report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1300px}}table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}td:first-child{{text-align:left}}
img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em;font-size:12px;overflow:auto}}</style></head><body>
<h1>Privacy-utility report</h1>
<p>{protocol}</p>
<h2>Table ({spread})</h2>
<table><tr><th rowspan=2>defense</th><th rowspan=2>test acc %</th><th rowspan=2>train acc %</th>{head}</tr>
<tr>{sub}</tr>{"".join(body)}</table>
{figs}
<h2>Every attack ({spread})</h2>
<table><tr><th>defense</th><th>attack</th><th>AUC</th><th>advantage</th><th>TPR@0.1%FPR %</th><th>TPR@1%FPR %</th></tr>
{"".join(full)}</table>
<h2>Configuration</h2><pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>
<h2>Run</h2><pre>{html.escape(json.dumps(run_info, indent=2))}</pre>
</body></html>
"""
