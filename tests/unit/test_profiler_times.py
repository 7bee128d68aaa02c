"""How the profiler turns timed rounds into a unit's recompute time (``_recompute_ms``), on made-up
timings: the tests that time real steps cannot tell its clamp from a measurement."""

from __future__ import annotations

import importlib

profiler = importlib.import_module("remat.profiling.profiler")


def rounds(forward_ms: list[float], backward_ms: list[float]) -> tuple[None, list, list]:
    return None, forward_ms, backward_ms


def test_recompute_is_what_recomputing_added_to_forward_and_backward() -> None:
    kept = rounds([2.0, 1.0], [3.0, 2.0])
    # unit 0: recomputed, its forward and backward took 2 + 8 = 10 against 2 + 3 kept: 5 more
    recomputed = rounds([2.0, 1.0], [8.0, 2.5])
    assert profiler._recompute_ms(kept, recomputed, 0) == 5.0
    # unit 1: 0.5 more measured, less than its 1.0 forward, which a replay always runs: 1.0
    assert profiler._recompute_ms(kept, recomputed, 1) == 1.0


def test_no_recompute_time_without_timed_rounds() -> None:
    kept = rounds([2.0], [3.0])
    assert profiler._recompute_ms(kept, None, 0) is None
    assert profiler._recompute_ms(rounds([None], [3.0]), rounds([2.0], [8.0]), 0) is None
