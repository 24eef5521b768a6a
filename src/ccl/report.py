"""The HTML report of a run: the headline, tables, plots, configuration; one self-contained file.

`render_report(run_dir)` reads what the pipeline wrote (`ccl.results`: the aggregate in `metrics.json`, each
(defense, seed) result and its per-record scores), computes the headline (`ccl.summary`), draws the plots (PNG,
also embedded in the page) and writes `report.html`, with no external scripts, styles or fonts. It imports
nothing of the pipeline. Every plot gives a defense the same colour.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ._io import write_bytes, write_text
from .errors import RunDirectoryError
from .layout import RunLayout
from .metrics import roc_curve, tpr_key
from .results import EVALUATIONS, Aggregate, DefenseResult, aggregate, load_aggregate, load_results, load_scores
from .summary import ACCESS_WORDS, Headline, choice_text, load_summary, strongest_attack, summarize
from .training import defense_label, recipe_text

__all__ = ["render_report", "unfinished_note"]


# ----------------------------------------------------------------------------------------------------------
# Plots (figure/axes API; each function returns its figure)
# ----------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


#: One hue per family (the first is the baseline's), its settings as shades from light to dark.
_FAMILY_MAPS = ("Blues", "Greens", "Reds", "Purples", "Oranges", "Greys", "YlOrBr", "BuGn", "RdPu", "PuBu")


def _family_of(defense: str) -> str:
    """`ccel(alpha=0.5)` and `dpsgd(epsilon=8)@lr=0.5` to `ccel` and `dpsgd`."""
    return re.split(r"[(@]", defense, maxsplit=1)[0]


def _colors(agg: Aggregate) -> dict[str, Any]:
    """One colour per defense, the same in every plot: a hue per family and a shade per setting, so the
    frontier's family legend and each point's colour agree."""
    plt = _plt()
    families: dict[str, list[str]] = {}
    for r in agg.rows:
        families.setdefault(_family_of(r.defense), []).append(r.defense)
    colors = {}
    for i, members in enumerate(families.values()):
        cmap = plt.get_cmap(_FAMILY_MAPS[i % len(_FAMILY_MAPS)])
        shades = np.linspace(0.75, 0.45, len(members)) if len(members) > 1 else [0.65]
        colors |= {d: cmap(0.25 + float(t)) for d, t in zip(members, shades, strict=True)}
    return colors


def _thin_steps(x: np.ndarray, y: np.ndarray, *, decades: float = 0.004) -> tuple[np.ndarray, np.ndarray]:
    """The vertices of a rising step curve on log-log axes that a reader can see: one per cell of a grid
    `decades` wide (about 0.6 pixel at the report's size), the last of each run of points in one cell, and the
    first point. The thinned curve stays within one cell of the full one; a ROC of thousands of records keeps a
    few hundred vertices, which matplotlib draws and lays out several times faster."""
    if x.size < 3:
        return x, y
    cell = np.stack([np.floor(np.log10(x) / decades), np.floor(np.log10(y) / decades)])
    keep = np.r_[(cell[:, 1:] != cell[:, :-1]).any(0), True]
    keep[0] = True
    return x[keep], y[keep]


def _roc_axes(ax) -> None:
    """Log-log ROC axes with minor ticks at 2 and 5 of each decade only: the default eight per decade on the
    report's thirty-odd ROC panels cost a third of its rendering time (3.8 of 9.6 s on Location30)."""
    from matplotlib.ticker import LogLocator

    ax.set(xscale="log", yscale="log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))


def _scores_of(run_dir: Path):
    """A loader of each result's per-record arrays that reads every scores.npz once per rendering."""
    loaded: dict[tuple[str, int], dict[str, np.ndarray]] = {}

    def scores(r: DefenseResult) -> dict[str, np.ndarray]:
        key = (r.slug, r.seed)
        if key not in loaded:
            loaded[key] = load_scores(RunLayout(run_dir).result_dir(r.slug, r.seed))
        return loaded[key]

    return scores


def plot_roc(scores, agg: Aggregate, results: list[DefenseResult], colors: dict):
    """ROC curves on log-log axes, one panel per attack: every seed's curve, one colour per defense. The FPR
    axis starts at 1/(non-members), the finest rate the audit resolves; curves are steps (TPR at FPR x is the
    best TPR among thresholds with FPR <= x, as in the tables)."""
    plt = _plt()
    attacks = agg.attacks
    cols = min(3, len(attacks))
    rows = math.ceil(len(attacks) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.7 * rows + 0.6), squeeze=False)
    n_non = min(r.num_nonmembers for r in results)
    n_mem = min(r.num_members for r in results)
    low_x, low_y = 1 / n_non, 1 / n_mem
    for ax, attack in zip(axes.flat, attacks, strict=False):
        for r in sorted(results, key=lambda r: (r.defense, r.seed)):
            if attack not in r.attacks:
                continue
            s = scores(r)
            curve = roc_curve(s[f"score_{attack}"], s["is_member"])
            keep = curve.fpr > 0  # fpr 0 cannot be drawn on a log axis; the step from 1/n on is exact
            ax.plot(
                *_thin_steps(curve.fpr[keep], np.maximum(curve.tpr[keep], low_y / 2)),
                drawstyle="steps-post",
                color=colors[r.defense],
                lw=1.0,
                alpha=0.75,
            )
        ax.plot([low_x, 1], [low_x, 1], color="grey", ls=":", lw=0.8)
        _roc_axes(ax)
        ax.set(
            xlim=(low_x, 1),
            ylim=(low_y / 2, 1.05),
            title=f"{attack} (single target)",
            xlabel="false-positive rate",
            ylabel="true-positive rate",
        )
    for ax in list(axes.flat)[len(attacks) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors[r.defense], lw=2) for r in agg.rows]
    legend_rows = math.ceil(len(agg.rows) / 5)
    fig.legend(
        handles,
        [r.defense for r in agg.rows],
        loc="upper center",
        ncol=min(5, len(agg.rows)),
        fontsize=8,
        frameon=False,
    )
    fig.tight_layout(rect=(0, 0, 1, 1 - (0.25 + 0.15 * legend_rows) / fig.get_figheight()))
    return fig


def plot_loss_histograms(scores, agg: Aggregate, results: list[DefenseResult]):
    """Member vs non-member cross-entropy of the target (log10 axis: fitted records sit near 0), one panel per
    defense, the first seed, one shared x-range."""
    plt = _plt()
    first_seed = {}
    for r in sorted(results, key=lambda r: r.seed, reverse=True):
        first_seed[r.defense] = r
    chosen = [first_seed[row.defense] for row in agg.rows if row.defense in first_seed]
    losses = {r.defense: scores(r) for r in chosen}
    logs = {d: np.log10(np.maximum(s["target_loss"], 1e-8)) for d, s in losses.items()}
    lo, hi = min(v.min() for v in logs.values()), max(v.max() for v in logs.values())
    bins = np.linspace(lo, hi + 1e-9, 40)
    cols = min(4, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False, sharex=True)
    for ax, r in zip(axes.flat, chosen, strict=False):
        loss, m = logs[r.defense], losses[r.defense]["is_member"]
        for part, label, color in ((m, "members", "#d62728"), (~m, "non-members", "#1f77b4")):  # one patch each
            ax.hist(loss[part], bins, alpha=0.6, label=label, density=True, color=color, histtype="stepfilled")
        ax.set(title=f"{r.defense} (seed {r.seed})", xlabel="log10 cross-entropy of the target", ylabel="density")
        ax.title.set_fontsize(9)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_privacy_utility(agg: Aggregate, colors: dict, frontier: list[str], fpr: float, evaluation: str):
    """Test accuracy against the strongest attack's AUC, TPR at `fpr` and advantage; up and left is better.
    Error bars: std over seeds, or with one seed the bootstrap interval of the attack metric."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.0))
    one_seed = all(len(r.seeds) == 1 for r in agg.rows)
    for ax, metric, name in zip(
        axes, ("auc", tpr_key(fpr), "advantage"), ("AUC", f"TPR at {100 * fpr:g}% FPR", "advantage"), strict=True
    ):
        for r in agg.rows:
            attack = strongest_attack(agg, r.defense, evaluation)
            mean, std, ci = r.metric(attack, metric, evaluation)
            if one_seed and ci and None not in ci:
                xerr = [[max(mean - ci[0], 0)], [max(ci[1] - mean, 0)]]
            else:
                xerr = None if math.isnan(std) else std
            yerr = None if one_seed or math.isnan(r.values["test_acc_std"]) else r.values["test_acc_std"]
            ax.errorbar(
                mean,
                r.test_acc,
                xerr=xerr,
                yerr=yerr,
                fmt="o",
                color=colors[r.defense],
                capsize=2,
                label=r.defense,
                mec="black" if r.defense in frontier else colors[r.defense],
                ms=7,
            )
        ax.set(
            xlabel=f"{name} of the strongest attack (lower: more private)\n{EVALUATIONS[evaluation]}",
            ylabel="test accuracy (higher: more useful)",
        )
        ax.annotate(
            "better",
            xy=(0.04, 0.92),
            xytext=(0.2, 0.78),
            xycoords="axes fraction",
            fontsize=8,
            arrowprops={"arrowstyle": "->", "color": "grey"},
            color="grey",
        )
    handles, labels = axes[0].get_legend_handles_labels()
    legend_rows = math.ceil(len(labels) / 4)
    bottom = 0.2 + 0.16 * legend_rows  # inches under the panels: the legend never covers a point
    fig.set_figheight(4.0 + bottom)
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=min(4, len(labels)),
        fontsize=7,
        title="defense (black edge: on the frontier)",
        title_fontsize=7,
        frameon=False,
    )
    fig.suptitle(
        "one seed: bars are 95% bootstrap intervals of the attack metric" if one_seed else "bars: std over seeds",
        fontsize=9,
    )
    fig.tight_layout(rect=(0, bottom / fig.get_figheight(), 1, 1))
    return fig


def _point_label(defense: str, family: str) -> str:
    """A frontier point's label beside its family's legend entry: the parameters without the family's name, and
    the recipe of its own after `@` when short (a long one, a choice of learning rates say, reads "@own recipe"):
    `_point_label("dpsgd(epsilon=16)@lr=[0.1,0.5,2.0],momentum=0.0", "dpsgd") == "epsilon=16@own recipe"`."""
    name, _, recipe = defense.partition("@")
    params = name.replace(family, "", 1).strip("()")
    if not recipe:
        return params or family
    return f"{params}@{recipe if len(recipe) <= 16 else 'own recipe'}"


def plot_frontier(points, label: str, colors: dict, optimal: set[str], muted: frozenset[str] | set[str] = frozenset()):
    """The privacy-utility frontier: each family a curve of its settings, intervals on both axes, the
    Pareto-optimal points ringed, leakage on a log axis. The `muted` settings (no measurable effect against the
    baseline) are drawn faint and unlabelled, under the others, so they cannot hide the baseline."""
    if not points:  # no defense has a resolved leakage figure: nothing to place
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    positive = [p.leakage for p in points if p.leakage > 0]
    floor = min(positive) / 3 if positive else 1e-3
    for fam in dict.fromkeys(p.family for p in points):
        mine = sorted((p for p in points if p.family == fam), key=lambda p: p.leakage)
        line = colors[mine[len(mine) // 2].defense]  # the family's hue; each point in its defense's shade, as elsewhere
        xs = [max(p.leakage, floor) for p in mine]
        ax.plot(xs, [p.accuracy for p in mine], "-", color=line, lw=1, alpha=0.4)
        for k, (p, x) in enumerate(zip(mine, xs, strict=True)):
            color, faint = colors[p.defense], p.defense in muted
            xerr = [[max(x - max(p.leakage_interval[0], floor), 0)], [max(p.leakage_interval[1] - x, 0)]]
            yerr = [[p.accuracy - p.accuracy_interval[0]], [p.accuracy_interval[1] - p.accuracy]]
            ax.errorbar(
                x,
                p.accuracy,
                xerr=xerr,
                yerr=yerr,
                fmt="o",
                color=color,
                capsize=2,
                ms=6,
                mec="black" if p.defense in optimal else color,
                mew=1.6 if p.defense in optimal else 1,
                alpha=0.3 if faint else 1.0,
                zorder=1 if faint else 3,
            )
            if not faint:  # settings of one family alternate above and below their point
                ax.annotate(
                    _point_label(p.defense, fam),
                    (x, p.accuracy),
                    fontsize=6,
                    xytext=(3, 3 if k % 2 == 0 else -9),
                    textcoords="offset points",
                    zorder=4,
                )
        ax.plot([], [], "o-", color=line, label=fam)
    best = sorted((p for p in points if p.defense in optimal), key=lambda p: p.leakage)
    if best:
        xs, ys = [max(p.leakage, floor) for p in best], [p.accuracy for p in best]
        ax.step(xs, ys, where="post", color="grey", ls="--", lw=1, label="frontier")
    ax.set(xscale="log", xlabel=f"{label} (log; lower: more private)", ylabel="test accuracy (higher: more useful)")
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis collide
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_loss_variance(agg: Aggregate, results: list[DefenseResult], colors: dict):
    """Variance of the members' training loss per epoch (the paper's mechanism), target of the first seed."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.8, 3.8))
    first = {r.defense: r for r in sorted(results, key=lambda r: r.seed, reverse=True)}
    for row in agg.rows:
        r = first.get(row.defense)
        hist = [h for h in (r.target_history if r else []) if "member_loss_var" in h]
        if hist:
            ax.plot(
                [h["epoch"] for h in hist],
                [h["member_loss_var"] for h in hist],
                label=row.defense,
                color=colors[row.defense],
            )
    ax.set(xlabel="epoch", ylabel="variance of members' cross-entropy", yscale="log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no training log (a supplied target)", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    return fig


def plot_evaluations(scores, agg: Aggregate, results: list[DefenseResult], evaluation_attack: dict):
    """Per defense (first seed): the pooled leave-one-out ROC of its strongest attack on random records, on
    canaries and on the most vulnerable records (measured on the models that did not choose them)."""
    plt = _plt()
    first = {}
    for r in sorted(results, key=lambda r: r.seed, reverse=True):
        first[r.defense] = r
    chosen = [first[row.defense] for row in agg.rows if row.defense in first and first[row.defense].evaluations]
    if not chosen:
        return None
    cols = min(3, len(chosen))
    rows = math.ceil(len(chosen) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.3 * cols, 3.6 * rows), squeeze=False)
    lowest = 1.0
    for ax, r in zip(axes.flat, chosen, strict=False):
        s = scores(r)
        attack = evaluation_attack[r.defense]
        if f"loo_{attack}" not in s:
            ax.axis("off")
            continue
        loo, masks = s[f"loo_{attack}"], s["masks"]
        canary = s.get("is_canary", np.zeros(masks.shape[1], bool))
        groups = {"random records": (np.nonzero(~canary)[0], np.arange(masks.shape[0]))}
        if canary.any():
            groups["canaries"] = (np.nonzero(canary)[0], np.arange(masks.shape[0]))
        if "vulnerable_records" in s:
            groups["most vulnerable 5%"] = (s["vulnerable_records"], s["vulnerable_models"])
        for (label, (recs, mods)), color in zip(groups.items(), ("#1f77b4", "#d62728", "#9467bd"), strict=False):
            sc, mm = loo[np.ix_(mods, recs)].ravel(), masks[np.ix_(mods, recs)].ravel()
            if mm.all() or not mm.any():
                continue
            curve = roc_curve(sc, mm)
            keep = curve.fpr > 0
            n_neg = int((~mm).sum())
            lowest = min(lowest, 1 / n_neg)
            ax.plot(
                *_thin_steps(curve.fpr[keep], np.maximum(curve.tpr[keep], 1e-4)),
                drawstyle="steps-post",
                color=color,
                label=f"{label} ({n_neg} non-member pairs)",
            )
        ax.plot([1e-4, 1], [1e-4, 1], color="grey", ls=":", lw=0.8)
        _roc_axes(ax)
        ax.set(
            title=f"{r.defense}: {attack}, pooled leave-one-out (seed {r.seed})",
            xlabel="false-positive rate",
            ylabel="true-positive rate",
            ylim=(1e-3, 1.05),
        )
        ax.title.set_fontsize(9)
        ax.legend(fontsize=6, loc="lower right")
    for ax in axes.flat:
        if ax.has_data():
            ax.set_xlim(lowest, 1)
    for ax in list(axes.flat)[len(chosen) :]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def _fit_mean(results: list[DefenseResult], defense: str, scale: str, key: str) -> float:
    vals = [r.gaussian_fits.get(scale, {}).get(key) for r in results if r.defense == defense]
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else math.nan


def plot_gaussian_model(agg: Aggregate, results: list[DefenseResult]):
    """The Gaussian model's predicted advantage (fitted on the cross-entropy, and on the logit-scaled
    confidence) next to the measured loss-attack advantage; means over seeds."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 3.9))
    labels = [r.defense for r in agg.rows]
    x = np.arange(len(labels))
    measured = [r.metric("loss", "advantage")[0] if "loss" in r.attacks else math.nan for r in agg.rows]
    on_loss = [_fit_mean(results, d, "loss", "advantage") for d in labels]
    on_logit = [_fit_mean(results, d, "logit", "advantage") for d in labels]
    ax.bar(x - 0.27, measured, 0.27, label="measured (loss attack)", color="black")
    ax.bar(x, on_loss, 0.27, label="Gaussian fit on the cross-entropy (paper)", color="#ff7f0e")
    ax.bar(x + 0.27, on_logit, 0.27, label="Gaussian fit on logit confidence", color="#2ca02c")
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
    ax.set(ylabel="membership advantage (best threshold)")
    qq = min((_fit_mean(results, d, "loss", "qq_member") for d in labels), default=math.nan)
    if not math.isnan(qq) and qq < 0.98:
        ax.set_title(f"members' cross-entropy is far from Gaussian (QQ correlation down to {qq:.2f})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    write_bytes(path, buf.getvalue())
    return base64.b64encode(buf.getvalue()).decode()


# ----------------------------------------------------------------------------------------------------------
# HTML
# ----------------------------------------------------------------------------------------------------------
def _isnan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _fmt(v: Any, std: Any = None, pct: bool = False) -> str:
    if _isnan(v):
        return "n/a"
    scale = 100 if pct else 1
    text = f"{v * scale:.1f}" if pct else f"{v:.3f}"
    if not _isnan(std) and std:
        text += f" ± {std * scale:.1f}" if pct else f" ± {std:.3f}"
    return text


def _delta(v: float, ci: tuple[float, float], pct: bool) -> str:
    if _isnan(v):
        return "n/a"
    scale, digits = (100, 1) if pct else (1, 3)
    unit = " pp" if pct else ""
    text = f"{v * scale:+.{digits}f}{unit}"
    if not (_isnan(ci[0]) or _isnan(ci[1])):
        text += f" [{ci[0] * scale:+.{digits}f}, {ci[1] * scale:+.{digits}f}]"
    return text


def _headline_html(h: Headline) -> str:
    pct = f"{100 * h.fpr:g}%"
    if h.baseline is None:
        return "<p>No <code>ce</code> baseline in this run: defenses are not compared with it.</p>"
    b = h.baseline_values
    rows = [
        f"<tr><td>{html.escape(h.baseline)} (baseline)</td><td>{html.escape(h.baseline_attack or '')}</td>"
        f"<td>{_fmt(b['accuracy'], pct=True)}</td><td>{_fmt(b['auc'])}</td><td>{_fmt(b['tpr'], pct=True)}</td>"
        "<td></td></tr>"
    ]
    for c in h.comparisons:
        rows.append(
            f"<tr><td>{html.escape(c.defense)}</td><td>{html.escape(c.attack)}</td>"
            f"<td>{_fmt(c.accuracy, pct=True)} ({_delta(c.accuracy_delta, c.accuracy_delta_ci, True)})</td>"
            f"<td>{_fmt(c.auc)} ({_delta(c.auc_delta, c.auc_delta_ci, False)})</td>"
            f"<td>{_fmt(c.tpr, pct=True)} ({_delta(c.tpr_delta, c.tpr_delta_ci, True)})</td>"
            f"<td class=v-{_verdict_class(c)}>{html.escape(c.verdict)}</td></tr>"
        )
    which = (
        "the leave-one-out evaluation (every model as the target, pooled)"
        if h.evaluation == "pooled"
        else "the single-target evaluation"
    )
    words = "".join(f"<li>{html.escape(sentence)}</li>" for sentence in h.sentences)
    if not h.comparisons:  # the baseline alone: nothing to compare, no intervals to speak of
        head = "<tr><th>defense</th><th>strongest attack</th><th>test acc %</th><th>AUC</th>"
        return f"<ul class=words>{words}</ul><table>{head}<th>TPR@{pct}FPR %</th><th></th></tr>{rows[0]}</table>"
    return (
        f"<ul class=words>{words}</ul>"
        f"<p>From {which}: each defense against <code>{html.escape(h.baseline)}</code> under the attack that is "
        f"strongest against it (highest AUC): change in test accuracy, in AUC and in TPR at {pct} FPR, with 95% "
        f"intervals ({html.escape(h.method)}). A change counts when its whole interval lies beyond the practical "
        "threshold (--min-effect; default AUC 0.01, 1 point of accuracy, 1 point of TPR).</p>"
        "<table><tr><th>defense</th><th>strongest attack</th><th>test acc % (change)</th><th>AUC (change)</th>"
        f"<th>TPR@{pct}FPR % (change)</th><th>against {html.escape(h.baseline)}</th></tr>" + "".join(rows) + "</table>"
    )


def _access_html(h: Headline) -> str:
    """Each defense's strongest attack at each level of access (labels only, scores, weights) and the weakest
    level that breaks it; nothing when every attack of the run reads scores."""
    levels = [lv for lv in ("labels", "scores", "weights") if any(lv in v for v in h.by_access.values())]
    if levels in ([], ["scores"]):
        return ""
    pct = f"{100 * h.fpr:g}%"
    head = "".join(f"<th>{html.escape(ACCESS_WORDS[lv])}: attack, AUC, TPR@{pct}FPR %</th>" for lv in levels)
    rows = []
    for defense, by in h.by_access.items():
        cells = "".join(
            f"<td>{html.escape(by[lv]['attack'])}, {_fmt(by[lv]['auc'])}, {_fmt(by[lv]['tpr'], pct=True)}</td>"
            if lv in by
            else "<td></td>"
            for lv in levels
        )
        broken = ACCESS_WORDS.get(h.broken_at.get(defense, ""), "not broken")
        rows.append(f"<tr><td>{html.escape(defense)}</td>{cells}<td>{html.escape(broken)}</td></tr>")
    return (
        "<p>The strongest attack at each level of access to the target, and the weakest level that breaks each "
        f"defense (a TPR at {pct} FPR beyond the FPR by the practical threshold).</p>"
        f"<table><tr><th>defense</th>{head}<th>broken</th></tr>{''.join(rows)}</table>"
    )


def _verdict_class(c) -> str:
    """The verdict cell's colour: green when it leaks less, red when more, grey with no measurable effect."""
    if c.no_effect:
        return "none"
    return {"less": "less", "more": "more", "mixed": "more"}.get(c.leakage, "cost")


def _evaluations_table(agg: Aggregate, evaluation_attack: dict, present: list[str]) -> str:
    """One row per defense under its strongest attack: AUC, the resolvable TPRs and the epsilon bound of each
    evaluation in `present`."""
    # per evaluation, the FPRs some defense resolves (an all-n/a column says nothing)
    shown = {
        e: [
            f
            for f in agg.fprs
            if any(not math.isnan(r.metric(evaluation_attack[r.defense], tpr_key(f), e)[0]) for r in agg.rows)
        ]
        for e in present
    }
    has_eps = {
        e: any(not math.isnan(r.metric(evaluation_attack[r.defense], "epsilon_lb", e)[0]) for r in agg.rows)
        for e in present
    }
    dp = "target" in present and any("dp_epsilon" in r.values for r in agg.rows)  # once, in the first table
    head = ("<th rowspan=2>ε spent (DP-SGD)</th>" if dp else "") + "".join(
        f"<th colspan={1 + len(shown[e]) + has_eps[e]}>{html.escape(EVALUATIONS[e])}</th>" for e in present
    )
    sub = "".join(
        "<th>AUC</th>"
        + "".join(f"<th>TPR@{100 * f:g}%</th>" for f in shown[e])
        + ("<th>ε lower bound (approx.)</th>" if has_eps[e] else "")
        for e in present
    )
    rows = []
    for r in agg.rows:
        attack = evaluation_attack[r.defense]
        cells = [html.escape(r.defense), html.escape(attack)]
        if dp:
            cells.append(f"{r.values['dp_epsilon']:.2f}" if "dp_epsilon" in r.values else "")
        for e in present:
            cells.append(_fmt(*r.metric(attack, "auc", e)[:2]))
            cells += [_fmt(*r.metric(attack, tpr_key(f), e)[:2], pct=True) for f in shown[e]]
            eps = r.metric(attack, "epsilon_lb", e)[0]
            if has_eps[e]:
                cells.append("" if math.isnan(eps) else f"{eps:.2f}")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return (
        f"<div class=wide><table><tr><th rowspan=2>defense</th><th rowspan=2>attack</th>{head}</tr><tr>{sub}</tr>"
        + "".join(rows)
        + "</table></div>"
    )


#: Evaluations side by side in one table of the worst-case section: more would be wider than a 1400 px window.
EVALUATIONS_PER_TABLE = 2


def _evaluations_tables(agg: Aggregate, evaluation_attack: dict, present: list[str]) -> str:
    """`_evaluations_table` for the evaluations in `present`, `EVALUATIONS_PER_TABLE` at a time."""
    step = EVALUATIONS_PER_TABLE
    groups = [present[i : i + step] for i in range(0, len(present), step)]
    return "".join(_evaluations_table(agg, evaluation_attack, group) for group in groups)


def _one_run_html(evaluation_attack: dict, results: list[DefenseResult]) -> str:
    """The rigorous bound: the one-run audit of the first seed's canaries, where the run has one."""
    one_run = [
        (r.defense, a, m["one_run_epsilon_lb"])
        for r in results
        if r.seed == min(x.seed for x in results)
        for a, m in r.evaluations.get("canaries", {}).items()
        if m.get("one_run_epsilon_lb") is not None and a == evaluation_attack.get(r.defense)
    ]
    if not one_run:
        return ""
    return (
        "<p>Rigorous bound: the one-run audit on the target's canaries (Steinke, Nasr and Jagielski, NeurIPS "
        "2023, for (ε, 1e-5)-DP with their δ term; the attacker guesses IN for the top tenth and OUT for the "
        "bottom tenth of the canaries by score; 95% confidence; first seed): "
        + ", ".join(f"{html.escape(d)} ({html.escape(a)}) ε ≥ {e:.2f}" for d, a, e in one_run)
        + ".</p>"
    )


def _vulnerable_html(agg: Aggregate, results: list[DefenseResult]) -> str:
    """The first seed's most vulnerable records of each defense."""
    vulnerable = []
    order = {row.defense: i for i, row in enumerate(agg.rows)}
    for r in sorted(results, key=lambda r: (r.seed, order.get(r.defense, 0))):
        if r.vulnerable_records and r.seed == min(x.seed for x in results):
            top = ", ".join(
                f"#{v['record']} (label {v['label']}, {v['leakage']:.2f})" for v in r.vulnerable_records[:8]
            )
            vulnerable.append(f"<tr><td>{html.escape(r.defense)}</td><td style='text-align:left'>{top}</td></tr>")
    if not vulnerable:
        return ""
    return (
        "<p>The most vulnerable records (first seed): dataset index, label and leakage (mean leave-one-out score "
        "of the models that trained on the record minus that of the models that did not), chosen on half of the "
        "models; their metrics above are measured on the other half.</p><table><tr><th>defense</th>"
        "<th>records, most vulnerable first</th></tr>" + "".join(vulnerable) + "</table>"
    )


def _why_single_target(config: dict) -> str:
    """Why a run has no leave-one-out evaluation, from its configuration."""
    if config.get("target_checkpoint") or config.get("target_logits"):
        return (
            "the target was trained elsewhere, so its reference models follow the stated recipe, not necessarily "
            "the target's: they are not evaluated as targets"
        )
    if config.get("leave_one_out") is False:
        return "it was turned off (--leave-one-out off)"
    return f"it needs at least 4 reference models; this run has {config.get('num_references')}"


def _evaluations_html(agg: Aggregate, evaluation_attack: dict, results: list[DefenseResult], config: dict) -> str:
    # the most vulnerable 1% is in metrics.json and the exports: a handful of records per seed
    present = [e for e in agg.evaluations if e != "vulnerable_1pct"]
    if present == ["target"]:
        return f"<p>Only the single-target evaluation ran: {html.escape(_why_single_target(config))}.</p>"
    pairs = next((r.evaluations["pooled"][a] for r in results for a in r.evaluations.get("pooled", {})), None)
    pairs_text = (
        f" Per seed, the pooled evaluation has {pairs['n_pairs']:,} (model, record) pairs from {pairs['n_models']} "
        f"models, {pairs['n_nonmembers']:,} of them non-members."
        if pairs
        else ""
    )
    return (
        "<p>Random records understate what a defense must protect (Aerni, Zhang and Tramèr, CCS 2024). Each "
        "model in turn is the target and the others are its references; pooling the (model, record) pairs "
        "resolves low FPRs. Canaries are records planted in half the models' training sets. Intervals: "
        f"bootstrap over models and records.{pairs_text} Each row uses the defense's strongest attack. The ε lower "
        "bound: no (ε, 1e-5)-DP training algorithm with a smaller ε lets an attack do as well as this one's best "
        "threshold (95% confidence; threshold chosen on one half of the pairs, Clopper-Pearson bounds on the "
        "other). These bounds are approximate: they treat the pairs as independent trials, which the pairs of one "
        "model (the single target) or of one record across models (the pooled evaluations) are not. Only the "
        "one-run audit on canaries below, when the run has 50 canaries or more, is rigorous. Each target's "
        "references never include a model whose training set is the complement of its own, so their "
        "membership tells the attack nothing about the target's.</p>"
        + _evaluations_tables(agg, evaluation_attack, present)
        + _one_run_html(evaluation_attack, results)
        + _vulnerable_html(agg, results)
    )


def _verdicts_html(label: str, verdicts: dict[str, str]) -> str:
    if not verdicts:
        return ""
    on = [f for f, v in verdicts.items() if v.startswith("on the frontier")]
    sentence = (
        f"By {html.escape(label)}, the frontier is held by {', '.join(html.escape(f) for f in on)}."
        if on
        else "No family holds the frontier alone."
    )
    items = "".join(f"<li><b>{html.escape(f)}</b>: {html.escape(v)}</li>" for f, v in verdicts.items())
    return f"<p>{sentence} Per defense family (all its settings in this run):</p><ul>{items}</ul>"


def _gaussian_table(agg: Aggregate, results: list[DefenseResult]) -> str:
    rows = []
    for r in agg.rows:
        cells = [html.escape(r.defense), _fmt(r.metric("loss", "advantage")[0] if "loss" in r.attacks else None)]
        for scale in ("loss", "logit"):
            g = {
                k: _fit_mean(results, r.defense, scale, k)
                for k in (
                    "member_mean",
                    "member_std",
                    "nonmember_mean",
                    "nonmember_std",
                    "advantage",
                    "fpr",
                    "qq_member",
                    "qq_nonmember",
                )
            }
            cells += [
                f"{g['member_mean']:.3g} / {g['member_std']:.3g}",
                f"{g['nonmember_mean']:.3g} / {g['nonmember_std']:.3g}",
                f"{_fmt(g['advantage'])} at {100 * g['fpr']:.1f}%",
                f"{g['qq_member']:.2f} / {g['qq_nonmember']:.2f}",
            ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th colspan=4>fitted on {s}</th>" for s in ("the cross-entropy", "phi = -log(p/(1-p))"))
    cells = ("members mean / std", "non-members mean / std", "predicted advantage at FPR", "QQ r members / non-members")
    sub = "".join(f"<th>{c}</th>" for c in cells) * 2
    return (
        "<p>The paper models member and non-member losses as two Gaussians; the loss attack's best advantage then "
        "follows in closed form. The model is only as good as the fit: the QQ correlation r is 1 for exactly "
        "Gaussian data and below about 0.98 for visibly non-Gaussian data. Members' cross-entropies pile up near "
        "0, so the fit on the cross-entropy usually overstates the advantage; the logit-scaled confidence (a "
        "monotone transform: the same attack) is much closer to Gaussian. Means over seeds.</p>"
        f"<table><tr><th rowspan=2>defense</th><th rowspan=2>measured advantage</th>{head}</tr><tr>{sub}</tr>"
        + "".join(rows)
        + "</table>"
    )


def _single_target_tables(agg: Aggregate) -> tuple[str, str]:
    """The single-target evaluation's two tables (body rows only): the headline attacks, and every attack."""
    low, high = tpr_key(agg.fprs[0]), tpr_key(agg.fprs[-1])
    body = []
    for r in agg.rows:
        cells = [
            f"<td>{html.escape(r.defense)}</td>",
            f"<td>{_fmt(r.values['test_acc'], r.values['test_acc_std'], True)}</td>",
            f"<td>{_fmt(r.values['train_acc'], r.values['train_acc_std'], True)}</td>",
        ]
        for a in agg.headline_attacks:
            cells += [f"<td>{_fmt(*r.metric(a, 'auc')[:2])}</td>", f"<td>{_fmt(*r.metric(a, high)[:2], True)}</td>"]
        body.append("<tr>" + "".join(cells) + "</tr>")
    full = []  # every attack, one row per (defense, attack)
    for r in agg.rows:
        for i, a in enumerate(agg.attacks):
            name = f"<td rowspan={len(agg.attacks)}>{html.escape(r.defense)}</td>" if i == 0 else ""
            full.append(
                f"<tr>{name}<td>{html.escape(a)}</td><td>{_fmt(*r.metric(a, 'auc')[:2])}</td>"
                f"<td>{_fmt(*r.metric(a, 'advantage')[:2])}</td>"
                f"<td>{_fmt(*r.metric(a, low)[:2], True)}</td>"
                f"<td>{_fmt(*r.metric(a, high)[:2], True)}</td></tr>"
            )
    return "".join(body), "".join(full)


def _tune_html(layout: RunLayout) -> str:
    """`ccl tune`'s question and answer, when the run is a tuning run: the target, the chosen setting, and every
    setting tried in the order of the parameter."""
    if not layout.tune.is_file():
        return ""
    tune = json.loads(layout.tune.read_text())
    chosen = tune.get("chosen")
    answer = (
        f"chosen: <b>{html.escape(chosen['defense'])}</b>, the most accurate setting whose leakage's upper bound "
        f"meets the target ({100 * chosen['accuracy']:.1f}% test accuracy)"
        if chosen
        else "no setting in the range meets the target"
    )
    rows = "".join(
        f"<tr><td>{html.escape(p['defense'])}</td><td>{100 * p['accuracy']:.1f}</td><td>{p['leakage']:.4f}</td>"
        f"<td>{p['upper']:.4f}</td><td>{html.escape(p['attack'])}</td></tr>"
        for p in sorted(tune.get("points", []), key=lambda p: p["value"])
    )
    return (
        f"<h2>Tune</h2><p>Target: <code>{html.escape(tune['target'])}</code> over {html.escape(tune['param'])} in "
        f"{tune['range']}; {answer}.</p><table><tr><th>setting</th><th>test acc %</th><th>leakage</th>"
        f"<th>upper bound</th><th>attack</th></tr>{rows}</table>"
    )


def _notes_html(results: list[DefenseResult]) -> str:
    """What a reader must know before the numbers (every result's notes, once each)."""
    notes = sorted({n for r in results for n in r.notes})
    if not notes:
        return ""
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return f"<div class=notes><b>Read with care:</b><ul>{items}</ul></div>"


def _recipes_html(results: list[DefenseResult]) -> str:
    """Each defense's own recipe, and where it was chosen on the reserve, every candidate's accuracy there."""
    rows = []
    for r in sorted(results, key=lambda r: (r.defense, r.seed)):
        own = r.spec.get("train") or {}
        if not own:
            continue
        sel = r.selection or {}
        text = choice_text(sel) if sel else recipe_text
        cands = "; ".join(
            ("<b>" if c["train"] == sel.get("chosen") else "")
            + f"{html.escape(text(c['train']))}: {_fmt(c['accuracy'], pct=True)}%"
            + ("</b>" if c["train"] == sel.get("chosen") else "")
            for c in sel.get("candidates", [])
        )
        chosen = recipe_text(sel["chosen"]) if sel else recipe_text(own)
        where = f" ({sel['records']} records)" if sel else ""
        rows.append(
            f"<tr><td>{html.escape(r.defense)}</td><td>{r.seed}</td><td>{html.escape(chosen)}</td>"
            f"<td style='text-align:left'>{cands or 'no choice'}{where}</td></tr>"
        )
    if not rows:
        return ""
    return (
        "<h2>Recipes of their own</h2><p class=cap>These defenses train (target and reference models alike) with "
        "the experiment's recipe changed as shown. Where a key lists several values, each candidate target trained "
        "on the target's members and the most accurate on the defender's reserve (records no audited model trains "
        "on) was kept; then its reference models trained with it.</p><table><tr><th>defense</th><th>seed</th>"
        "<th>recipe used</th><th>candidates: accuracy on the reserve (chosen in bold)</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _protocol_html(config: dict, results: list[DefenseResult], seeds: list[int]) -> str:
    """The audit's protocol in one paragraph: data, model, members, population, reserve, references, queries."""
    first = results[0]
    queries = "original + flipped" if config.get("flip_queries") else "without augmentation"
    share = config.get("reserve_fraction") or 0
    reserve = (
        f"{100 * share:g}% of the records kept as the defender's reserve (never audited or queried; the defenses "
        "that learn from non-audited data use it, target and references alike), "
        if share
        else ""
    )
    return (
        f"Dataset <b>{html.escape(str(config['dataset']))}</b>, model <b>{html.escape(str(config['model']))}</b>, "
        f"{first.num_members} members and {first.num_nonmembers} non-members audited per target "
        f"(disjoint, balanced), {first.num_population} population records never trained on, "
        f"{reserve}"
        f"{first.num_references} reference models per target trained with the target's defense and recipe (the "
        f"attacker knows both), seeds {seeds}. Queries {queries}. Test accuracy is measured on records the target "
        f"never trained on. TPR at an FPR is n/a when fewer than 1/FPR non-members are audited."
    )


def _html(
    run_dir: Path,
    evaluation_attack: dict,
    agg: Aggregate,
    results: list[DefenseResult],
    images,
    config: dict,
    run_info: dict,
    head: Headline,
    frontier_info: tuple[str, dict[str, str]],
) -> str:
    seeds = sorted({r.seed for r in results})
    spread = "mean ± std over seeds" if len(seeds) > 1 else "one seed; 95% bootstrap intervals in metrics.json"
    lo_txt, hi_txt = f"{100 * agg.fprs[0]:g}%", f"{100 * agg.fprs[-1]:g}%"
    th = "".join(f"<th colspan=2>{html.escape(a)}</th>" for a in agg.headline_attacks)
    sub = "".join(f"<th>AUC</th><th>TPR@{hi_txt}FPR %</th>" for _ in agg.headline_attacks)
    body, full = _single_target_tables(agg)
    figs = "".join(
        f"<h2>{html.escape(t)}</h2><p class=cap>{html.escape(c)}</p><img alt='{n}' src='data:image/png;base64,{b}'>"
        + (_gaussian_table(agg, results) if n == "gaussian_model" else "")
        for n, t, c, b in images
    )
    notes_html, protocol = _notes_html(results), _protocol_html(config, results, seeds)
    unfinished = unfinished_note(run_dir)
    if unfinished is not None:
        notes_html = f"<div class=notes><b>{html.escape(unfinished)}</b></div>" + notes_html
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>ccl report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1300px;color:#222}}table{{border-collapse:collapse;
font-size:13px;margin:0.5em 0}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}}
td:first-child{{text-align:left;white-space:normal;overflow-wrap:anywhere;max-width:20em}}img{{max-width:100%}}pre{{background:#f6f6f6;padding:1em;font-size:12px;
overflow:auto}}.v-less{{background:#d4f0d4;font-weight:bold}}.v-more{{background:#f8d0d0;font-weight:bold}}
.v-none{{color:#777}}.v-cost{{background:#fdf0c5}}.words li{{margin:0.2em 0}}
.notes{{background:#fff4d6;padding:0.5em 1em;border-left:4px solid #e0a800}}
.cap{{color:#555;font-size:13px;max-width:900px}}.wide{{overflow-x:auto}}
</style></head><body>
<h1>Privacy-utility report</h1>
<p>{protocol}</p>
{notes_html}
{_tune_html(RunLayout(run_dir))}
<h2>Headline</h2>
{_headline_html(head)}{_access_html(head)}
{_verdicts_html(*frontier_info)}
{_recipes_html(results)}
<h2>Worst-case evaluation</h2>
{_evaluations_html(agg, evaluation_attack, results, config)}
<h2>Table: {EVALUATIONS["target"]} ({spread})</h2>
<table><tr><th rowspan=2>defense</th><th rowspan=2>test acc %</th><th rowspan=2>train acc %</th>{th}</tr>
<tr>{sub}</tr>{body}</table>
{figs}
<h2>Every attack: {EVALUATIONS["target"]} ({spread})</h2>
<table><tr><th>defense</th><th>attack</th><th>AUC</th><th>advantage</th>
<th>TPR@{lo_txt}FPR %</th><th>TPR@{hi_txt}FPR %</th></tr>
{full}</table>
<h2>Configuration</h2><pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre>
<h2>Run</h2><pre>{html.escape(json.dumps(run_info, indent=2))}</pre>
</body></html>
"""


def _load_run(run_dir: Path) -> tuple[dict, list[DefenseResult], Aggregate]:
    """The run's config, its completed results and their aggregate (computed here, not written, for a run
    that has not finished)."""
    layout = RunLayout(run_dir)
    if not layout.config.is_file():
        raise RunDirectoryError(f"{run_dir} is not a ccl run directory (no config.yaml).")
    try:
        config = yaml.safe_load(layout.config.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a mapping")
    except (yaml.YAMLError, ValueError, UnicodeDecodeError) as err:
        raise RunDirectoryError(f"{layout.config} is corrupt ({type(err).__name__}).") from None
    results = load_results(run_dir)
    if not results:
        raise RunDirectoryError(
            f"{run_dir} holds no completed audit results: `ccl report` renders runs of `ccl audit`, `compare` "
            "and `demo`; resume an unfinished one first (--resume)."
        )
    try:
        agg = load_aggregate(run_dir)  # what the pipeline wrote
    except RunDirectoryError:  # an unfinished run: its completed results, aggregated here (nothing is written)
        agg = aggregate(results, fprs=results[0].fprs)
    return config, results, agg


def unfinished_note(run_dir: str | os.PathLike) -> str | None:
    """None for a finished run; for a run stopped mid-way (killed, interrupted, or resumed with more work), which
    (defense, seed) results its config.yaml asks for and are missing, and how to finish it."""
    config, results, _ = _load_run(Path(run_dir))

    def label(d: dict) -> str:  # a config.yaml entry's label, as the run wrote it
        return defense_label(d.get("name", d.get("loss")), dict(d.get("params") or {}), dict(d.get("train") or {}))

    try:
        wanted = [
            (label(d), int(s))
            for d in config.get("defenses") or []
            for s in config.get("seeds") or []
        ]
    except (TypeError, KeyError, ValueError):  # a config.yaml from another version: nothing to compare
        return None
    done = {(r.defense, r.seed) for r in results}
    missing = [w for w in wanted if w not in done]
    if not missing:
        return None
    shown = ", ".join(f"{d} seed {s}" for d, s in missing[:4]) + (", ..." if len(missing) > 4 else "")
    return (
        f"This run is unfinished: {len(wanted) - len(missing)} of {len(wanted)} results (defense x seed) are complete; "
        f"missing: {shown}. The report shows only the complete ones; finish the run with --resume --out {run_dir}."
    )


def render_report(run_dir: str | os.PathLike, *, leakage: str = "tpr") -> Path:
    """Draws the plots and writes `report.html` (self-contained); returns its path. `leakage` is the frontier's
    leakage axis: "tpr" (TPR at the lowest resolvable FPR), "auc" or "epsilon_lb"."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    config, results, agg = _load_run(run_dir)
    run_info = json.loads(layout.invocations.read_text()) if layout.invocations.exists() else {}
    summary = load_summary(run_dir)  # the pipeline's summary step; computed here for older or unfinished runs
    if summary is None or summary.leakage != leakage:
        summary = summarize(run_dir, agg, results, leakage=leakage)
    head, fpoints, frontier_label = summary.headline, summary.points, summary.frontier_label
    optimal, verdicts = set(summary.optimal), summary.verdicts
    scores = _scores_of(run_dir)
    evaluation_attack = {r.defense: strongest_attack(agg, r.defense, head.evaluation) for r in agg.rows}
    muted = {c.defense for c in head.comparisons if c.no_effect}  # faint on the frontier plot
    colors = _colors(agg)
    seeds = sorted({r.seed for r in results})
    one = len(seeds) == 1
    figures = [
        (
            "roc",
            f"ROC curves (log-log), per attack: {EVALUATIONS['target']}",
            f"Every seed's target against its reference models ({', '.join(map(str, seeds))}), one colour per "
            "defense. The FPR axis starts at 1/(non-members audited), the finest rate this evaluation resolves.",
            plot_roc(scores, agg, results, colors),
        ),
        (
            "frontier",
            "The privacy-utility frontier",
            f"Leakage: {frontier_label}. Each family's settings joined by a line; ringed points are on the frontier "
            "(no other point has both more accuracy and less leakage); faint points: no measurable effect against "
            "the baseline; "
            + ("bars: std over seeds." if not one else "bars: 95% intervals (bootstrap; accuracy: normal)."),
            plot_frontier(fpoints, frontier_label, colors, optimal, muted),
        ),
        (
            "privacy_utility",
            f"Privacy-utility trade-off, per leakage measure: {EVALUATIONS[head.evaluation]}",
            "Up and to the left is better. Each defense is placed by its strongest attack. "
            + ("One seed: horizontal bars are 95% bootstrap intervals." if one else "Bars: std over seeds."),
            plot_privacy_utility(agg, colors, head.frontier, head.fpr, head.evaluation),
        ),
        (
            "evaluations",
            "Pooled leave-one-out: random records, canaries and the most vulnerable records",
            "Pooled leave-one-out ROC of each defense's strongest attack (first seed). The most vulnerable records "
            "are measured on the models that did not choose them.",
            plot_evaluations(scores, agg, results, evaluation_attack),
        ),
        (
            "loss_histograms",
            "Members' and non-members' loss, per defense",
            "The target's cross-entropy on its members and non-members (first seed), on one shared axis.",
            plot_loss_histograms(scores, agg, results),
        ),
        (
            "loss_variance",
            "Variance of the members' training loss per epoch",
            "The CCL paper's mechanism: a concave term keeps this variance up (target of the first seed).",
            plot_loss_variance(agg, results, colors),
        ),
        (
            "gaussian_model",
            "Gaussian model of the loss attack vs measurement",
            "The closed-form advantage of two fitted Gaussians against the measured loss-attack advantage.",
            plot_gaussian_model(agg, results),
        ),
    ]
    images = [(n, t, c, _save(fig, layout.plot(n))) for n, t, c, fig in figures if fig is not None]
    page = _html(run_dir, evaluation_attack, agg, results, images, config, run_info, head, (frontier_label, verdicts))
    write_text(layout.report, page)
    return layout.report
