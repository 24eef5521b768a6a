"""The house reads well: no function longer than a screen, the core free of the pipeline (see test_pipeline)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ccl"
#: The longest function the package may hold, in lines (signature and docstring included).
MAX_LINES = 80


def test_no_function_in_the_package_is_longer_than_a_screen():
    long = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_the_recipe_flags_are_built_from_the_recipe():
    """Types, defaults, choices and help of the recipe's flags come from `Recipe`'s fields, spelled once."""
    import dataclasses

    from ccl import cli
    from ccl.training import Recipe

    recipe_group = next(
        g for g in cli.make_parser()._subparsers._group_actions[0].choices["compare"]._action_groups
        if g.title.startswith("training recipe")
    )
    flags = {a.dest: a for a in recipe_group._group_actions}
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    assert set(flags) == set(cli._RECIPE_FLAGS)
    for name, action in flags.items():
        f = fields[name]
        if "choices" in f.metadata:
            assert list(action.choices) == list(f.metadata["choices"]) and str(f.default) in action.help
        elif not isinstance(f.default, bool):
            assert action.type is type(f.default) and f"{f.default:g}" in action.help
    args = cli.make_parser().parse_args(["compare", "--lr", "0.3", "--schedule", "constant"])
    assert cli.flag_layer(args)["train"] == {"lr": 0.3, "schedule": "constant"}
