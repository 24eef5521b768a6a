"""Typed results: one (defense, seed) result, the aggregate over seeds, and their files.

The pipeline (`ccl.audit`) writes them, once; the report and the command line only read them. Metric keys are
derived from the configured false-positive rates (`ccl.metrics.metric_names`), never spelled by hand.

Files:
    results/<defense>/seed-<s>/scores.npz    per-record attack scores, membership truth, the target's loss
    results/<defense>/seed-<s>/metrics.json  a `DefenseResult` (written last: its presence marks it complete)
    metrics.json                             the `Aggregate`: one row per defense, mean and spread over seeds
    table.csv                                the same numbers, one line per (defense, evaluation, attack)

Every number belongs to one evaluation (`EVALUATIONS`): the single target against its reference models, or the
pooled leave-one-out evaluation on random records, on canaries or on the most vulnerable records
(`ccl.evaluation`). Each table, column and export names its evaluation with `EVALUATIONS`' labels.

JSON is always valid: a metric that cannot be computed (e.g. TPR at 0.1% FPR with fewer than 1,000
non-members) is `null`, never `NaN`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_path, write_json, write_text
from .errors import RunDirectoryError
from .layout import RunLayout
from .metrics import DEFAULT_FPRS, metric_names, tpr_key

__all__ = [
    "EVALUATIONS",
    "HEADLINE_ATTACKS",
    "Aggregate",
    "AggregateRow",
    "DefenseResult",
    "aggregate",
    "evaluation_json",
    "load_aggregate",
    "load_results",
    "load_scores",
    "save_scores",
    "table_csv",
    "table_lines",
    "table_markdown",
    "write_aggregate",
]

#: The attacks the headline tables show, in order, when the run has them.
HEADLINE_ATTACKS = ("loss", "lira", "rmia")

#: Every evaluation a result can hold, in reading order, with the label every table and export gives it.
#: "target" is `DefenseResult.attacks`; the others are keys of `DefenseResult.evaluations`.
EVALUATIONS = {
    "target": "single target, random records",
    "pooled": "pooled leave-one-out, random records",
    "canaries": "pooled leave-one-out, canaries",
    "vulnerable_1pct": "pooled leave-one-out, most vulnerable 1%",
    "vulnerable_5pct": "pooled leave-one-out, most vulnerable 5%",
}
#: Bounds aggregated next to the metrics when a result has them: the classic bound (every evaluation; pairs
#: treated as independent trials, an approximation) and the one-run audit (canaries; rigorous, see ccl.bounds).
_BOUNDS = ("epsilon_lb", "one_run_epsilon_lb")


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


@dataclass
class DefenseResult:
    """One (defense, seed): utility, the target's loss statistics, and every attack's metrics."""

    defense: str  # the defense's label, e.g. "ccel(alpha=0.5)"
    slug: str  # its file-name-safe form
    spec: dict[str, Any]  # {"loss": ..., "params": {...}}
    seed: int
    result_key: str  # a hash of everything that determined this result
    train_acc: float
    test_acc: float
    member_loss_mean: float
    member_loss_std: float
    nonmember_loss_mean: float
    nonmember_loss_std: float
    gaussian_predicted_advantage: float
    num_references: int
    num_members: int
    num_nonmembers: int
    num_population: int
    fprs: list[float]
    attacks: dict[str, dict[str, Any]]  # attack -> ccl.metrics.AttackMetrics.as_dict()
    target_history: list[dict[str, float]] = field(default_factory=list)  # per-epoch log, without timings
    notes: list[str] = field(default_factory=list)  # what a reader must know to read the numbers (warnings)
    gaussian_fits: dict[str, dict[str, float]] = field(default_factory=dict)  # scale -> fitted model (score.py)
    evaluations: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # "pooled", "canaries", ...
    vulnerable_records: list[dict[str, Any]] = field(default_factory=list)  # the most vulnerable, by leakage
    num_canaries: int = 0
    dp_epsilon: float | None = None  # DP-SGD: the epsilon the target spent (the guarantee, at the defense's delta)
    # DP-SGD: how the target's epsilon was spent, for Opacus' accountant to recompute (`ccl.dp.DPAccounting`):
    # noise_multiplier, sample_rate, steps, accountant, delta, epsilon; None for other defenses and older runs
    dp_accounting: dict[str, Any] | None = None
    majority_rate: float | None = None  # the majority class's share of the held-out records (a do-nothing model)
    recipe: dict[str, Any] | None = None  # the recipe the target trained with (its own seed aside)
    # a defense's recipe chosen on the defender's reserve: {"metric", "records", "candidates": [{"train",
    # "accuracy"}], "chosen"}; None when the recipe had no choice
    selection: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DefenseResult:
        names = {f.name for f in dataclasses.fields(cls)}
        optional = {
            "target_history",
            "notes",
            "gaussian_fits",
            "evaluations",
            "vulnerable_records",
            "num_canaries",
            "dp_epsilon",
            "dp_accounting",
            "majority_rate",
            "recipe",
            "selection",
        }
        missing = names - set(raw) - optional
        if missing:
            raise ValueError(f"missing keys {sorted(missing)}")
        kwargs = {k: raw[k] for k in names if k in raw}
        for key in (
            "train_acc",
            "test_acc",
            "member_loss_mean",
            "member_loss_std",
            "nonmember_loss_mean",
            "nonmember_loss_std",
            "gaussian_predicted_advantage",
        ):
            kwargs[key] = _nan(kwargs[key])
        return cls(**kwargs)

    def save(self, folder: str | os.PathLike) -> None:
        write_json(Path(folder) / RunLayout.RESULT, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> DefenseResult:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise RunDirectoryError(
                f"The result {path} is corrupt or from another version ({err}); delete it and resume the run."
            ) from None


def save_scores(folder: str | os.PathLike, arrays: dict[str, Any]) -> None:
    """Per-record arrays of one result: membership truth (`is_member`, and `masks (M, P)` of every model),
    labels, the target's loss on the audit pool, canary mask, the target's correctness on the held-out records
    (non-members and population), each attack's scores (`score_<attack>`) and leave-one-out scores
    (`loo_<attack>`, `(M, P)`)."""
    flat = {k: v for k, v in arrays.items() if k not in ("scores", "loo")}
    flat.update({f"score_{k}": v for k, v in arrays.get("scores", {}).items()})
    flat.update({f"loo_{k}": v for k, v in arrays.get("loo", {}).items()})
    with atomic_path(Path(folder) / RunLayout.SCORES) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **flat)


def load_scores(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """A result's per-record arrays; a missing, truncated or foreign file is named with how to recover."""
    path = Path(folder) / RunLayout.SCORES
    try:
        with np.load(path, allow_pickle=False) as f:
            out = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise RunDirectoryError(f"{path} is missing; delete {path.parent} and resume the run.") from None
    except Exception as err:
        raise RunDirectoryError(
            f"{path} is corrupt or truncated ({type(err).__name__}); delete {path.parent} and resume the run."
        ) from None
    if not {"is_member", "target_loss"} <= set(out):
        raise RunDirectoryError(f"{path} is not a ccl scores file; delete {path.parent} and resume the run.")
    return out


def load_results(run_dir: str | os.PathLike) -> list[DefenseResult]:
    run_dir = Path(run_dir)
    return [DefenseResult.load(p) for p in RunLayout(run_dir).results()]


@dataclass
class AggregateRow:
    """One defense over its seeds: means, standard deviations over seeds and, with one seed, the bootstrap
    interval of that seed (`<metric>_ci`)."""

    defense: str
    slug: str
    seeds: list[int]
    values: dict[str, float]  # test_acc, train_acc, member_loss_std, gaussian_predicted_advantage, each + "_std"
    attacks: dict[str, dict[str, Any]]  # attack -> {metric, metric_std, metric_ci}: the single-target evaluation
    evaluations: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)  # "pooled", "canaries", ...

    @property
    def test_acc(self) -> float:
        return self.values["test_acc"]

    def evaluation(self, name: str) -> dict[str, dict[str, Any]]:
        """attack -> metrics of one evaluation ("target": the single-target one, `attacks`; "pooled",
        "canaries", "vulnerable_1pct", ...: see `ccl.evaluation`); empty when the row does not have it."""
        return self.attacks if name == "target" else self.evaluations.get(name, {})

    def metric(self, attack: str, name: str, evaluation: str = "target") -> tuple[float, float, list[float] | None]:
        """(mean, std over seeds, interval of a single seed or None) of one evaluation (`evaluation`)."""
        e = self.evaluation(evaluation).get(attack, {})
        return _nan(e.get(name)), _nan(e.get(name + "_std")), e.get(name + "_ci")


@dataclass
class Aggregate:
    rows: list[AggregateRow]
    fprs: list[float]
    num_results: int

    @property
    def metric_names(self) -> tuple[str, ...]:
        return metric_names(self.fprs)

    @property
    def attacks(self) -> list[str]:
        return list(self.rows[0].attacks) if self.rows else []

    @property
    def headline_attacks(self) -> list[str]:
        return [a for a in HEADLINE_ATTACKS if a in self.attacks] or self.attacks[:3]

    @property
    def evaluations(self) -> list[str]:
        """The evaluations some defense has, in `EVALUATIONS`' order ("target" always)."""
        return [e for e in EVALUATIONS if e == "target" or any(e in r.evaluations for r in self.rows)]

    @property
    def main_evaluation(self) -> str:
        """The evaluation the headline, the terminal table and the frontier use: "pooled" when every defense
        has the leave-one-out evaluation, else "target"."""
        return "pooled" if self.rows and all("pooled" in r.evaluations for r in self.rows) else "target"

    def to_dict(self) -> dict[str, Any]:
        return {
            "fprs": list(self.fprs),
            "num_results": self.num_results,
            # what each block of a row holds: `attacks` the single target, `evaluations.<name>` the others
            "evaluation_labels": {
                ("attacks" if e == "target" else f"evaluations.{e}"): EVALUATIONS[e] for e in self.evaluations
            },
            "rows": [dataclasses.asdict(r) for r in self.rows],
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Aggregate:
        rows = [AggregateRow(**r) for r in raw["rows"]]
        return cls(rows=rows, fprs=list(raw["fprs"]), num_results=int(raw["num_results"]))


def _mean_std(values: list[Any]) -> tuple[float, float]:
    v = np.array([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def _aggregate_metrics(per_seed: list[dict[str, dict[str, Any]]], names: tuple[str, ...]) -> dict:
    """attack -> {metric: mean over seeds, metric_std, metric_ci (one seed only)}."""
    out: dict[str, dict[str, Any]] = {}
    for attack in per_seed[0]:
        entry: dict[str, Any] = {}
        for metric in (*names, *_BOUNDS):
            values = [seed.get(attack, {}).get(metric) for seed in per_seed]
            if metric in _BOUNDS and all(v is None for v in values):
                continue
            entry[metric], entry[metric + "_std"] = _mean_std(values)
            if len(per_seed) == 1:
                entry[metric + "_ci"] = per_seed[0][attack].get(metric + "_ci")
        out[attack] = entry
    return out


_VALUES = ("test_acc", "train_acc", "member_loss_std", "gaussian_predicted_advantage", "dp_epsilon")


def aggregate(results: list[DefenseResult], *, order: list[str] | None = None, fprs=DEFAULT_FPRS) -> Aggregate:
    """Mean and spread over seeds of every defense's utility and attack metrics, defenses in `order` (labels)
    first. With one seed, each metric also carries that seed's bootstrap interval."""
    names = metric_names(fprs)
    by_defense: dict[str, list[DefenseResult]] = {}
    for r in results:
        by_defense.setdefault(r.defense, []).append(r)
    order = list(order or [])
    rows = []
    for label in [o for o in order if o in by_defense] + sorted(set(by_defense) - set(order)):
        runs = sorted(by_defense[label], key=lambda r: r.seed)
        values: dict[str, float] = {}
        for key in _VALUES:
            values[key], values[key + "_std"] = _mean_std([getattr(r, key) for r in runs])
        if all(r.dp_epsilon is None for r in runs):
            del values["dp_epsilon"], values["dp_epsilon_std"]
        attacks = _aggregate_metrics([r.attacks for r in runs], names)
        evaluations = {
            ev: _aggregate_metrics([r.evaluations.get(ev, {}) for r in runs], names) for ev in runs[0].evaluations
        }
        rows.append(AggregateRow(label, runs[0].slug, [r.seed for r in runs], values, attacks, evaluations))
    return Aggregate(rows=rows, fprs=[float(f) for f in fprs], num_results=len(results))


def _cell(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else v


def table_csv(agg: Aggregate, *, evaluations: list[str] | None = None) -> str:
    """The aggregate as CSV, one line per (defense, evaluation, attack) of `evaluations` (default: all the run
    has): utility, then each metric's mean over seeds and its std, then the epsilon lower bounds."""
    evaluations = agg.evaluations if evaluations is None else evaluations
    blocks = [m for r in agg.rows for e in evaluations for m in r.evaluation(e).values()]
    bounds = [b for b in _BOUNDS if any(b in m for m in blocks)]
    metrics = [*agg.metric_names, *bounds]
    header = ["defense", "seeds", "test_acc", "test_acc_std", "train_acc", "dp_epsilon", "evaluation"]
    header += ["evaluation_label", "attack", *(f"{m}{s}" for m in metrics for s in ("", "_std"))]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in agg.rows:
        utility = [r.defense, len(r.seeds), r.values["test_acc"], r.values["test_acc_std"], r.values["train_acc"]]
        utility.append(r.values.get("dp_epsilon"))
        for e in evaluations:
            for attack in r.evaluation(e):
                cells = [*utility, e, EVALUATIONS.get(e, e), attack]
                for m in metrics:
                    mean, std, _ = r.metric(attack, m, e)
                    cells += [mean, std]
                w.writerow([_cell(v) for v in cells])
    return buf.getvalue()


def write_aggregate(run_dir: str | os.PathLike, agg: Aggregate, *, summary: dict[str, Any] | None = None) -> None:
    """metrics.json (with the run's `summary`, `ccl.summary.Summary.to_dict()`, when given) and table.csv
    (deterministic: the same results give the same bytes)."""
    run_dir = Path(run_dir)
    layout = RunLayout(run_dir)
    write_json(layout.aggregate, agg.to_dict() | ({"summary": summary} if summary is not None else {}))
    write_text(layout.table, table_csv(agg))


def load_aggregate(run_dir: str | os.PathLike) -> Aggregate:
    path = RunLayout(run_dir).aggregate
    try:
        return Aggregate.from_dict(json.loads(path.read_text()))
    except FileNotFoundError:
        raise RunDirectoryError(f"{path} is missing: the run has not finished; resume it first.") from None
    except (ValueError, KeyError, TypeError) as err:
        raise RunDirectoryError(f"{path} is corrupt ({err}); resume the run to write it again.") from None


def table_lines(agg: Aggregate, *, fpr: float = 0.01) -> list[str]:
    """The command line's summary under the run's main evaluation (named on the first line): test accuracy,
    then AUC and TPR at `fpr` of the headline attacks."""
    fpr = fpr if fpr in agg.fprs else agg.fprs[-1]
    key, pct = tpr_key(fpr), f"{100 * fpr:g}%"
    ev = agg.main_evaluation
    attacks = agg.headline_attacks
    width = max([24, *(len(r.defense) for r in agg.rows)])  # long labels (a defense's own recipe) stay aligned
    lines = [
        f"Evaluation: {EVALUATIONS[ev]} (mean over seeds)",
        f"{'defense':{width}s} {'test acc':>9s}"
        + "".join(f" {a + ' AUC':>10s} {a + ' TPR@' + pct:>13s}" for a in attacks),
    ]
    for r in agg.rows:
        line = f"{r.defense:{width}s} {100 * r.test_acc:8.1f}%"
        for a in attacks:
            auc, tpr = r.metric(a, "auc", ev)[0], r.metric(a, key, ev)[0]
            line += f" {'n/a' if math.isnan(auc) else f'{auc:.3f}':>10s} {_percent(tpr):>13s}"
        lines.append(line)
    return lines


def _percent(v: float) -> str:
    return "n/a" if math.isnan(v) else f"{100 * v:.1f}%"


def table_markdown(agg: Aggregate, *, evaluations: list[str] | None = None) -> str:
    """The aggregate as Markdown: one table per evaluation of `evaluations` (default: all the run has), each
    under a heading that names it: test accuracy, then AUC and TPR at each FPR of the headline attacks, and the
    epsilon lower bound of each where the run computed one."""
    out = []
    for ev in agg.evaluations if evaluations is None else evaluations:
        attacks = [a for a in agg.headline_attacks if any(a in r.evaluation(ev) for r in agg.rows)]
        if not attacks:
            continue
        has_eps = any("epsilon_lb" in r.evaluation(ev).get(a, {}) for r in agg.rows for a in attacks)
        head = ["defense", "test acc"]
        for a in attacks:
            head += [f"{a} AUC"] + [f"{a} TPR@{100 * f:g}%" for f in agg.fprs] + ([f"{a} ε lb"] if has_eps else [])
        lines = [f"### {EVALUATIONS.get(ev, ev)}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in agg.rows:
            cells = [r.defense, _percent(r.test_acc)]
            for a in attacks:
                auc = r.metric(a, "auc", ev)[0]
                cells.append("n/a" if math.isnan(auc) else f"{auc:.3f}")
                cells += [_percent(r.metric(a, tpr_key(f), ev)[0]) for f in agg.fprs]
                if has_eps:
                    eps = r.metric(a, "epsilon_lb", ev)[0]
                    cells.append("n/a" if math.isnan(eps) else f"{eps:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines) + "\n")
    note = (
        "ε lb: the (ε, 1e-5) lower bound of the attack's best threshold at 95% confidence, treating the pairs as "
        "independent trials (an approximation; see ccl.bounds).\n"
    )
    return "\n".join(out) + "\n" + note


def evaluation_json(agg: Aggregate, evaluation: str) -> dict[str, Any]:
    """One evaluation of the aggregate, labelled: {evaluation, label, fprs, rows: [{defense, seeds, values,
    attacks}]}, the rows' `attacks` holding that evaluation's metrics."""
    return {
        "evaluation": evaluation,
        "label": EVALUATIONS.get(evaluation, evaluation),
        "fprs": list(agg.fprs),
        "rows": [
            {"defense": r.defense, "seeds": r.seeds, "values": r.values, "attacks": r.evaluation(evaluation)}
            for r in agg.rows
        ],
    }
