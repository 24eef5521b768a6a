"""The headline of a run, computed from its results: each defense against the CE baseline, and the frontier.

The headline reads the leave-one-out pooled evaluation when the run has one (every model as the target, see
`ccl.evaluation`), else the single-target one, and says which. For every defense, its *strongest attack* is
the attack with the highest mean AUC against it (the worst case among those run). The headline compares
the defense with the baseline (`ce`) under that attack on three numbers: test accuracy, AUC, and TPR at the
lowest configured FPR that every result can resolve. Each difference comes with a 95% interval:
- with two or more seeds shared by both, a paired t-interval over seeds (each seed has its own split and
  models, so it covers training noise and the choice of records);
- with one seed, a paired bootstrap (the same resamples for both defenses): over records for the single-target
  evaluation (members and non-members resampled separately), over models and records for the pooled one; it
  covers the choice of records (and models) only.
A defense is *distinguishable* from the baseline when one of the three intervals excludes 0.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .layout import RunLayout
from .metrics import DegenerateMetricWarning, roc_metrics, tpr_key
from .results import Aggregate, DefenseResult, load_scores

__all__ = [
    "Comparison",
    "Headline",
    "Summary",
    "frontier",
    "headline",
    "load_summary",
    "strongest_attack",
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

    @property
    def distinguishable(self) -> bool:
        return any(lo > 0 or hi < 0 for lo, hi in (self.accuracy_delta_ci, self.auc_delta_ci, self.tpr_delta_ci))


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


def evaluation_of(agg: Aggregate) -> str:
    """ "pooled" when every defense has the leave-one-out evaluation, else "target" (`Aggregate.main_evaluation`)."""
    return agg.main_evaluation


def _attacks(row, evaluation: str) -> dict:
    return row.attacks if evaluation == "target" else row.evaluations.get(evaluation, {})


def strongest_attack(agg: Aggregate, defense: str, evaluation: str | None = None) -> str:
    evaluation = evaluation or evaluation_of(agg)
    row = next(r for r in agg.rows if r.defense == defense)
    aucs = {a: row.metric(a, "auc", evaluation)[0] for a in _attacks(row, evaluation)}
    finite = {a: v for a, v in aucs.items() if not math.isnan(v)}
    return max(finite, key=finite.get) if finite else next(iter(aucs))


def _report_fpr(agg: Aggregate, evaluation: str) -> float:
    """The lowest configured FPR whose TPR every defense's attacks resolve (else the highest FPR)."""
    for fpr in sorted(agg.fprs):
        if all(
            not math.isnan(r.metric(a, tpr_key(fpr), evaluation)[0]) for r in agg.rows for a in _attacks(r, evaluation)
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
) -> Headline:
    """Every defense against `baseline` under its strongest attack, with paired 95% intervals, and the
    frontier; from the aggregate, and (one seed) the stored per-record scores."""
    run_dir = Path(run_dir)
    ev = evaluation_of(agg)
    fpr = _report_fpr(agg, ev)
    key = tpr_key(fpr)
    strongest = {r.defense: strongest_attack(agg, r.defense, ev) for r in agg.rows}
    points = {r.defense: (r.test_acc, r.metric(strongest[r.defense], "auc", ev)[0]) for r in agg.rows}
    labels = [r.defense for r in agg.rows]
    by = {(r.defense, r.seed): r for r in results}
    if baseline not in labels:
        return Headline(None, None, {}, fpr, "", ev, [], frontier(points))
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
        comparisons.append(comparison)
        methods.add(method)
    return Headline(
        baseline, base_attack, base_values, fpr, "; ".join(sorted(methods)), ev, comparisons, frontier(points)
    )


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
    family = {r.defense: r.spec.get("loss", r.defense) for r in results}
    points = []
    for row in agg.rows:
        values = {a: row.metric(a, key, ev)[0] for a in _attacks(row, ev)}
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


def family_verdicts(points: list[FrontierPoint]) -> dict[str, str]:
    """One line per family: "on the frontier at accuracy A-B" when one of its points is Pareto-optimal (by
    means), "dominated by X" when another family beats each of its points beyond the intervals, and
    "indistinguishable from the frontier" otherwise."""
    optimal = set(frontier({p.defense: (p.accuracy, p.leakage) for p in points}))
    out: dict[str, str] = {}
    for fam in dict.fromkeys(p.family for p in points):
        mine = [p for p in points if p.family == fam]
        on = [p for p in mine if p.defense in optimal]
        if on:
            lo, hi = min(p.accuracy for p in on), max(p.accuracy for p in on)
            where = f"{100 * lo:.1f}%" if lo == hi else f"{100 * lo:.1f}-{100 * hi:.1f}%"
            out[fam] = f"on the frontier at test accuracy {where}"
            continue
        beaters = []
        for p in mine:
            b = [q.family for q in points if q.family != fam and _beats(q, p)]
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Summary:
        h = dict(raw["headline"])
        h["comparisons"] = [Comparison(**_floats(c)) for c in h["comparisons"]]
        h["baseline_values"] = {k: _num(v) for k, v in h["baseline_values"].items()}
        h["fpr"] = float(h["fpr"])
        points = [FrontierPoint(**_floats(p)) for p in raw["points"]]
        return cls(Headline(**h), raw["leakage"], raw["frontier_label"], points, raw["optimal"], raw["verdicts"])


def _floats(raw: dict[str, Any]) -> dict[str, Any]:
    """JSON's null back to NaN, and its lists back to (low, high) tuples."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, list):
            out[key] = tuple(_num(v) for v in value)
        elif value is None or isinstance(value, float | int) and not isinstance(value, bool):
            out[key] = _num(value)
        else:
            out[key] = value
    return out


def summarize(run_dir: str | Path, agg: Aggregate, results: list[DefenseResult], *, leakage: str = "tpr") -> Summary:
    """The pipeline's summary step: `headline`, `frontier_points` under `leakage`, the frontier and
    `family_verdicts`, from the aggregate and (one seed) the stored per-record scores."""
    points, label = frontier_points(agg, results, leakage=leakage)
    optimal = frontier({p.defense: (p.accuracy, p.leakage) for p in points})
    return Summary(headline(run_dir, agg, results), leakage, label, points, optimal, family_verdicts(points))


def load_summary(run_dir: str | Path) -> Summary | None:
    """The summary the pipeline saved in `metrics.json`, or None (a run written before summaries were saved, or
    not finished)."""
    try:
        raw = json.loads(RunLayout(run_dir).aggregate.read_text()).get("summary")
        return None if raw is None else Summary.from_dict(raw)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def summary_lines(summary: Summary) -> list[str]:
    """The summary in a few lines for the terminal: the baseline, each defense's change against it, the
    frontier."""
    h = summary.headline
    ev = "pooled leave-one-out" if h.evaluation == "pooled" else "single target"
    pct = f"{100 * h.fpr:g}%"
    if h.baseline is None:
        lines = [f"Summary ({ev}): no ce baseline in this run, so no defense is compared with it."]
    else:
        b = h.baseline_values
        lines = [
            f"Summary ({ev}{f'; 95% intervals: {h.method}' if h.method else ''}): {h.baseline} reaches "
            f"{100 * b['accuracy']:.1f}% "
            f"test accuracy; {h.baseline_attack} finds {_pct(b['tpr'])} of its members at {pct} FPR "
            f"(AUC {b['auc']:.3f})."
        ]
        for c in h.comparisons:
            verdict = "distinguishable" if c.distinguishable else "indistinguishable"
            lines.append(
                f"  {c.defense}: accuracy {_signed(100 * c.accuracy_delta, 'points')}, AUC "
                f"{_signed(c.auc_delta, '')}, TPR@{pct} {_signed(100 * c.tpr_delta, 'points')} under {c.attack}: "
                f"{verdict} from {h.baseline}"
            )
    lines.append(f"Frontier ({summary.frontier_label}): {', '.join(summary.optimal) or 'none'}")
    return lines


def _pct(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.1f}%"


def _signed(v: float, unit: str) -> str:
    return "n/a" if math.isnan(v) else f"{v:+.3g}" + (f" {unit}" if unit else "")
