"""Phase timings: nesting, accumulation, no timer no cost, and the line the CLI prints."""

from __future__ import annotations

import time

from ccl.timing import PhaseTimer, active_timer, phase, timed


def busy(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_phases_nest_accumulate_and_stay_within_their_parent():
    timer = PhaseTimer()
    with timer.activate():
        for _ in range(2):
            with phase("score"):
                with phase("lira"):
                    busy(0.01)
                with phase("loss"):
                    pass
        time.sleep(0.02)  # wall time outside any phase, with almost no CPU
    record = timer.to_dict()
    phases = record["phases"]
    assert list(phases) == ["score", "score/lira", "score/loss"]  # in the order they start
    assert phases["score"]["calls"] == phases["score/lira"]["calls"] == 2
    assert phases["score/lira"]["cpu_s"] >= 0.02 - 1e-3
    for key in ("wall_s", "cpu_s"):
        children = phases["score/lira"][key] + phases["score/loss"][key]
        assert 0 <= children <= phases["score"][key] + 1e-3 <= record[key] + 2e-3
    assert record["wall_s"] >= phases["score"]["wall_s"] + 0.02


def test_without_an_active_timer_a_phase_records_nothing():
    assert active_timer() is None

    @phase("score")
    def work() -> int:
        return 3

    assert work() == 3
    timer = PhaseTimer()
    with timer.activate():
        assert active_timer() is timer
        assert work() == 3  # the decorator records on every call into the timer active then
    assert active_timer() is None
    assert timer.to_dict()["phases"]["score"]["calls"] == 1


def test_timed_reuses_the_active_timer_or_makes_one():
    outer = PhaseTimer()
    with outer.activate(), timed() as inner:
        assert inner is outer
    with timed() as fresh:
        assert fresh is not outer and active_timer() is fresh
    assert active_timer() is None


def test_the_printed_line_has_the_top_level_phases_and_cpu_where_it_differs():
    timer = PhaseTimer()
    timer.add("train", 62.2, 60.1)
    timer.add("score", 20.4, 12.0)
    timer.add("score/lira", 5.0, 5.0)
    timer.add("report", 0.42, 0.40)
    line = timer.line()
    assert line.startswith("time: train 62 s | score 20 s (cpu 12) | report 0.4 s | total ")
    assert "lira" not in line
