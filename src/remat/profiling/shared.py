"""Structurally identical units share one measured time: the median over them.

Consumes per-unit measurements keyed by a structural signature the profiler computes (the unit's
module classes, parameter names, shapes and dtypes); produces the same measurements with every
time replaced by the median over the units whose signature and measured bytes agree. Bytes are
exact and never touched (identical units may hold different bytes by position); times are noisy, and without this four identical transformer blocks get
four different costs, so the solver gives them different actions for no reason and the plan
changes from run to run with the noise. The median over ``k`` identical units is also a better
estimate of each one's time than its own sample. No torch.
"""

from __future__ import annotations

import statistics
from collections.abc import Hashable, Sequence
from typing import Any

from remat.cost.model import UnitProfile

__all__ = ["share_op_times", "share_unit_times"]

_UNIT_TIMES = ("forward_ms", "backward_ms", "recompute_ms")


def _median(values: list[float | None]) -> float | None:
    """The median, or ``None`` where a unit has no such time (then none is shared)."""
    if any(v is None for v in values):
        return None
    return statistics.median(v for v in values if v is not None)


def _groups(keys: Sequence[Hashable]) -> list[list[int]]:
    """Indices of equal keys, groups of two or more, in order of first appearance."""
    found: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        found.setdefault(key, []).append(index)
    return [group for group in found.values() if len(group) > 1]


def share_unit_times(units: Sequence[UnitProfile], signatures: Sequence[Hashable]) -> int:
    """In place: units with equal ``signatures`` and equal forward FLOPs (the same work) take the
    median of each time (forward, backward, recompute, and the cost of each option they share).
    Their bytes may differ by position (the first block's input needs no gradient, the last
    block's backward starts beside the loss's): those stay as measured. Returns how many units
    share a time with another.

    Example:
        >>> from remat.cost.model import UnitProfile
        >>> units = [UnitProfile(fqn=f"b.{i}", keep_bytes=8, forward_ms=ms, backward_ms=2 * ms)
        ...          for i, ms in enumerate([1.0, 1.3, 1.1])]
        >>> units.append(UnitProfile(fqn="head", keep_bytes=8, forward_ms=5.0))
        >>> share_unit_times(units, ["block", "block", "block", "head"])
        3
        >>> [(u.forward_ms, u.backward_ms) for u in units]
        [(1.1, 2.2), (1.1, 2.2), (1.1, 2.2), (5.0, None)]
    """
    keys = [(sig, unit.forward_flops) for sig, unit in zip(signatures, units, strict=True)]
    shared = 0
    for group in _groups(keys):
        members = [units[i] for i in group]
        for name in _UNIT_TIMES:
            value = _median([getattr(u, name) for u in members])
            for unit in members:
                setattr(unit, name, getattr(unit, name) if value is None else value)
        for action in dict.fromkeys(o.action for u in members for o in u.options):
            same = [o for u in members if (o := u.option(action)) is not None]
            cost = _median([o.cost_ms for o in same])
            for option in same:
                option.cost_ms = option.cost_ms if cost is None else cost
        shared += len(group)
    return shared


def share_op_times(
    op_times: Sequence[dict[Any, tuple[float, int]]], signatures: Sequence[Hashable]
) -> list[dict[Any, tuple[float, int]]]:
    """Per-op times of units with equal ``signatures`` and the same ops: each op's time the
    median over them (FLOPs are exact and equal). The save sets offered to every unit are then
    chosen from times that do not differ between identical units by noise alone.

    Example:
        >>> times = [{("mm", 0): (1.0, 8)}, {("mm", 0): (3.0, 8)}, {("mm", 0): (2.5, 8)}]
        >>> share_op_times(times, ["a", "a", "a"])
        [{('mm', 0): (2.5, 8)}, {('mm', 0): (2.5, 8)}, {('mm', 0): (2.5, 8)}]
    """
    result = [dict(unit) for unit in op_times]
    keys = [
        (sig, tuple(sorted((str(op), index, flops) for (op, index), (_, flops) in unit.items())))
        for sig, unit in zip(signatures, op_times, strict=True)
    ]
    for group in _groups(keys):
        for key in op_times[group[0]]:
            ms = statistics.median(op_times[i][key][0] for i in group)
            for i in group:
                result[i][key] = (ms, op_times[i][key][1])
    return result
