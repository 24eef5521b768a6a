"""The headline of a run, computed from its results: each defense against the CE baseline, and the frontier.

The headline reads the leave-one-out pooled evaluation when the run has one (every model as the target, see
`ccl.evaluation`), else the single-target one, and says which. For every defense, its *strongest attack* is
the attack with the highest mean AUC against it (the worst case among those run), and it has one at each level
of access the run audits (`strongest_by_access`: predicted labels only, released scores, the weights); the
headline names, per defense, the weakest level whose strongest attack breaks it (`broken_at`). The headline compares
the defense with the baseline (`ce`) under that attack on three numbers: test accuracy, AUC, and TPR at the
lowest configured FPR that every result can resolve. Each difference comes with a 95% interval:
- with two or more seeds shared by both, a paired t-interval over seeds (each seed has its own split and
  models, so it covers training noise and the choice of records);
- with one seed, a paired bootstrap (the same resamples for both defenses): over records for the single-target
  evaluation (members and non-members resampled separately), over models and records for the pooled one; it
  covers the choice of records (and models) only.
A defense is *distinguishable* from the baseline when one of the three intervals excludes 0; its *verdict*
(`judge`) asks more: it leaks less (or more) when the interval of the AUC change or of the TPR change lies wholly
beyond a practical threshold (`MIN_EFFECT`, `--min-effect`), and it costs (or gains) accuracy likewise; a setting
with neither is "no measurable effect" and is never a frontier point, nor is one flagged as having learnt
nothing or never acted (models bit-identical to the baseline's).

The privacy-utility frontier holds the defenses that no other defense beats on both axes: test accuracy (higher
is better) and the strongest attack's AUC (lower is better), by their means.

`summarize` is the pipeline's step between the results and the report: it computes the headline, the frontier
and the verdicts once, and the pipeline saves them in `metrics.json` under "summary"; the report, the exports
and the terminal only render them (`load_summary`, `summary_lines`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RunDirectoryError
from .layout import RunLayout
from .metrics import DegenerateMetricWarning, roc_metrics, tpr_key
from .results import Aggregate, DefenseResult, load_scores
from .training import recipe_text

__all__ = [
    "Comparison",
    "Headline",
    "Summary",
    "access_sentences",
    "access_table",
    "broken_at",
    "frontier",
    "headline",
    "load_summary",
    "strongest_attack",
    "strongest_by_access",
    "summarize",
    "summary_lines",
]

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal 1.96).
_T95 = [
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
]


@dataclass
class Comparison:
    """One defense against the baseline under the defense's strongest attack (differences: defense - baseline)."""

    defense: str
    attack: str
    accuracy: float
    auc: float
    tpr: float
    accuracy_delta: float
    auc_delta: float
    tpr_delta: float
    accuracy_delta_ci: tuple[float, float]
    auc_delta_ci: tuple[float, float]
    tpr_delta_ci: tuple[float, float]

    leakage: str = ""  # against the baseline: "less", "more", "indistinguishable" or "mixed" (see `verdicts`)
    cost: str = ""  # "costs accuracy", "gains accuracy" or "indistinguishable accuracy"
    flags: list[str] = dataclasses.field(default_factory=list)  # "never acted", "learnt nothing"

    @property
    def distinguishable(self) -> bool:
        return any(lo > 0 or hi < 0 for lo, hi in (self.accuracy_delta_ci, self.auc_delta_ci, self.tpr_delta_ci))

    @property
    def no_effect(self) -> bool:
        """Indistinguishable from the baseline on both axes, or flagged: never a frontier point."""
        return bool(self.flags) or (self.leakage == "indistinguishable" and self.cost == "indistinguishable accuracy")

    @property
    def verdict(self) -> str:
        """The comparison in words: a flag, "no measurable effect", or how it leaks and what it costs."""
        if "never acted" in self.flags:
            return "never acted: its models equal the baseline's"
        if "learnt nothing" in self.flags:
            return "learnt nothing: its accuracy is at the majority-class rate"
        if self.no_effect:
            return "no measurable effect"
        leaks = {"indistinguishable": "leaks indistinguishably", "mixed": "leaks less by one measure, more by another"}
        return f"{leaks.get(self.leakage, 'leaks ' + self.leakage)}, {self.cost}"


#: The smallest changes that count as an effect against the baseline: an AUC change of 0.01, 1 point of accuracy
#: and 1 point of TPR. A change counts when its whole 95% interval lies beyond the threshold (`--min-effect`).
MIN_EFFECT = {"auc": 0.01, "accuracy": 1.0, "tpr": 1.0}


def _direction(ci: tuple[float, float], threshold: float) -> int:
    """+1 when the interval lies above `threshold`, -1 below `-threshold`, 0 otherwise (or undefined)."""
    lo, hi = ci
    if math.isnan(lo) or math.isnan(hi):
        return 0
    return 1 if lo > threshold else -1 if hi < -threshold else 0


def judge(c: Comparison, min_effect: dict[str, float] | None = None) -> Comparison:
    """Sets `c.leakage` and `c.cost` from its intervals and the practical thresholds (`MIN_EFFECT`, overridden by
    `min_effect`; accuracy and TPR in points): leakage by the AUC and the TPR of the strongest attack (less when
    one falls beyond its threshold and neither rises, mixed when one falls and the other rises)."""
    m = {**MIN_EFFECT, **(min_effect or {})}
    moves = {_direction(c.auc_delta_ci, m["auc"]), _direction(c.tpr_delta_ci, m["tpr"] / 100)} - {0}
    c.leakage = "mixed" if len(moves) == 2 else {-1: "less", 1: "more"}.get(next(iter(moves), 0), "indistinguishable")
    acc = _direction(c.accuracy_delta_ci, m["accuracy"] / 100)
    c.cost = {-1: "costs accuracy", 1: "gains accuracy"}.get(acc, "indistinguishable accuracy")
    return c


@dataclass
class Headline:
    baseline: str | None  # None: the run has no CE to compare with
    baseline_attack: str | None  # the strongest attack against the baseline
    baseline_values: dict[str, float]  # accuracy, auc, tpr of the baseline under its strongest attack
    fpr: float
    method: str  # how the intervals were computed
    evaluation: str  # "pooled" (leave-one-out) or "target"
    comparisons: list[Comparison]
    frontier: list[str]
    sentences: list[str] = dataclasses.field(default_factory=list)  # the headline in words (`headline_sentences`)
    lowest_fpr: float = math.nan  # the lowest FPR the run reports; `fpr` is higher when that one is not resolved
    # defense -> access level ("labels", "scores", "weights") -> {"attack", "auc", "tpr"} of its strongest attack
    by_access: dict[str, dict[str, dict[str, Any]]] = dataclasses.field(default_factory=dict)
    broken_at: dict[str, str] = dataclasses.field(default_factory=dict)  # defense -> weakest level that breaks it


def evaluation_of(agg: Aggregate) -> str:
    """ "pooled" when every defense has the leave-one-out evaluation, else "target" (`Aggregate.main_evaluation`)."""
    return agg.main_evaluation


def strongest_attack(agg: Aggregate, defense: str, evaluation: str | None = None) -> str:
    evaluation = evaluation or evaluation_of(agg)
    row = next(r for r in agg.rows if r.defense == defense)
    aucs = {a: row.metric(a, "auc", evaluation)[0] for a in row.evaluation(evaluation)}
    finite = {a: v for a, v in aucs.items() if not math.isnan(v)}
    return max(finite, key=finite.get) if finite else next(iter(aucs))


def strongest_by_access(agg: Aggregate, defense: str, evaluation: str | None = None) -> dict[str, str]:
    """{access level: the strongest attack (highest mean AUC) among those of that level}, for the levels of
    `ccl.attacks.ACCESS_LEVELS` (labels, scores, weights) that the run has an attack of, weakest first."""
    from .attacks import ACCESS_LEVELS, access_level

    evaluation = evaluation or evaluation_of(agg)
    row = next(r for r in agg.rows if r.defense == defense)
    out = {}
    for level in ACCESS_LEVELS:
        aucs = {a: row.metric(a, "auc", evaluation)[0] for a in row.evaluation(evaluation) if access_level(a) == level}
        finite = {a: v for a, v in aucs.items() if not math.isnan(v)}
        if aucs:
            out[level] = max(finite, key=finite.get) if finite else next(iter(aucs))
    return out


def access_table(agg: Aggregate, evaluation: str, fpr: float) -> dict[str, dict[str, dict[str, Any]]]:
    """defense -> access level -> {"attack", "auc", "tpr"}: each level's strongest attack and its AUC and TPR at
    `fpr` (means over seeds)."""
    out = {}
    for row in agg.rows:
        out[row.defense] = {
            level: {
                "attack": attack,
                "auc": row.metric(attack, "auc", evaluation)[0],
                "tpr": row.metric(attack, tpr_key(fpr), evaluation)[0],
            }
            for level, attack in strongest_by_access(agg, row.defense, evaluation).items()
        }
    return out


def broken_at(levels: dict[str, dict[str, Any]], fpr: float, min_effect: dict[str, float] | None = None) -> str:
    """The weakest access level whose strongest attack breaks the defense ("" when none does): it finds members
    beyond chance by the practical threshold, a TPR at `fpr` at least `fpr` plus `min_effect["tpr"]` points (or,
    where that TPR is not resolved, an AUC at least 0.5 plus `min_effect["auc"]`)."""
    m = {**MIN_EFFECT, **(min_effect or {})}
    for level, v in levels.items():
        tpr, auc = _num(v.get("tpr")), _num(v.get("auc"))
        if (tpr >= fpr + m["tpr"] / 100) if not math.isnan(tpr) else (auc >= 0.5 + m["auc"]):
            return level
    return ""


def _report_fpr(agg: Aggregate, evaluation: str) -> float:
    """The lowest configured FPR whose TPR every defense's attacks resolve (else the highest FPR)."""
    for fpr in sorted(agg.fprs):
        if all(
            not math.isnan(r.metric(a, tpr_key(fpr), evaluation)[0]) for r in agg.rows for a in r.evaluation(evaluation)
        ):
            return fpr
    return max(agg.fprs)


def frontier(points: dict[str, tuple[float, float]]) -> list[str]:
    """Labels of the Pareto-optimal points `{label: (accuracy, leakage)}` (more accuracy, less leakage), by
    leakage."""
    on = []
    for d, (acc, leak) in points.items():
        dominated = any(
            a2 >= acc and l2 <= leak and (a2 > acc or l2 < leak) for e, (a2, l2) in points.items() if e != d
        )
        if not dominated and not (math.isnan(acc) or math.isnan(leak)):
            on.append(d)
    return sorted(on, key=lambda d: points[d][1])


def _t_interval(diffs: np.ndarray) -> tuple[float, float]:
    n = diffs.size
    t = _T95[n - 2] if n - 2 < len(_T95) else 1.96
    half = t * diffs.std(ddof=1) / math.sqrt(n)
    return float(diffs.mean() - half), float(diffs.mean() + half)


def _bootstrap_deltas(
    a: dict[str, np.ndarray],
    b: dict[str, np.ndarray],
    attack: str,
    fpr: float,
    n_resamples: int,
    seed: int,
    evaluation: str,
) -> list[tuple[float, float]]:
    """Percentile intervals of (accuracy, AUC, TPR) differences a - b over paired resamples: of the records
    (single target), or of the models and the random records (pooled)."""
    rng = np.random.default_rng(seed)
    held = np.arange(a["heldout_correct"].size)
    values = np.empty((n_resamples, 3))
    pooled = evaluation == "pooled"
    if pooled:
        masks = a["masks"]
        records = np.nonzero(~a["is_canary"])[0] if "is_canary" in a else np.arange(masks.shape[1])
        sa, sb = a[f"loo_{attack}"], b[f"loo_{attack}"]
    else:
        keep = ~a["is_canary"] if "is_canary" in a else np.ones(a["is_member"].size, bool)
        m = a["is_member"][keep]
        sa, sb = a[f"score_{attack}"][keep], b[f"score_{attack}"][keep]
        pos, neg = np.nonzero(m)[0], np.nonzero(~m)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateMetricWarning)
        for i in range(n_resamples):
            if pooled:
                mi = rng.integers(0, masks.shape[0], masks.shape[0])
                ri = records[rng.integers(0, records.size, records.size)]
                mm = masks[np.ix_(mi, ri)].ravel()
                xa, xb = sa[np.ix_(mi, ri)].ravel(), sb[np.ix_(mi, ri)].ravel()
            else:
                idx = np.r_[rng.choice(pos, pos.size), rng.choice(neg, neg.size)]
                mm, xa, xb = m[idx], sa[idx], sb[idx]
            h = rng.choice(held, held.size)
            ra, rb = roc_metrics(xa, mm, [fpr]), roc_metrics(xb, mm, [fpr])  # [AUC, advantage, TPR]: one sort each
            values[i] = (
                a["heldout_correct"][h].mean() - b["heldout_correct"][h].mean(),
                ra[0] - rb[0],
                ra[2] - rb[2],
            )
    out = []
    for j in range(3):
        v = values[:, j]
        if np.isnan(v).all():
            out.append((math.nan, math.nan))
        else:
            lo, hi = np.nanpercentile(v, [2.5, 97.5])
            out.append((float(lo), float(hi)))
    return out


def _compare(
    run_dir: Path,
    row,
    pairs: list[tuple[DefenseResult, DefenseResult]],
    attack: str,
    ev: str,
    fpr: float,
    n_resamples: int,
    seed: int,
) -> tuple[Comparison, str]:
    """One defense (`row`, its results paired by seed with the baseline's) against the baseline under `attack`:
    the mean differences and their 95% intervals, and how the intervals were computed."""
    key = tpr_key(fpr)

    def metrics_of(r: DefenseResult) -> dict:
        return (r.attacks if ev == "target" else r.evaluations[ev])[attack]

    diffs = np.array(
        [
            [
                d.test_acc - c.test_acc,
                _num(metrics_of(d)["auc"]) - _num(metrics_of(c)["auc"]),
                _num(metrics_of(d).get(key)) - _num(metrics_of(c).get(key)),
            ]
            for d, c in pairs
        ]
    )
    if len(pairs) >= 2:
        cis = [_t_interval(diffs[:, j]) for j in range(3)]
        method = f"paired t-interval over {len(pairs)} seeds"
    else:
        d, c = pairs[0]
        a = load_scores(RunLayout(run_dir).result_dir(d.slug, d.seed))
        b = load_scores(RunLayout(run_dir).result_dir(c.slug, c.seed))
        cis = _bootstrap_deltas(a, b, attack, fpr, n_resamples, seed, ev)
        method = "paired bootstrap over " + ("models and records" if ev == "pooled" else "records") + " (one seed)"
    mean = diffs.mean(0)
    comparison = Comparison(
        defense=row.defense,
        attack=attack,
        accuracy=row.test_acc,
        auc=row.metric(attack, "auc", ev)[0],
        tpr=row.metric(attack, key, ev)[0],
        accuracy_delta=float(mean[0]),
        auc_delta=float(mean[1]),
        tpr_delta=float(mean[2]),
        accuracy_delta_ci=cis[0],
        auc_delta_ci=cis[1],
        tpr_delta_ci=cis[2],
    )
    return comparison, method


def headline(
    run_dir: str | Path,
    agg: Aggregate,
    results: list[DefenseResult],
    *,
    baseline: str = "ce",
    n_resamples: int = 200,
    seed: int = 0,
    min_effect: dict[str, float] | None = None,
) -> Headline:
    """Every defense against `baseline` under its strongest attack, with paired 95% intervals, judged with the
    practical thresholds `min_effect` (`judge`) and flagged (`_flags`), the frontier, and the headline in words;
    from the aggregate, and the stored per-record scores."""
    run_dir = Path(run_dir)
    ev = evaluation_of(agg)
    fpr = _report_fpr(agg, ev)
    key = tpr_key(fpr)
    strongest = {r.defense: strongest_attack(agg, r.defense, ev) for r in agg.rows}
    points = {r.defense: (r.test_acc, r.metric(strongest[r.defense], "auc", ev)[0]) for r in agg.rows}
    labels = [r.defense for r in agg.rows]
    by = {(r.defense, r.seed): r for r in results}
    levels = access_table(agg, ev, fpr)
    broken = {d: broken_at(v, fpr, min_effect) for d, v in levels.items()}
    if baseline not in labels:
        return Headline(None, None, {}, fpr, "", ev, [], frontier(points), by_access=levels, broken_at=broken)
    base_row = next(r for r in agg.rows if r.defense == baseline)
    base_attack = strongest[baseline]
    base_values = {
        "accuracy": base_row.test_acc,
        "auc": base_row.metric(base_attack, "auc", ev)[0],
        "tpr": base_row.metric(base_attack, key, ev)[0],
    }
    comparisons, methods = [], set()
    for row in agg.rows:
        seeds = [s for s in row.seeds if (baseline, s) in by]
        if row.defense == baseline or not seeds:
            continue
        pairs = [(by[(row.defense, s)], by[(baseline, s)]) for s in seeds]
        comparison, method = _compare(run_dir, row, pairs, strongest[row.defense], ev, fpr, n_resamples, seed)
        comparison = judge(comparison, min_effect)
        comparison.flags = _flags(run_dir, pairs)
        comparisons.append(comparison)
        methods.add(method)
    no_effect = {c.defense for c in comparisons if c.no_effect}  # never frontier points
    optimal = frontier({d: xy for d, xy in points.items() if d not in no_effect})
    h = Headline(baseline, base_attack, base_values, fpr, "; ".join(sorted(methods)), ev, comparisons, optimal)
    h.lowest_fpr, h.by_access, h.broken_at = min(agg.fprs), levels, broken
    h.sentences = headline_sentences(h, one_seed=all(len(r.seeds) == 1 for r in agg.rows))
    return h


def _flags(run_dir: Path, pairs: list[tuple[DefenseResult, DefenseResult]]) -> list[str]:
    """ "learnt nothing" when the defense's test accuracy is at the majority-class rate (mean over seeds), "never
    acted" when its target's loss on every audited record equals the baseline's bit for bit on every seed."""
    flags = []
    rates = [d.majority_rate for d, _ in pairs if d.majority_rate is not None]
    if rates and np.mean([d.test_acc for d, _ in pairs]) <= np.mean(rates) + 0.005:
        flags.append("learnt nothing")
    layout = RunLayout(run_dir)
    try:
        same = all(
            np.array_equal(
                load_scores(layout.result_dir(d.slug, d.seed))["target_loss"],
                load_scores(layout.result_dir(c.slug, c.seed))["target_loss"],
            )
            for d, c in pairs
        )
    except RunDirectoryError:  # scores not stored (a partial directory): nothing to compare
        same = False
    if same:
        flags.append("never acted")
    return flags


def _family(defense: str) -> str:
    return defense.split("(", 1)[0]


def headline_sentences(h: Headline, *, one_seed: bool) -> list[str]:
    """The headline in sentences a reader can act on, from the numbers: how much the baseline leaks, which
    settings cut that and at what cost, which leak more, which families change nothing measurably, and what
    the intervals cover."""
    if h.baseline is None:
        return ["No ce baseline in this run: no defense is compared with an undefended model."]
    b, pct = h.baseline_values, f"{100 * h.fpr:g}%"
    if math.isnan(b["tpr"]):  # no FPR the run reports is resolved: too few non-members
        out = [
            f"The undefended model ({h.baseline}) at {_pct(b['accuracy'])} test accuracy: {h.baseline_attack} "
            f"reaches AUC {b['auc']:.3f}; this run has too few non-members to resolve a TPR at {pct} false "
            "positives (audit more records, or use the leave-one-out evaluation with 4 or more reference models)."
        ]
    else:
        out = [
            f"The undefended model ({h.baseline}) leaks: {h.baseline_attack} finds {_pct(b['tpr'])} of its members "
            f"at {pct} false positives (AUC {b['auc']:.3f}), at {_pct(b['accuracy'])} test accuracy."
        ]
    if not math.isnan(h.lowest_fpr) and h.fpr > h.lowest_fpr and not math.isnan(b["tpr"]):
        out.append(
            f"(TPR at {100 * h.lowest_fpr:g}% FPR is not resolved by every result, so {pct} is used throughout.)"
        )
    for c in h.comparisons:
        if c.leakage == "less" and not c.flags:
            cost = (
                f"for {abs(100 * c.accuracy_delta):.1f} points of accuracy"
                if c.cost == "costs accuracy"
                else f"with an accuracy change of {100 * c.accuracy_delta:+.1f} points that its interval does not "
                "tell from no change"
                if c.cost == "indistinguishable accuracy"
                else f"while gaining {100 * c.accuracy_delta:.1f} points of accuracy"
            )
            out.append(f"{c.defense} cuts that to {_pct(c.tpr)} (AUC {c.auc:.3f}, against {c.attack}) {cost}.")
        elif c.leakage == "more" and not c.flags:
            versus = f"{_pct(c.tpr)} (AUC {c.auc:.3f}, against {c.attack})"
            out.append(f"{c.defense} leaks more than {h.baseline}: {versus}.")
        elif c.leakage == "mixed" and not c.flags:
            out.append(
                f"{c.defense} leaks less than {h.baseline} by one measure and more by another (TPR "
                f"{_signed(100 * c.tpr_delta, 'points')}, AUC {_signed(c.auc_delta, '')}, against {c.attack})."
            )
    flagged = {
        "never acted": "never acted (its models equal the baseline's)",
        "learnt nothing": "learnt nothing (accuracy at the majority-class rate)",
    }
    for flag, text in flagged.items():
        named = [c.defense for c in h.comparisons if flag in c.flags]
        if named:
            out.append(f"{', '.join(named)} {text}: not a frontier point.")
    families: dict[str, list[Comparison]] = {}
    for c in h.comparisons:
        families.setdefault(_family(c.defense), []).append(c)
    for family, cs in families.items():
        if all(c.no_effect and not c.flags for c in cs):
            out.append(
                f"{cs[0].defense} changes neither leakage nor accuracy measurably."
                if len(cs) == 1
                else f"No {family} setting ({len(cs)} tried) changes leakage or accuracy measurably."
            )
    out += access_sentences(h)
    if one_seed:
        out.append("With one seed, the intervals cover the choice of records and models, not training randomness.")
    return out


#: How each access level reads in a sentence.
ACCESS_WORDS = {"labels": "with labels only", "scores": "with the scores", "weights": "with the weights"}


def access_sentences(h: Headline) -> list[str]:
    """One sentence per defense with the strongest attack at each level of access and the weakest level that
    breaks it (`broken_at`); none when every attack of the run reads scores (the headline then says it all)."""
    if all(set(levels) <= {"scores"} for levels in h.by_access.values()):
        return []
    out, pct = [], f"{100 * h.fpr:g}%"
    for defense, levels in h.by_access.items():
        parts = [
            f"{ACCESS_WORDS[level]}, {v['attack']} finds {_pct(_num(v['tpr']))} at {pct} FPR (AUC {_num(v['auc']):.3f})"
            for level, v in levels.items()
        ]
        level = h.broken_at.get(defense, "")
        verdict = f"broken {ACCESS_WORDS[level]}" if level else "not broken at any level of access audited"
        out.append(f"Against {defense}: {'; '.join(parts)}; {verdict}.")
    return out


def _num(v) -> float:
    return math.nan if v is None else float(v)


# ----------------------------------------------------------------------------------------------------------
# The frontier: every defense's (utility, leakage) point, families as curves, verdicts
# ----------------------------------------------------------------------------------------------------------
#: Leakage measures the frontier can use: TPR at the lowest resolvable FPR (default), AUC, epsilon lower bound.
LEAKAGES = ("tpr", "auc", "epsilon_lb")


@dataclass
class FrontierPoint:
    defense: str
    family: str
    attack: str  # the attack with the highest leakage against this defense (the worst case)
    accuracy: float
    accuracy_interval: tuple[float, float]
    leakage: float
    leakage_interval: tuple[float, float]


def _interval(mean: float, std: float, ci, n_seeds: int) -> tuple[float, float]:
    if n_seeds > 1 and not math.isnan(std):
        return (mean - std, mean + std)
    if ci and None not in ci and not any(math.isnan(v) for v in ci):
        return (float(ci[0]), float(ci[1]))
    return (mean, mean)


def frontier_points(
    agg: Aggregate, results: list[DefenseResult], *, leakage: str = "tpr"
) -> tuple[list[FrontierPoint], str]:
    """Each defense's point: test accuracy (interval: std over seeds, or with one seed the 95% normal interval
    over its held-out records) and its worst-case leakage under the run's evaluation (pooled when present):
    `leakage` "tpr" (TPR at the lowest FPR every result resolves), "auc" or "epsilon_lb" (interval: std over
    seeds, or the bootstrap interval of one seed). Returns the points and the leakage's label."""
    if leakage not in LEAKAGES:
        from ._checks import expected
        from .errors import InvalidArgumentError

        raise InvalidArgumentError(expected("leakage", "one of " + ", ".join(LEAKAGES), leakage))
    ev = evaluation_of(agg)
    fpr = _report_fpr(agg, ev)
    key = {"tpr": tpr_key(fpr), "auc": "auc", "epsilon_lb": "epsilon_lb"}[leakage]
    held = {r.defense: r.num_nonmembers + r.num_population for r in results}
    family = {r.defense: r.spec.get("name", r.spec.get("loss", r.defense)) for r in results}
    points = []
    for row in agg.rows:
        values = {a: row.metric(a, key, ev)[0] for a in row.evaluation(ev)}
        finite = {a: v for a, v in values.items() if not math.isnan(v)}
        if not finite:
            continue
        attack = max(finite, key=finite.get)
        mean, std, ci = row.metric(attack, key, ev)
        n = len(row.seeds)
        acc = row.test_acc
        if n > 1:
            acc_int = (acc - row.values["test_acc_std"], acc + row.values["test_acc_std"])
        else:
            half = 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / max(held.get(row.defense, 1), 1))
            acc_int = (acc - half, acc + half)
        points.append(
            FrontierPoint(
                row.defense,
                family.get(row.defense, row.defense),
                attack,
                acc,
                acc_int,
                mean,
                _interval(mean, std, ci, n),
            )
        )
    where = "leave-one-out" if ev == "pooled" else "single target"
    label = {"tpr": f"TPR at {100 * fpr:g}% FPR", "auc": "AUC", "epsilon_lb": "ε lower bound"}[leakage]
    return points, f"{label} of the strongest attack ({where})"


def _beats(q: FrontierPoint, p: FrontierPoint) -> bool:
    """q is at least as good as p on both axes (means) and better beyond the intervals on one of them."""
    if not (q.accuracy >= p.accuracy and q.leakage <= p.leakage):
        return False
    return q.accuracy_interval[0] > p.accuracy_interval[1] or q.leakage_interval[1] < p.leakage_interval[0]


def family_verdicts(points: list[FrontierPoint], *, no_effect: Collection[str] = ()) -> dict[str, str]:
    """One line per family: "no measurable effect against the baseline" when every setting is in `no_effect`
    (indistinguishable from the baseline on both axes, or flagged), "on the frontier at accuracy A-B" when one of
    its other points is Pareto-optimal (by means, among the points not in `no_effect`), "dominated by X" when
    another family beats each of its points beyond the intervals, and "indistinguishable from the frontier"
    otherwise."""
    counted = [p for p in points if p.defense not in no_effect]
    optimal = set(frontier({p.defense: (p.accuracy, p.leakage) for p in counted}))
    out: dict[str, str] = {}
    for fam in dict.fromkeys(p.family for p in points):
        mine = [p for p in counted if p.family == fam]
        if not mine:
            out[fam] = "no measurable effect against the baseline (every setting)"
            continue
        on = [p for p in mine if p.defense in optimal]
        if on:
            lo, hi = min(p.accuracy for p in on), max(p.accuracy for p in on)
            where = f"{100 * lo:.1f}%" if lo == hi else f"{100 * lo:.1f}-{100 * hi:.1f}%"
            out[fam] = f"on the frontier at test accuracy {where}"
            continue
        beaters = []
        for p in mine:
            b = [q.family for q in counted if q.family != fam and _beats(q, p)]
            beaters.append(b)
        if all(beaters):
            names = sorted({b for bs in beaters for b in bs})
            out[fam] = "dominated by " + ", ".join(names) + " (beyond the intervals)"
        else:
            out[fam] = "indistinguishable from the frontier (the intervals overlap)"
    return out


# ----------------------------------------------------------------------------------------------------------
# The summary: computed once by the pipeline, rendered anywhere
# ----------------------------------------------------------------------------------------------------------
#: The stored summary's format; a summary of another version is computed again from the results (an older one
#: lacks the verdicts and flags).
SUMMARY_VERSION = 2


@dataclass
class Summary:
    """What a run concludes: the headline (each defense against the baseline), the frontier's points under
    `leakage` with their label, the defenses on the frontier, and one verdict per family."""

    headline: Headline
    leakage: str
    frontier_label: str
    points: list[FrontierPoint]
    optimal: list[str]
    verdicts: dict[str, str]
    # a defense's recipe chosen on the reserve: label -> one line per seed (`recipe_choices`)
    choices: dict[str, list[str]] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": SUMMARY_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Summary:
        h = dict(raw["headline"])
        h["comparisons"] = [Comparison(**_floats(c)) for c in h["comparisons"]]
        h["baseline_values"] = {k: _num(v) for k, v in h["baseline_values"].items()}
        h["fpr"] = float(h["fpr"])
        h["lowest_fpr"] = _num(h.get("lowest_fpr"))
        points = [FrontierPoint(**_floats(p)) for p in raw["points"]]
        return cls(
            Headline(**h),
            raw["leakage"],
            raw["frontier_label"],
            points,
            raw["optimal"],
            raw["verdicts"],
            raw.get("choices", {}),
        )


def _floats(raw: dict[str, Any]) -> dict[str, Any]:
    """JSON's null back to NaN, and its lists of numbers back to (low, high) tuples."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, list) and all(v is None or isinstance(v, float | int) for v in value) and value:
            out[key] = tuple(_num(v) for v in value)
        elif value is None or isinstance(value, float | int) and not isinstance(value, bool):
            out[key] = _num(value)
        else:
            out[key] = value
    return out


def summarize(
    run_dir: str | Path,
    agg: Aggregate,
    results: list[DefenseResult],
    *,
    leakage: str = "tpr",
    min_effect: dict[str, float] | None = None,
) -> Summary:
    """The pipeline's summary step: `headline` (with the practical thresholds `min_effect`), `frontier_points`
    under `leakage`, the frontier and `family_verdicts`, from the aggregate and the stored per-record scores. A
    setting with no measurable effect against the baseline, or flagged, is never a frontier point."""
    h = headline(run_dir, agg, results, min_effect=min_effect)
    no_effect = {c.defense for c in h.comparisons if c.no_effect}
    points, label = frontier_points(agg, results, leakage=leakage)
    optimal = frontier({p.defense: (p.accuracy, p.leakage) for p in points if p.defense not in no_effect})
    verdicts = family_verdicts(points, no_effect=no_effect)
    return Summary(h, leakage, label, points, optimal, verdicts, recipe_choices(results))


def recipe_choices(results: list[DefenseResult]) -> dict[str, list[str]]:
    """For each defense whose recipe was chosen on the reserve, one line per seed: the choice and every
    candidate's accuracy there, by the keys that vary, e.g. `seed 0: lr=0.5 (71.9% of 359 reserve records;
    lr=0.1: 12.0%, lr=2.0: 8.1%)`."""
    out: dict[str, list[str]] = {}
    for r in sorted(results, key=lambda r: r.seed):
        sel = r.selection
        if not sel:
            continue
        text = choice_text(sel)
        best = next(c["accuracy"] for c in sel["candidates"] if c["train"] == sel["chosen"])
        others = [
            f"{text(c['train'])}: {_pct(c['accuracy'])}" for c in sel["candidates"] if c["train"] != sel["chosen"]
        ]
        line = f"seed {r.seed}: {text(sel['chosen'])} ({_pct(best)} of {sel['records']} reserve records"
        out.setdefault(r.defense, []).append(line + (f"; {', '.join(others)})" if others else ")"))
    return out


def choice_text(selection: dict[str, Any]):
    """`train -> text` of a recipe choice's candidates by the keys that vary among them (`lr=0.5`, not the
    keys every candidate shares)."""
    candidates = [c["train"] for c in selection["candidates"]]
    varying = sorted({k for c in candidates for k in c if len({repr(d.get(k)) for d in candidates}) > 1})
    return lambda train: recipe_text({k: train[k] for k in varying if k in train}) or recipe_text(train)


def load_summary(run_dir: str | Path) -> Summary | None:
    """The summary the pipeline saved in `metrics.json`, or None (a run written before summaries were saved or
    with another summary format, or not finished): the caller then computes it with `summarize`."""
    try:
        raw = json.loads(RunLayout(run_dir).aggregate.read_text()).get("summary")
        if not isinstance(raw, dict) or raw.get("version") != SUMMARY_VERSION:
            return None
        return Summary.from_dict({k: v for k, v in raw.items() if k != "version"})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def summary_lines(summary: Summary) -> list[str]:
    """The summary for the terminal: the headline in words, each setting's verdict against the baseline (its
    changes with 95% intervals' method named), and the frontier."""
    h = summary.headline
    ev = "pooled leave-one-out" if h.evaluation == "pooled" else "single target"
    pct = f"{100 * h.fpr:g}%"
    lines = [f"Summary ({ev}{f'; 95% intervals: {h.method}' if h.method else ''}):", *h.sentences]
    for c in h.comparisons:
        lines.append(
            f"  {c.defense}: {c.verdict} (accuracy {_signed(100 * c.accuracy_delta, 'points')}, AUC "
            f"{_signed(c.auc_delta, '')}, TPR@{pct} {_signed(100 * c.tpr_delta, 'points')} under {c.attack})"
        )
    lines.append(f"Frontier ({summary.frontier_label}): {', '.join(summary.optimal) or 'none'}")
    if summary.choices:
        lines.append("Recipes chosen for accuracy on the defender's reserve (never on audited records):")
        lines += [f"  {d}: {choice}" for d, seeds in summary.choices.items() for choice in seeds]
    return lines


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.1f}%"


def _signed(v: float, unit: str) -> str:
    return "n/a" if math.isnan(v) else f"{v:+.3g}" + (f" {unit}" if unit else "")
