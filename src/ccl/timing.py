"""Wall and CPU seconds of a command's phases (preflight, train, score, summary, report), for run.json.

A command makes one `PhaseTimer` active (`timed()`); code anywhere below it marks its phases with
`phase(name)`, a context manager or decorator that adds the block's seconds to the active timer and does
nothing when none is active, so no signature carries the timer. Phases nest: a `phase("lira")` inside
`phase("score")` is recorded as "score/lira". A phase entered several times (once per defense and seed)
accumulates its seconds and counts its calls.

Wall time is `time.perf_counter`; CPU time `time.process_time`, the CPU seconds of all threads of this process:
on a loaded machine wall time grows with the load and CPU time much less, so a figure can be compared across
machines and runs. Work done in other processes (Ray workers, data-loader workers) is in wall time only.

Example:
    >>> timer = PhaseTimer()
    >>> with timer.activate():
    ...     with phase("score"):
    ...         with phase("lira"):
    ...             pass
    >>> sorted(timer.to_dict()["phases"])
    ['score', 'score/lira']
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

__all__ = ["PhaseTimer", "active_timer", "phase", "timed"]

#: The active timer and the name of the phase the code is in ("" outside every phase).
_ACTIVE: ContextVar[tuple[PhaseTimer, str] | None] = ContextVar("ccl_phase_timer", default=None)


class PhaseTimer:
    """Accumulates wall and CPU seconds per phase name, in the order phases first start."""

    def __init__(self) -> None:
        self._start_wall = time.perf_counter()
        self._start_cpu = time.process_time()
        self._phases: dict[str, dict[str, float]] = {}
        #: Where the timer's record lives in run.json: (run directory, index of the invocation), set by
        #: `RunDirectory.open` so that phases after it (the report) update the same entry.
        self.invocation: tuple[str, int] | None = None

    def start(self, name: str) -> None:
        """Gives `name` its place in the order of phases (parents before their children)."""
        self._phases.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "calls": 0})

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.start(name)
        entry = self._phases[name]
        entry["wall_s"] += wall
        entry["cpu_s"] += cpu
        entry["calls"] += 1

    @contextlib.contextmanager
    def activate(self) -> Iterator[PhaseTimer]:
        """Makes this the timer `phase` records into, for the block (outside any phase)."""
        token = _ACTIVE.set((self, ""))
        try:
            yield self
        finally:
            _ACTIVE.reset(token)

    def elapsed(self) -> tuple[float, float]:
        """(wall, CPU) seconds since the timer was made."""
        return time.perf_counter() - self._start_wall, time.process_time() - self._start_cpu

    def to_dict(self) -> dict[str, Any]:
        """{"wall_s", "cpu_s": since the timer was made, "phases": {name: {"wall_s", "cpu_s", "calls"}}}."""
        wall, cpu = self.elapsed()
        phases = {
            k: {"wall_s": round(v["wall_s"], 4), "cpu_s": round(v["cpu_s"], 4), "calls": int(v["calls"])}
            for k, v in self._phases.items()
        }
        return {"wall_s": round(wall, 4), "cpu_s": round(cpu, 4), "phases": phases}

    def line(self) -> str:
        """The top-level split in one line, e.g. "time: train 62 s (cpu 60) | score 20 s (cpu 19) | total ...";
        CPU seconds are shown where they differ from the wall seconds by 10% or more."""
        parts = [f"{name} {_seconds(v['wall_s'], v['cpu_s'])}" for name, v in self._phases.items() if "/" not in name]
        return "time: " + " | ".join([*parts, f"total {_seconds(*self.elapsed())}"])


def _seconds(wall: float, cpu: float) -> str:
    digits = 0 if wall >= 10 else 1
    text = f"{wall:.{digits}f} s"
    if abs(cpu - wall) >= 0.1 * max(wall, 1e-9) and max(wall, cpu) >= 0.05:
        text += f" (cpu {cpu:.{digits}f})"
    return text


def active_timer() -> PhaseTimer | None:
    """The timer phases are recorded into now, or None."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Adds the block's wall and CPU seconds to the active timer as `name`, nested under the enclosing phase
    ("score/lira"); does nothing without an active timer. Also a decorator: `@phase("score")`."""
    active = _ACTIVE.get()
    if active is None:
        yield
        return
    timer, outer = active
    full = f"{outer}/{name}" if outer else name
    timer.start(full)
    token = _ACTIVE.set((timer, full))
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        timer.add(full, time.perf_counter() - wall, time.process_time() - cpu)
        _ACTIVE.reset(token)


@contextlib.contextmanager
def timed() -> Iterator[PhaseTimer]:
    """The active timer for the block, or a new one made active for it (a command run from Python rather than
    the CLI). Also a decorator: `@timed()`."""
    timer = active_timer()
    if timer is not None:
        yield timer
        return
    with PhaseTimer().activate() as timer:
        yield timer
