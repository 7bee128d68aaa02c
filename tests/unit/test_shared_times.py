"""Structurally identical units share one measured time (issue 18, deterministic plans)."""

from __future__ import annotations

import torch
from torch import nn

import remat
from remat.cost.model import OptionProfile, UnitProfile
from remat.profiling.shared import share_op_times, share_unit_times


def _unit(fqn: str, ms: float, flops: int = 100, option_ms: float | None = None) -> UnitProfile:
    unit = UnitProfile(
        fqn=fqn, keep_bytes=64, forward_ms=ms, backward_ms=2 * ms, forward_flops=flops
    )
    if option_ms is not None:
        unit.options.append(
            OptionProfile(action="selective:ops.add", retain_bytes=8, cost_ms=option_ms)
        )
    return unit


def test_only_units_of_the_same_structure_and_work_share() -> None:
    units = [_unit("a", 1.0, option_ms=0.1), _unit("b", 3.0, option_ms=0.5), _unit("c", 2.0)]
    units += [_unit("d", 9.0, flops=200), _unit("e", 7.0)]
    shared = share_unit_times(units, ["block", "block", "block", "block", "other"])
    assert shared == 3
    assert [u.forward_ms for u in units] == [2.0, 2.0, 2.0, 9.0, 7.0]  # d: other FLOPs
    assert [u.backward_ms for u in units] == [4.0, 4.0, 4.0, 18.0, 14.0]
    # The option two of them measured: the median of those two; c has none and gets none.
    assert [u.options[0].cost_ms for u in units[:2]] == [0.3, 0.3] and units[2].options == []


def test_a_time_one_unit_lacks_is_not_shared() -> None:
    units = [_unit("a", 1.0), _unit("b", 3.0)]
    units[0].recompute_ms, units[1].recompute_ms = None, 5.0
    share_unit_times(units, ["block", "block"])
    assert [u.recompute_ms for u in units] == [None, 5.0]
    assert [u.forward_ms for u in units] == [2.0, 2.0]


def test_op_times_of_units_with_other_ops_stay_their_own() -> None:
    mm, add = ("mm", 0), ("add", 0)
    times = [{mm: (1.0, 8)}, {mm: (3.0, 8)}, {mm: (5.0, 8), add: (1.0, 0)}]
    assert share_op_times(times, ["b", "b", "b"]) == [{mm: (2.0, 8)}, {mm: (2.0, 8)}, times[2]]


def test_identical_blocks_of_a_model_get_one_time_and_keep_their_bytes() -> None:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(4)]
    model = nn.Sequential(*blocks, nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)))
    prof = remat.profile(
        model, (torch.randn(64, 32),), optimizer="sgd", units=[str(i) for i in range(5)], repeats=1
    )
    same = prof.units[:4]
    for name in ("forward_ms", "backward_ms", "recompute_ms"):
        assert len({getattr(u, name) for u in same}) == 1, name
    for action in {o.action for u in same for o in u.options}:
        assert len({u.option(action).cost_ms for u in same if u.option(action)}) == 1, action
    # Timed in the same rounds, the different last unit keeps its own time.
    assert prof.units[4].forward_flops != same[0].forward_flops
    assert prof.units[4].forward_ms != same[0].forward_ms
