"""Fixtures shared by the test files.

Slow tests (`@pytest.mark.slow`, over ~10 s on a 2-core CPU) are left out of `python -m pytest` by pyproject's
addopts; `python -m pytest -m slow` runs them, and .ci/run runs both.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ccl.training import Runtime, torch_threads


@pytest.fixture(scope="session")
def quiet() -> Runtime:
    """The runtime of tests that train: no progress bars, every other option at its default (frozen, so shared)."""
    return Runtime(progress=False)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread for the test: small ops on a loaded 2-core machine run faster, and immune to other
    processes, on one thread. Use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    with torch_threads(1):
        yield


@pytest.fixture
def checkpoint_every_epoch(monkeypatch) -> None:
    """A checkpoint after every epoch (`ccl.training.CHECKPOINT_EVERY_S = 0`), for the tests that interrupt a
    run between two epochs and resume it from there."""
    import ccl.training

    monkeypatch.setattr(ccl.training, "CHECKPOINT_EVERY_S", 0.0)
