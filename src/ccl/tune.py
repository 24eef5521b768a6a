"""`ccl tune`: the setting of one defense parameter with the best accuracy whose leakage meets a target.

The target is `[ATTACK:]METRIC<=VALUE`, e.g. `lira:tpr@0.01<=0.05`, `auc<=0.6`, `epsilon_lb<=1` (without an attack:
the strongest one, the worst case). A setting meets it when the leakage's upper confidence bound does: with
several seeds the mean plus a one-sided 95% t-margin over seeds, with one seed the upper end of the
evaluation's bootstrap interval (the point itself where there is none, e.g. the epsilon lower bound).

The search (`search`) assumes the leakage is monotone in the parameter over the range (either way; the two
ends tell which): it evaluates both ends, then bisects the boundary between settings that meet the target and
settings that do not, `steps` times, and returns the tried setting with the best accuracy among those that
meet it. When both ends agree (all meet it, or none), it falls back to a grid of `grid` points. Every setting is
a defense of one run directory, added with `--resume`, so every model already trained is reused (reference models
are trained with each candidate setting: the attacker knows the recipe), and the run's report shows the family's
frontier. The evidence (every point tried, its accuracy, leakage and bound) is saved as `tune.json`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from . import attacks
from ._checks import expected, unknown_name
from .config import ExperimentConfig
from .errors import ConfigError
from .metrics import tpr_key
from .results import Aggregate

__all__ = ["Target", "TunePoint", "check_target", "parse_target", "point_from_aggregate", "search"]

_T95_ONE_SIDED = [6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812]


@dataclass(frozen=True)
class Target:
    attack: str | None  # None: the strongest attack
    metric: str  # "auc", "advantage", "tpr@F", "epsilon_lb"
    bound: float


@dataclass
class TunePoint:
    value: float
    defense: str
    accuracy: float
    leakage: float
    upper: float  # the leakage's upper confidence bound
    attack: str

    def meets(self, target: Target) -> bool:
        return not math.isnan(self.upper) and self.upper <= target.bound


def parse_target(text: str) -> Target:
    """`lira:tpr@0.01<=0.05` -> Target("lira", "tpr@0.01", 0.05)."""
    m = re.fullmatch(r"\s*(?:(\w+):)?(auc|advantage|epsilon_lb|tpr@[0-9.eE-]+)\s*<=\s*([0-9.eE+-]+)\s*", text)
    if not m:
        raise ConfigError(
            expected(
                "target",
                "[ATTACK:]METRIC<=VALUE with METRIC auc, advantage, tpr@FPR or epsilon_lb (e.g. lira:tpr@0.01<=0.05)",
                text,
            )
        )
    attack, metric = m.group(1), m.group(2)
    bound = _number("target", text, m.group(3))
    if attack is not None and attack not in attacks.available():
        raise ConfigError(f"--target {text!r}: " + unknown_name("attack", attack, attacks.available()))
    if metric.startswith("tpr@"):
        fpr = _number("target", text, metric[4:])
        if not 0 < fpr < 1:
            raise ConfigError(expected("target", "a TPR at a false-positive rate in (0, 1), e.g. tpr@0.01", text))
        metric = tpr_key(fpr)
    return Target(attack, metric, bound)


def _number(name: str, text: str, part: str) -> float:
    """`part` of the target `text` as a finite number, or the one error naming the target."""
    try:
        value = float(part)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        what = f"[ATTACK:]METRIC<=VALUE with a finite number where {part!r} stands"
        raise ConfigError(expected(name, what, text))
    return value


def check_target(target: Target, config: ExperimentConfig) -> None:
    """A target that the run cannot measure fails before any model trains: an attack the run leaves out or
    that needs more reference models than it has, a TPR at a false-positive rate it does not report."""
    if target.attack is not None:
        if config.attacks is not None and target.attack not in config.attacks:
            raise ConfigError(f"--target names the attack {target.attack!r}, which --attacks leaves out.")
        needed = attacks.create(target.attack).min_references
        if config.num_references < needed:
            raise ConfigError(
                f"--target names the attack {target.attack!r}, which needs at least {needed} reference models; "
                f"--num-references is {config.num_references}."
            )
    reported = [tpr_key(f) for f in config.fprs]
    if target.metric.startswith("tpr@") and target.metric not in reported:
        raise ConfigError(
            f"--target asks for {target.metric}, a false-positive rate the run does not report: "
            f"the run reports {', '.join(reported)} (add it to fprs: in --config)."
        )


def point_from_aggregate(agg: Aggregate, defense: str, value: float, target: Target) -> TunePoint:
    """The tune point of `defense` in a run's aggregate, under its pooled evaluation when present."""
    row = next(r for r in agg.rows if r.defense == defense)
    ev = "pooled" if "pooled" in row.evaluations else "target"
    attacks = [target.attack] if target.attack else list(row.evaluations[ev] if ev != "target" else row.attacks)
    best = None
    for attack in attacks:
        mean, std, ci = row.metric(attack, target.metric, ev)
        n = len(row.seeds)
        if n > 1 and not math.isnan(std):
            upper = mean + _T95_ONE_SIDED[min(n - 2, len(_T95_ONE_SIDED) - 1)] * std / math.sqrt(n)
        elif ci and None not in ci and not any(math.isnan(c) for c in ci):
            upper = float(ci[1])
        else:
            upper = mean
        if best is None or (not math.isnan(upper) and (math.isnan(best.upper) or upper > best.upper)):
            best = TunePoint(value, defense, row.test_acc, mean, upper, attack)
    if best is None:
        raise ConfigError(f"Attack {target.attack!r} was not run for {defense}; run it with --attacks.")
    return best


def search(
    evaluate: Callable[[list[float]], list[TunePoint]],
    low: float,
    high: float,
    target: Target,
    *,
    steps: int = 4,
    grid: int = 5,
    integer: bool = False,
) -> tuple[TunePoint | None, list[TunePoint]]:
    """Bisection on the boundary of the settings that meet `target` (see the module docstring). `evaluate(values)`
    returns the points of the given settings (it is called with new settings only). With `integer`, settings are
    whole numbers (e.g. epochs). Returns (the chosen point or None, every point tried, by value)."""

    def setting(v: float) -> float:
        return int(round(v)) if integer else float(f"{v:.10g}")

    tried: dict[float, TunePoint] = {}

    def run(values: list[float]) -> None:
        new = [v for v in dict.fromkeys(values) if v not in tried]
        if new:
            for p in evaluate(new):
                tried[p.value] = p

    low, high = setting(low), setting(high)
    run([low, high])
    lo_ok, hi_ok = tried[low].meets(target), tried[high].meets(target)
    if lo_ok != hi_ok:
        good, bad = (low, high) if lo_ok else (high, low)
        for _ in range(steps):
            mid = setting((good + bad) / 2)
            if mid in (good, bad):
                break
            run([mid])
            if tried[mid].meets(target):
                good = mid
            else:
                bad = mid
    else:
        run([setting(low + (high - low) * i / (grid - 1)) for i in range(grid)])
    points = sorted(tried.values(), key=lambda p: p.value)
    feasible = [p for p in points if p.meets(target)]
    chosen = max(feasible, key=lambda p: p.accuracy) if feasible else None
    return chosen, points
