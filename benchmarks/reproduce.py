"""Does a finished run reproduce the numbers stored in the repository? Compares it with expected ranges.

    python benchmarks/reproduce.py runs/location30 benchmarks/expected/location30.json
    python benchmarks/reproduce.py runs/demo benchmarks/expected/demo.json
    python benchmarks/reproduce.py runs/location30 --write benchmarks/expected/location30.json \\
        --command "ccl compare --config examples/location30.yaml --out runs/location30" --note "2-core CPU, ..."

For every defense of the expected file, four numbers of the run are checked, each a mean over the run's seeds:
- `test_acc`: the target's test accuracy;
- `auc`, `tpr@0.01`, `tpr@0.001`: the worst case over the attacks run (the highest mean over seeds among them) in
  the expected file's evaluation ("pooled": every model in turn the target, `ccl.evaluation`), the same
  strongest-attack rule as the headline's (`ccl.summary.strongest_attack`), applied to each number.

`--write` makes the expected file from a run: each number's range is its mean over seeds plus or minus
max(3 x its standard deviation over seeds, a floor: FLOORS), clipped to [0, 1]. The floor keeps two seeds that
happen to agree from making a range narrower than a third seed would land in; the standard deviation is the
seed-to-seed spread (each seed its own split of the records and its own models), so the ranges say what another
machine's run of the same command, or of other seeds, should land in.

Exit status: 0 when every number is inside its range; 1 when some are not, each named on its own line
(`OUTSIDE ce auc = 0.712, expected 0.601-0.655`); 2 on bad input (no finished run, a defense or an attack of the
expected file missing from the run, another evaluation, a malformed file).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ccl.errors import CclError
from ccl.metrics import tpr_key
from ccl.results import Aggregate, AggregateRow, load_aggregate

#: The numbers checked per defense, in the order printed.
NUMBERS = ("test_acc", "auc", tpr_key(0.01), tpr_key(0.001))
#: The least half-width of a range (fractions: 0.02 is 2 points of accuracy or of TPR).
FLOORS = {"test_acc": 0.02, "auc": 0.02, tpr_key(0.01): 0.02, tpr_key(0.001): 0.01}
#: A range is the mean plus or minus max(SPREADS x the standard deviation over seeds, the floor).
SPREADS = 3.0
RULE = (
    "each range: the mean over seeds +- max(3 x the standard deviation over seeds, a floor of 2 points for "
    "test_acc, auc and tpr@0.01, 1 point for tpr@0.001), clipped to [0, 1]; auc and tpr: the worst case over "
    "the attacks run (the highest mean over seeds)"
)


class BadInput(Exception):
    """The run or the expected file cannot be compared (exit status 2)."""


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def measure(row: AggregateRow, evaluation: str) -> dict[str, dict[str, Any]]:
    """number -> {mean, std, attack}: the test accuracy, and each attack metric's worst case over the attacks
    of `evaluation` (the attack with the highest mean; NaN means of attacks that cannot resolve it are skipped)."""
    out: dict[str, dict[str, Any]] = {
        "test_acc": {"mean": row.values["test_acc"], "std": row.values.get("test_acc_std", math.nan)}
    }
    attacks = row.evaluation(evaluation)
    for number in NUMBERS[1:]:
        means = {a: row.metric(a, number, evaluation) for a in attacks}
        finite = {a: m for a, m in means.items() if _finite(m[0])}
        if not finite:
            out[number] = {"mean": math.nan, "std": math.nan, "attack": None}
            continue
        attack = max(finite, key=lambda a: finite[a][0])
        out[number] = {"mean": finite[attack][0], "std": finite[attack][1], "attack": attack}
    return out


def expected_range(mean: float, std: float, floor: float) -> tuple[float, float]:
    """mean +- max(SPREADS x std, floor), clipped to [0, 1] (a std of NaN, one seed, counts as 0)."""
    half = max(SPREADS * (std if _finite(std) else 0.0), floor)
    return max(0.0, mean - half), min(1.0, mean + half)


def expected_from_run(agg: Aggregate, *, evaluation: str, command: str, note: str) -> dict[str, Any]:
    """The expected file's content for the run `agg` (see the module's docstring for the rule)."""
    defenses = {}
    for row in agg.rows:
        numbers = {}
        for number, m in measure(row, evaluation).items():
            entry = {"mean": m["mean"], "std": m["std"], "seeds": len(row.seeds)}
            if _finite(m["mean"]):
                entry["low"], entry["high"] = expected_range(m["mean"], m["std"], FLOORS[number])
            if "attack" in m:
                entry["attack"] = m["attack"]
            numbers[number] = entry
        defenses[row.defense] = numbers
    return {
        "command": command,
        "note": note,
        "evaluation": evaluation,
        "attacks": sorted({a for r in agg.rows for a in r.evaluation(evaluation)}),
        "seeds": sorted({s for r in agg.rows for s in r.seeds}),
        "rule": RULE,
        "defenses": defenses,
    }


def _load_expected(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BadInput(f"The expected ranges {path} cannot be read ({err}).") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("defenses"), dict) or "evaluation" not in raw:
        raise BadInput(f"The expected ranges {path} are malformed: expected keys `evaluation` and `defenses`.")
    return raw


def _check_comparable(agg: Aggregate, expected: dict[str, Any]) -> None:
    """Raises BadInput when the run lacks a defense, the evaluation or an attack of the expected file."""
    rows = {r.defense: r for r in agg.rows}
    missing = [d for d in expected["defenses"] if d not in rows]
    if missing:
        raise BadInput(f"The run has no results for {missing} (it has {sorted(rows)}): run the expected command.")
    evaluation = expected["evaluation"]
    for label in expected["defenses"]:
        have = rows[label].evaluation(evaluation)
        if not have:
            raise BadInput(f"The run's {label} has no {evaluation!r} evaluation (the ranges were measured on it).")
        lacking = sorted(set(expected.get("attacks", [])) - set(have))
        if lacking:
            raise BadInput(
                f"The run's {label} lacks the attacks {lacking} of the expected file: the worst case over fewer "
                "attacks is not the same number; run with every attack of the expected file."
            )


def compare(agg: Aggregate, expected: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per checked number: {defense, number, value, low, high, attack, inside}. A number whose
    expected mean was NaN (no attack resolved it) is reported and not checked (`inside` None)."""
    _check_comparable(agg, expected)
    rows = {r.defense: r for r in agg.rows}
    lines = []
    for label, numbers in expected["defenses"].items():
        measured = measure(rows[label], expected["evaluation"])
        for number in NUMBERS:
            want = numbers.get(number)
            if want is None:
                continue
            value = measured[number]["mean"]
            low, high = want.get("low"), want.get("high")
            if low is None or high is None:
                inside = None
            else:
                inside = _finite(value) and low - 1e-12 <= value <= high + 1e-12
            line = {"defense": label, "number": number, "value": value, "low": low, "high": high, "inside": inside}
            lines.append(line | {"attack": measured[number].get("attack")})
    return lines


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if _finite(v) else "n/a"


def report_lines(lines: list[dict[str, Any]]) -> list[str]:
    """The table of every checked number, then one OUTSIDE line per number outside its range."""
    width = max([len(line["defense"]) for line in lines] + [7])
    out = [f"{'defense':<{width}}  {'number':<9}  {'value':>6}  {'expected':>13}  {'':<8}attack"]
    for line in lines:
        rng = f"{_fmt(line['low'])}-{_fmt(line['high'])}" if line["inside"] is not None else "not checked"
        verdict = {True: "ok", False: "OUTSIDE", None: "-"}[line["inside"]]
        out.append(
            f"{line['defense']:<{width}}  {line['number']:<9}  {_fmt(line['value']):>6}  {rng:>13}  "
            f"{verdict:<8}{line['attack'] or ''}"
        )
    for line in lines:
        if line["inside"] is False:
            out.append(
                f"OUTSIDE {line['defense']} {line['number']} = {_fmt(line['value'])}, expected "
                f"{_fmt(line['low'])}-{_fmt(line['high'])}"
            )
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("run", help="a finished run directory (its metrics.json)")
    p.add_argument("expected", nargs="?", help="the expected ranges, e.g. benchmarks/expected/location30.json")
    p.add_argument("--write", metavar="PATH", help="write the expected ranges of `run` to PATH instead of checking")
    p.add_argument("--evaluation", default=None, help="with --write: the evaluation (default: the run's main one)")
    p.add_argument("--command", default="", help="with --write: the command that made the run")
    p.add_argument("--note", default="", help="with --write: when, on what machine, how long")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        agg = load_aggregate(args.run)
        if args.write:
            evaluation = args.evaluation or agg.main_evaluation
            content = expected_from_run(agg, evaluation=evaluation, command=args.command, note=args.note)
            Path(args.write).write_text(json.dumps(content, indent=2, allow_nan=True) + "\n")
            print(f"wrote the expected ranges of {len(agg.rows)} defenses ({evaluation}) to {args.write}")
            return 0
        if not args.expected:
            raise BadInput("Give the expected ranges (e.g. benchmarks/expected/location30.json) or --write PATH.")
        lines = compare(agg, _load_expected(Path(args.expected)))
    except (BadInput, CclError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(lines)))
    outside = sum(line["inside"] is False for line in lines)
    checked = sum(line["inside"] is not None for line in lines)
    print(f"{checked - outside} of {checked} numbers inside their expected ranges" + (" (see OUTSIDE)" * bool(outside)))
    return 1 if outside else 0


if __name__ == "__main__":
    sys.exit(main())
