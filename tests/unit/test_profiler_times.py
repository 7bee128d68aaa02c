"""How the profiler prices recompute and save sets from a unit's forward time and what its engines
cost (``_recompute_ms``, ``_selective_ms``), on made-up figures: the tests that time real steps
cannot tell a formula from a measurement. And the engine timings themselves, on a unit whose
costs are known in proportion (``time_unit_engines``)."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn

from remat.profiling.options import EngineCost, UnitEngine, engine_cost, time_unit_engines

profiler = importlib.import_module("remat.profiling.profiler")
PROBE = EngineCost(unit_ms=0.5, op_ms=0.02)


def test_recompute_is_the_forward_scaled_by_what_recomputing_took_alone() -> None:
    alone = UnitEngine(recompute_share=1.25, engine_share=0.1)
    assert profiler._recompute_ms(8.0, PROBE, alone) == 10.0
    # a share under one (the unit alone ran its recompute faster than its forward): the forward
    assert profiler._recompute_ms(8.0, PROBE, UnitEngine(0.75, None)) == 8.0
    # not timed alone: the forward and the probe's cost per unit
    assert profiler._recompute_ms(8.0, PROBE, None) == 8.5


def test_no_recompute_time_without_timed_steps() -> None:
    assert profiler._recompute_ms(None, PROBE, None) is None
    assert profiler._recompute_ms(8.0, None, None) is None


def test_save_set_is_its_replay_share_run_again_and_the_engine() -> None:
    alone = UnitEngine(recompute_share=1.5, engine_share=0.2)
    # 10 ms forward, the replay runs 40% of its op time: 4 ms, 1.5x in backward, + 2 ms engine
    assert profiler._selective_ms(10.0, 0.4, 50, PROBE, alone) == pytest.approx(8.0)
    # without an engine timing alone: the share and the probe's cost per op (50 ops x 0.02)
    assert profiler._selective_ms(10.0, 0.4, 50, PROBE, None) == pytest.approx(5.0)
    assert profiler._selective_ms(10.0, 0.4, 50, PROBE, UnitEngine(1.5, None)) == pytest.approx(5.0)
    # a share is clamped to [0, 1]: a save set never replays more than the forward
    assert profiler._selective_ms(10.0, 3.0, 0, PROBE, None) == pytest.approx(10.0)


class _Heavy(nn.Module):
    """A unit whose forward is two matmuls of very different size: recomputing it costs a
    forward, whatever the engine."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(256, 256)
        self.b = nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_unit_engines_are_timed_once_per_distinct_unit_and_price_recompute_near_a_forward() -> None:
    model = nn.Sequential(_Heavy(), _Heavy(), nn.Linear(256, 4))
    every = "ops.addmm.t.tanh"
    found = time_unit_engines(
        model, (torch.randn(256, 256),), ["0", "1"], [every, every], ["h", "h"], rounds=3
    )
    assert found[0] is found[1]  # one timing for the two identical units
    assert found[0] is not None and found[0].engine_share is not None
    # recomputing runs the forward again: at least most of one, and not many (a broken timing,
    # say forward and backward swapped, lands far outside)
    assert 0.5 < found[0].recompute_share < 4.0
    assert found[0].engine_share >= 0.0


def test_a_unit_that_cannot_run_alone_is_not_timed() -> None:
    class Frozen(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.detach() * 2  # no output needs a gradient

    model = nn.Sequential(Frozen(), nn.Linear(4, 4))
    assert time_unit_engines(model, (torch.randn(2, 4),), ["0"], [None], ["f"], rounds=1) == [None]


def test_engine_probe_is_nonnegative_and_none_on_meta() -> None:
    cost = engine_cost(torch.device("cpu"), repeats=2)
    assert cost is not None and cost.unit_ms >= 0.0 and cost.op_ms >= 0.0
    assert engine_cost(torch.device("meta")) is None
