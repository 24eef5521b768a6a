"""The README's runnable examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _block_after(heading: str) -> str:
    text = README.read_text()
    section = text.split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("heading", ["## Losses", "## Data, models and training", "## Attacks and metrics"])
def test_readme_example_runs(heading, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_block_after(heading), f"README {heading}", "exec"), {})
