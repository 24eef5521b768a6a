"""The HTML report of a run: tables, plots, configuration; one self-contained file that opens offline.

`render_report(run_dir)` reads the typed results the pipeline wrote (`ccl.results`: the aggregate in
`metrics.json`, each (defense, seed) result and its per-record scores), draws the plots (PNG, also embedded in
the page) and writes `report.html`, with no external scripts, styles or fonts. It renders; it computes no
result and imports nothing of the pipeline.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ._io import write_bytes, write_text
from .errors import RunDirectoryError
from .metrics import roc_curve, tpr_key
from .results import (
    Aggregate,
    AggregateRow,
    DefenseResult,
    aggregate,
    load_aggregate,
    load_results,
    load_scores,
)

__all__ = ["render_report"]


# ----------------------------------------------------------------------------------------------------------
# Plots (figure/axes API; each function returns its figure)
# ----------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _scores(run_dir: Path, defense_slug: str, seed: int) -> dict[str, np.ndarray]:
    return load_scores(run_dir / "results" / defense_slug / f"seed-{seed}")


def plot_roc(run_dir: Path, results: list[DefenseResult]):
    """ROC curves on log-log axes, one panel per attack, one line per defense (first seed)."""
    plt = _plt()
    first = {r.defense: r for r in sorted(results, key=lambda r: r.seed, reverse=True)}
    attacks = list(next(iter(first.values())).attacks)
    cols = min(3, len(attacks))
    rows = math.ceil(len(attacks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax, attack in zip(axes.flat, attacks, strict=False):
        for label, r in first.items():
            s = _scores(run_dir, r.slug, r.seed)
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


def plot_loss_histograms(run_dir: Path, results: list[DefenseResult]):
    """Member vs non-member cross-entropy of the target (log10 axis: fitted records sit near 0), one panel per
    defense (first seed)."""
    plt = _plt()
    first = {r.defense: r for r in sorted(results, key=lambda r: r.seed, reverse=True)}
    cols = min(4, len(first))
    rows = math.ceil(len(first) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, (label, r) in zip(axes.flat, first.items(), strict=False):
        s = _scores(run_dir, r.slug, r.seed)
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


def _primary_attack(rows: list[AggregateRow]) -> str:
    attacks = rows[0].attacks
    return next((a for a in ("lira", "rmia", "loss") if a in attacks), next(iter(attacks)))


def plot_privacy_utility(rows: list[AggregateRow], fprs: list[float]):
    """Test accuracy against AUC, TPR at 1% FPR and advantage of the strongest attack, error bars over seeds."""
    plt = _plt()
    attacks = [a for a in ("loss", _primary_attack(rows)) if a in rows[0].attacks]
    attacks = list(dict.fromkeys(attacks))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    markers = dict(zip(attacks, "os", strict=False))
    for ax, metric, name in zip(
        axes,
        ("auc", tpr_key(fprs[-1]), "advantage"),
        ("AUC", f"TPR at {100 * fprs[-1]:g}% FPR", "advantage"),
        strict=True,
    ):
        for attack, marker in markers.items():
            for i, r in enumerate(rows):
                mean, std, _ = r.metric(attack, metric)
                ax.errorbar(
                    mean,
                    r.values["test_acc"],
                    xerr=std,
                    yerr=r.values["test_acc_std"],
                    fmt=marker,
                    color=f"C{i}",
                    label=r.defense if marker == "o" else None,
                    capsize=2,
                )
        ax.set(xlabel=name, ylabel="test accuracy")
    axes[0].legend(fontsize=7, title="defense")
    handles = [axes[1].plot([], [], m, color="black")[0] for m in markers.values()]
    axes[1].legend(handles, [f"{a} attack" for a in markers], fontsize=7, title="marker")
    fig.tight_layout()
    return fig


def plot_loss_variance(results: list[DefenseResult]):
    """Variance of the members' training loss per epoch (the paper's mechanism), target of the first seed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    first = {r.defense: r for r in sorted(results, key=lambda r: r.seed, reverse=True)}
    for label, r in first.items():
        hist = [h for h in r.target_history if "member_loss_var" in h]
        if hist:
            ax.plot([h["epoch"] for h in hist], [h["member_loss_var"] for h in hist], label=label)
    ax.set(xlabel="epoch", ylabel="variance of members' CE", yscale="log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_gaussian_model(rows: list[AggregateRow]):
    """The Gaussian model's predicted advantage next to the measured loss-attack advantage."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    labels = [r.defense for r in rows]
    x = np.arange(len(labels))
    measured = [r.metric("loss", "advantage")[0] for r in rows]
    ax.bar(x - 0.2, [r.values["gaussian_predicted_advantage"] for r in rows], 0.4, label="Gaussian model")
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
    if not (run_dir / "config.yaml").is_file():
        raise RunDirectoryError(f"{run_dir} is not a ccl run directory (no config.yaml).")
    results = load_results(run_dir)
    if not results:
        raise RunDirectoryError(
            f"{run_dir} holds no completed audit results: `ccl report` renders runs of `ccl audit`, `compare` "
            "and `demo`; resume an unfinished one first (--resume)."
        )
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert isinstance(config, dict)
    except (yaml.YAMLError, AssertionError, UnicodeDecodeError) as err:
        raise RunDirectoryError(f"{run_dir / 'config.yaml'} is corrupt ({type(err).__name__}).") from None
    try:
        agg = load_aggregate(run_dir)  # what the pipeline wrote
    except RunDirectoryError:  # an unfinished run: its completed results, aggregated here (nothing is written)
        agg = aggregate(results, fprs=results[0].fprs)
    run_info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    plots_dir = run_dir / "plots"
    figures = [
        ("roc", "ROC curves (log-log), per attack and defense", plot_roc(run_dir, results)),
        (
            "privacy_utility",
            "Privacy-utility trade-off (mean ± std over seeds)",
            plot_privacy_utility(agg.rows, agg.fprs),
        ),
        ("loss_histograms", "Members' and non-members' loss, per defense", plot_loss_histograms(run_dir, results)),
        ("loss_variance", "Variance of the members' training loss per epoch", plot_loss_variance(results)),
        ("gaussian_model", "Gaussian model of the loss attack vs measurement", plot_gaussian_model(agg.rows)),
    ]
    images = [(name, title, _save(fig, plots_dir / f"{name}.png")) for name, title, fig in figures]
    write_text(run_dir / "report.html", _html(agg, images, config, run_info, results))
    return run_dir / "report.html"


def _html(agg: Aggregate, images, config: dict, run_info: dict, results: list[DefenseResult]) -> str:
    rows, attacks = agg.rows, agg.attacks
    seeds = sorted({r.seed for r in results})
    spread = "mean ± std over seeds" if len(seeds) > 1 else "one seed; 95% bootstrap intervals in metrics.json"
    headline = agg.headline_attacks
    low, high = tpr_key(agg.fprs[0]), tpr_key(agg.fprs[-1])
    head = "".join(f"<th colspan=2>{html.escape(a)}</th>" for a in headline)
    sub = "".join(f"<th>AUC</th><th>TPR@{100 * agg.fprs[-1]:g}%FPR %</th>" for _ in headline)
    body = []
    for r in rows:
        cells = [
            f"<td>{html.escape(r.defense)}</td>",
            f"<td>{_fmt(r.values['test_acc'], r.values['test_acc_std'], True)}</td>",
            f"<td>{_fmt(r.values['train_acc'], r.values['train_acc_std'], True)}</td>",
        ]
        for a in headline:
            cells += [f"<td>{_fmt(*r.metric(a, 'auc')[:2])}</td>", f"<td>{_fmt(*r.metric(a, high)[:2], True)}</td>"]
        body.append("<tr>" + "".join(cells) + "</tr>")
    full = []  # every attack, one row per (defense, attack)
    for r in rows:
        for i, a in enumerate(attacks):
            name = f"<td rowspan={len(attacks)}>{html.escape(r.defense)}</td>" if i == 0 else ""
            full.append(
                f"<tr>{name}<td>{html.escape(a)}</td><td>{_fmt(*r.metric(a, 'auc')[:2])}</td>"
                f"<td>{_fmt(*r.metric(a, 'advantage')[:2])}</td>"
                f"<td>{_fmt(*r.metric(a, low)[:2], True)}</td>"
                f"<td>{_fmt(*r.metric(a, high)[:2], True)}</td></tr>"
            )
    figs = "".join(f"<h2>{html.escape(t)}</h2><img alt='{n}' src='data:image/png;base64,{b}'>" for n, t, b in images)
    first = results[0]
    lo_txt, hi_txt = f"{100 * agg.fprs[0]:g}%", f"{100 * agg.fprs[-1]:g}%"
    queries = "original + flipped" if config.get("flip_queries") else "without augmentation"
    protocol = (
        f"Dataset <b>{html.escape(str(config['dataset']))}</b>, model <b>{html.escape(str(config['model']))}</b>, "
        f"{first.num_members} members and {first.num_nonmembers} non-members audited per target "
        f"(disjoint, balanced), {first.num_population} population records never trained on, "
        f"{config['num_references']} reference models per target trained with the same loss, hyperparameters and "
        f"epochs, seeds {seeds}. Queries {queries}. "
        "Test accuracy is measured on records the target never trained on. TPR at an FPR is n/a when fewer than "
        "1/FPR non-members are audited."
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
<table><tr><th>defense</th><th>attack</th><th>AUC</th><th>advantage</th>
<th>TPR@{lo_txt}FPR %</th><th>TPR@{hi_txt}FPR %</th></tr>
{"".join(full)}</table>
<h2>Configuration</h2><pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>
<h2>Run</h2><pre>{html.escape(json.dumps(run_info, indent=2))}</pre>
</body></html>
"""
