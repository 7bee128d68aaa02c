"""The exact chain solver: the plan with the least recompute cost whose predicted peak fits a budget.

Consumes a :class:`~remat.cost.model.Profile` and a budget; produces a :class:`SolveResult`. Imports
no torch: it runs in milliseconds on synthetic profiles.

The plan is a sequence of blocks over the units in execution order: a kept unit, a recomputed unit,
or a segment of consecutive units replayed once (what ``sqrt(n)`` strategies use; Chen et al. 2016).
A block's worst moments are affine in the retention of the blocks before it (see
:mod:`remat.cost.model`), so a dynamic program over the units whose state is that retention is
exact: at each unit it keeps the Pareto set of (retention, retention outliving the forward, cost)
reachable within the budget, as Rotor's program over discretised memory (Beaumont et al. 2019,
arXiv 1911.13214) does for its chains, here without discretising, and with one choice more per unit.
The least achievable peak (for ``min`` and ``INFEASIBLE``) comes from the same program minimising
the peak instead of the cost.
"""

from __future__ import annotations

import bisect
import dataclasses
import gc
import itertools
import math
import operator
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from remat.cost.distributed import per_rank
from remat.cost.model import (
    TIMED_SOURCES,
    Block,
    BlockCost,
    Profile,
    block_cost,
    evaluate_blocks,
)
from remat.plan import Plan
from remat.solve.budget import Budget

__all__ = ["FEASIBLE", "INFEASIBLE", "OPTIMAL", "SolveResult", "plan_from_blocks", "solve"]

OPTIMAL = "OPTIMAL"
"""The plan has the least recompute cost of all plans that fit (under the profile's model)."""
FEASIBLE = "FEASIBLE"
"""The plan fits; segments were capped in length or states thinned, so a cheaper plan may exist
(see lower_bound)."""
INFEASIBLE = "INFEASIBLE"
"""No plan fits; ``min_peak_bytes`` is the least any plan reaches, and ``plan`` reaches it."""
ACTIONS = ("keep", "recompute", "segment", "nested", "selective", "offload")
EXACT_UP_TO_UNITS = 64


@dataclass(frozen=True, kw_only=True)
class SolveResult:
    """What :func:`solve` found.

    Example:
        >>> from remat.cost.model import example_profile
        >>> result = solve(example_profile(), 1300)
        >>> result.status, result.predicted_peak_bytes <= 1300, result.lower_bound == result.cost
        ('OPTIMAL', True, True)
    """

    status: str
    """``OPTIMAL``, ``FEASIBLE`` or ``INFEASIBLE``."""
    plan: Plan
    """The plan (for ``INFEASIBLE``: the plan with the least peak)."""
    budget_bytes: int
    predicted_peak_bytes: int
    predicted_step_ms: float | None
    predicted_overhead: float | None
    cost: float
    """Recompute cost: ms, or forward FLOPs when the profile has no times."""
    lower_bound: float
    """No plan that fits (using the allowed actions) costs less than this."""
    min_peak_bytes: int
    """The least peak any plan reaches."""
    solve_time_s: float
    where: str = ""
    """The moment of the predicted peak."""
    notes: list[str] = field(default_factory=list)
    measured_peak_bytes: int | None = None
    """The plan's peak as the tracker measured it (set by the closed loop of ``remat.auto_``)."""
    iterations: int = 1
    """Solves the closed loop needed until the measured peak fitted."""

    @property
    def fits(self) -> bool:
        return self.status != INFEASIBLE

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "budget_bytes": self.budget_bytes,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "predicted_step_ms": self.predicted_step_ms,
            "predicted_overhead": self.predicted_overhead,
            "cost": self.cost,
            "lower_bound": self.lower_bound,
            "min_peak_bytes": self.min_peak_bytes,
            "solve_time_s": self.solve_time_s,
            "where": self.where,
            "notes": self.notes,
            "measured_peak_bytes": self.measured_peak_bytes,
            "iterations": self.iterations,
            "plan": self.plan.to_dict(),
        }


def _candidate_blocks(
    profile: Profile, actions: Sequence[str], max_segment: int
) -> list[list[tuple[Block, BlockCost]]]:
    n = len(profile.units)
    starts: list[list[tuple[Block, BlockCost]]] = [[] for _ in range(n)]
    for i in range(n):
        options = []
        if "keep" in actions:
            options.append(Block("keep", i, i))
        if "recompute" in actions:
            options.append(Block("replay", i, i))
        for kind, allowed in (("replay", "segment"), ("nested", "nested")):
            if allowed in actions:
                options += [Block(kind, i, e) for e in range(i + 1, min(n, i + max_segment))]
        for option in profile.units[i].options:
            if option.action.partition(":")[0] in actions:
                options.append(Block("option", i, i, option.action))
        starts[i] = [(block, block_cost(profile, block)) for block in options]
    return starts


_PARETO_ORDER = operator.itemgetter(2, 3, 0, 1)


def _pareto(points: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The states not dominated in (total, persistent, objective): no other state is at most as
    large in all three. O(F log F): a sweep by objective with a staircase of (total, persistent).

    Example:
        >>> [p[:3] for p in _pareto([(5, 5, 1.0, 0, ()), (4, 4, 2.0, 0, ()), (6, 6, 2.0, 0, ())])]
        [(5, 5, 1.0), (4, 4, 2.0)]
    """
    stair_total: list[int] = []  # ascending
    stair_persistent: list[int] = []  # strictly descending
    kept = []
    # Sorted by objective first, a state that repeats an earlier (total, persistent) meets the
    # staircase step it made and is dropped, so duplicates need no pass of their own.
    for point in sorted(points, key=_PARETO_ORDER):
        total, persistent = point[0], point[1]
        i = bisect.bisect_right(stair_total, total) - 1
        if i >= 0 and stair_persistent[i] <= persistent:
            continue  # a state with no larger objective is at most as large here too
        kept.append(point)
        j = i if i >= 0 and stair_total[i] == total else i + 1
        k = j
        while k < len(stair_total) and stair_persistent[k] >= persistent:
            k += 1
        stair_total[j:k] = [total]
        stair_persistent[j:k] = [persistent]
    return kept


WORK_LIMIT = 400_000
"""About how many transitions one run of the program may try; beyond that the states kept per
unit are thinned (see ``_thin``), between 64 and 2000 of them."""


def _frontier_limit(starts: list[list[tuple[Block, BlockCost]]]) -> int:
    options = max(1, sum(len(s) for s in starts))
    return min(2000, max(64, WORK_LIMIT // options))


def _thin(frontier: list[tuple[Any, ...]], limit: int) -> list[tuple[Any, ...]]:
    """Keep one state per cell of a grid of about ``limit / 2`` steps per retention axis.

    Every kept state is exact, so any plan found still fits; only optimality is given up, and
    the result says so (status FEASIBLE, with a lower bound).
    """
    totals = [p[0] for p in frontier]
    persistents = [p[1] for p in frontier]
    steps = max(1, limit // 2)
    q_total = max(1, (max(totals) - min(totals)) // steps + 1)
    q_persistent = max(1, (max(persistents) - min(persistents)) // steps + 1)
    cells: dict[tuple[int, int], tuple[Any, ...]] = {}
    for point in frontier:
        key = (point[0] // q_total, point[1] // q_persistent)
        if key not in cells or (point[2], point[3], point[0], point[1]) < (
            cells[key][2],
            cells[key][3],
            cells[key][0],
            cells[key][1],
        ):
            cells[key] = point
    return _pareto(list(cells.values()))


def _run(
    profile: Profile,
    starts: list[list[tuple[Block, BlockCost]]],
    budget_bytes: float,
    minimise_peak: bool,
    approximate: list[bool],
    ties: _Ties | None = None,
    least_cost: list[float] | None = None,
) -> tuple[float, int, list[Block]] | None:
    """The dynamic program. Returns (cost, peak, blocks) of the best plan, or None if none fits.

    States are (total retention, persistent retention, objective, other, blocks); the objective is
    the cost (the peak so far breaks ties) or, with ``minimise_peak``, the peak so far. With
    ``ties``, the plans that reach the end within its tolerance of the best cost (and, with
    ``minimise_peak``, at the least peak) are a tie, decided by :meth:`_Ties.key`;
    ``least_cost`` then gets the best cost before the tie was decided.
    """
    least_cost = [] if least_cost is None else least_cost
    n = len(profile.units)
    base = profile.base_bytes
    fixed = profile.fixed_peak_bytes
    options = [
        [
            (
                b.end + 1,
                base + c.forward_need_bytes,
                base + c.backward_need_bytes,
                c.delta_bytes,
                c.persistent_delta_bytes,
                c.cost,
                b,
            )
            for b, c in starts[i]
        ]
        for i in range(n)
    ]
    # A state: (total, persistent, objective, other, path); a path is a linked list
    # (block, previous path), so extending it costs nothing.
    states: list[list[tuple[Any, ...]]] = [[] for _ in range(n + 1)]
    states[0] = [(0, 0, fixed, 0.0, None) if minimise_peak else (0, 0, 0.0, fixed, None)]
    thinned = False
    limit = _frontier_limit(starts)
    for i in range(n):
        frontier = _pareto(states[i])
        if len(frontier) > limit:
            frontier = _thin(frontier, limit)
            thinned = True
        states[i] = []
        # The innermost loop of the solver (hundreds of thousands of transitions on 96 units):
        # no function calls in it, one loop per objective.
        appenders = [states[j].append for j in range(n + 1)]
        unit_options = options[i]
        for total, persistent, first, second, path in frontier:
            for end, fwd, bwd, delta, pdelta, block_cost_, block in unit_options:
                moment = total + fwd
                backward = persistent + bwd
                if backward > moment:
                    moment = backward
                if moment > budget_bytes:
                    continue
                if minimise_peak:  # (peak, cost)
                    appenders[end](
                        (
                            total + delta,
                            persistent + pdelta,
                            first if first >= moment else moment,
                            second + block_cost_,
                            (block, path),
                        )
                    )
                else:  # (cost, peak)
                    appenders[end](
                        (
                            total + delta,
                            persistent + pdelta,
                            first + block_cost_,
                            second if second >= moment else moment,
                            (block, path),
                        )
                    )
    ends = []
    for _total, persistent, first, second, path in states[n]:
        cost, peak = (second, first) if minimise_peak else (first, second)
        peak = max(peak, base + persistent + profile.end_need_bytes)
        if peak <= budget_bytes:
            ends.append(((peak, cost) if minimise_peak else (cost, peak), cost, peak, path))
    approximate.append(thinned)  # a run that found nothing may have thinned too
    if not ends:
        return None
    best = min(ends, key=operator.itemgetter(0))
    least_cost.append(best[1])
    if ties is not None:
        tied = [
            end
            for end in ends
            if end[1] <= best[1] + ties.tolerance and (not minimise_peak or end[2] == best[2])
        ]
        best = min(tied, key=lambda end: ties.key(end[3]))
    blocks: list[Block] = []
    path = best[3]
    while path is not None:
        blocks.append(path[0])
        path = path[1]
    return best[1], best[2], blocks[::-1]


@dataclass(frozen=True)
class _Ties:
    """Plans whose measured costs differ by at most ``tolerance`` are a tie: the one that replays
    the fewest FLOPs wins, then the one whose blocks come first in order. Costs are whole
    nanoseconds here (:meth:`program`)."""

    tolerance: float
    flops: dict[Block, float]

    @classmethod
    def of(cls, profile: Profile, starts: list[list[tuple[Block, BlockCost]]]) -> _Ties | None:
        """The profile's ties, or ``None`` where its costs are exact (``time_resolution_ms``)."""
        resolution = profile.time_resolution_ms
        if not resolution or profile.time_source not in TIMED_SOURCES:
            return None
        by_flops = dataclasses.replace(profile, time_source="flops")
        return cls(
            tolerance=round(resolution * 1e6),
            flops={b: block_cost(by_flops, b).cost for start in starts for b, _ in start},
        )

    def key(self, path: Any) -> tuple[Any, ...]:
        """(FLOPs replayed, the blocks in order) of a path of the program: less wins."""
        blocks = []
        while path is not None:
            blocks.append(path[0])
            path = path[1]
        flops = sum(self.flops[b] for b in blocks)
        order = tuple((b.start, b.kind, b.end, b.action or "") for b in reversed(blocks))
        return flops, order

    def program(
        self, profile: Profile, actions: Sequence[str], max_segment: int
    ) -> list[list[tuple[Block, BlockCost]]]:
        """The blocks with every measured time in whole nanoseconds: sums of integers do not
        depend on their order, so plans that differ only in how they group or place the same
        replays (two units recomputed, or one segment of both) cost exactly the same, and the
        rule of :meth:`key`, not rounding, decides between them."""
        units = []
        for unit in profile.units:
            times = {
                name: float(round(value * 1e6))
                for name in ("forward_ms", "backward_ms", "recompute_ms")
                if (value := getattr(unit, name)) is not None
            }
            options = [
                dataclasses.replace(o, cost_ms=float(round(o.cost_ms * 1e6)))
                if o.cost_ms is not None
                else o
                for o in unit.options
            ]
            units.append(dataclasses.replace(unit, **times, options=options))
        return _candidate_blocks(dataclasses.replace(profile, units=units), actions, max_segment)


def plan_from_blocks(profile: Profile, blocks: Sequence[Block], **fields_: Any) -> Plan:
    """The plan that a sequence of blocks describes: one action per unit.

    Example:
        >>> from remat.cost.model import example_profile
        >>> blocks = [Block("keep", 0, 0), Block("replay", 1, 1), Block("replay", 2, 3)]
        >>> plan_from_blocks(example_profile(), blocks).to_dict()["actions"]
        {'b.0': 'keep', 'b.1': 'recompute', 'b.2': 'segment:2', 'b.3': 'segment:2'}
    """
    fqns = profile.unit_fqns
    actions: dict[str, str] = {}
    for block in blocks:
        if block.kind == "keep":
            actions[fqns[block.start]] = "keep"
        elif block.kind == "option":
            actions[fqns[block.start]] = str(block.action)
        elif block.start == block.end:
            actions[fqns[block.start]] = "recompute"
        else:
            kind = "nested" if block.kind == "nested" else "segment"
            for j in range(block.start, block.end + 1):
                actions[fqns[j]] = f"{kind}:{block.start}"
    # the batch it was made for, so that a larger one under the plan is noticed
    batch = {"input_shapes": profile.input_shapes, "base_bytes": profile.base_bytes}
    return Plan(
        actions=actions,
        units=list(fqns),
        fingerprint=profile.fingerprint,
        precision=profile.precision,
        **(batch | fields_),
    )


def _lower_bound(profile: Profile, budget_bytes: int) -> float:
    """A relaxation: at each unit's forward, the retention of the units before it must fit; each
    unit can shed (keep - least retention) at its recompute cost, fractionally."""
    units = profile.units
    best = 0.0
    for i, unit in enumerate(units):
        least_need = min(
            unit.forward_need_keep_bytes,
            unit.forward_need_recompute_bytes,
            unit.forward_need_inner_bytes,
            *(o.forward_need_bytes for o in unit.options),
        )
        room = budget_bytes - profile.base_bytes - least_need
        offers: list[tuple[float, float]] = []
        kept = 0
        for earlier in units[:i]:
            kept += earlier.keep_bytes
            offers += _shedding_offers(earlier, profile.time_source)
        excess = kept - room
        cost = 0.0
        for ratio, saving in sorted(offers):
            if excess <= 0:
                break
            take = min(saving, excess)
            cost += ratio * take
            excess -= take
        if excess <= 0:
            best = max(best, cost)
    return best


def _shedding_offers(unit: Any, time_source: str) -> list[tuple[float, float]]:
    """Pieces (cost per byte, bytes) of the lower convex hull of what shedding a unit's kept bytes
    costs under each of its choices: a fractional relaxation of picking one of them."""
    points = {(0.0, 0.0)}
    least_recompute = min(unit.recompute_bytes, unit.inner_bytes)
    points.add((float(unit.keep_bytes - least_recompute), unit.recompute_cost(time_source)))
    for option in unit.options:
        points.add((float(unit.keep_bytes - option.retain_bytes), option.cost(time_source)))
    hull: list[tuple[float, float]] = []
    for point in sorted(p for p in points if p[0] >= 0):
        while len(hull) > 1 and hull[-1][1] >= point[1]:
            hull.pop()  # shedding more for no more cost
        while len(hull) >= 2 and (hull[-1][1] - hull[-2][1]) * (point[0] - hull[-2][0]) >= (
            point[1] - hull[-2][1]
        ) * (hull[-1][0] - hull[-2][0]):
            hull.pop()
        hull.append(point)
    return [
        ((b[1] - a[1]) / (b[0] - a[0]), b[0] - a[0])
        for a, b in itertools.pairwise(hull)
        if b[0] > a[0]
    ]


def solve(
    profile: Profile,
    budget: int | str | Budget,
    *,
    actions: Sequence[str] = ACTIONS,
    max_segment: int | None = None,
    world_size: int | None = None,
    fsdp: bool | None = None,
) -> SolveResult:
    """The plan with the least recompute cost whose predicted peak is within ``budget``.

    Args:
        profile: from :func:`remat.profile` (or :meth:`Profile.load`-ed JSON).
        budget: bytes, ``"22GiB"``, ``"60%"`` or ``"min"`` (see :class:`Budget`).
        actions: what plans may use: ``keep``, ``recompute``, ``segment``, ``nested``,
            ``selective`` and ``offload`` (the last two where the profile measured them).
        max_segment: longest segment considered; default: all (exact) up to 64 units, else
            ``max(12, ceil(1.5 * sqrt(n)))`` (sqrt(n) is the optimal segment length for equal
            units), which keeps 96 units under a second.
        world_size, fsdp: solve for one of ``world_size`` data-parallel ranks under DDP or FSDP2
            (see :func:`remat.cost.distributed.per_rank`); default: the profile's own. Under FSDP2
            plans use no segments: a unit's replay must run while FSDP2 has gathered its
            parameters, which it does for one unit at a time.

    Returns:
        A :class:`SolveResult`; ``INFEASIBLE`` (never an exception) when no plan fits, with the
        least achievable peak.

    Raises:
        ValueError: a malformed budget or an unknown action.

    Example:
        >>> from remat.cost.model import example_profile
        >>> result = solve(example_profile(), "min")
        >>> result.status, result.predicted_peak_bytes == result.min_peak_bytes
        ('OPTIMAL', True)
        >>> solve(example_profile(), 1000).status
        'INFEASIBLE'
    """
    # The program makes millions of short-lived tuples, none in a reference cycle; the cyclic
    # collector would scan the caller's whole heap for them again and again (with torch and a
    # model loaded, 96 units solved in 1.6 s with it and 0.5 s without).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _solve(profile, budget, actions, max_segment, world_size, fsdp)
    finally:
        if collecting:
            gc.enable()


def _solve(
    profile: Profile,
    budget: int | str | Budget,
    actions: Sequence[str],
    max_segment: int | None,
    world_size: int | None,
    fsdp: bool | None,
) -> SolveResult:
    started = time.perf_counter()
    unknown = [a for a in actions if a not in ACTIONS]
    if unknown or "keep" not in actions:
        raise ValueError(
            f"actions: got {list(actions)}; expected a subset of {list(ACTIONS)} that includes keep"
        )
    if world_size is not None or fsdp is not None:
        profile = per_rank(
            profile,
            world_size=profile.world_size if world_size is None else world_size,
            fsdp=profile.fsdp if fsdp is None else fsdp,
        )
    if profile.fsdp:
        actions = [a for a in actions if a not in ("segment", "nested")]
    parsed = Budget.parse(budget)
    n = len(profile.units)
    exact = max_segment is None and n <= EXACT_UP_TO_UNITS
    if max_segment is None:
        max_segment = n if exact else max(12, math.ceil(1.5 * math.sqrt(n)))
    if max_segment < 1:
        raise ValueError(f"max_segment: got {max_segment}; expected an integer >= 1")
    starts = _candidate_blocks(profile, actions, max_segment)
    approximate: list[bool] = []
    ties = _Ties.of(profile, starts)
    program = starts if ties is None else ties.program(profile, actions, max_segment)
    costs = {b: c.cost for start in starts for b, c in start}

    def run(
        budget_: float, minimise_peak: bool, least_cost: list[float] | None = None
    ) -> tuple[float, int, list[Block]] | None:
        found = _run(profile, program, budget_, minimise_peak, approximate, ties, least_cost)
        if found is None or ties is None:
            return found
        if least_cost:
            least_cost[0] *= 1e-6
        return sum(costs[b] for b in found[2]), found[1], found[2]

    least = run(math.inf, True)
    assert least is not None, "keeping every unit is always a plan"
    min_peak = least[1]
    # A percentage interpolates from this least peak (0%) to the unplanned one (100%), so every
    # percentage is at least min_peak: feasible.
    budget_bytes = parsed.resolve(
        peak_bytes=profile.peak_bytes,
        min_peak_bytes=min_peak,
        device=profile.device,
    )

    def result(
        status: str, cost: float, blocks: list[Block], lower: float, notes: list[str]
    ) -> SolveResult:
        sim = evaluate_blocks(profile, blocks)
        plan = plan_from_blocks(
            profile,
            blocks,
            predicted_peak_bytes=sim.peak_bytes,
            predicted_overhead=sim.overhead,
            budget_bytes=budget_bytes,
            strategy="auto",
        )
        return SolveResult(
            status=status,
            plan=plan,
            budget_bytes=budget_bytes,
            predicted_peak_bytes=sim.peak_bytes,
            predicted_step_ms=sim.step_ms,
            predicted_overhead=sim.overhead,
            cost=cost,
            lower_bound=lower,
            min_peak_bytes=min_peak,
            solve_time_s=time.perf_counter() - started,
            where=sim.where,
            notes=notes,
        )

    if budget_bytes < min_peak:
        cheapest = run(min_peak, False)
        if cheapest is None:  # thinned states only (as below): the least-peak plan itself
            assert any(approximate), "a plan reaches the least peak"
            cheapest = least
        cost, _, blocks = cheapest
        where = evaluate_blocks(profile, blocks).where
        note = (
            f"no plan fits {budget_bytes:,} bytes; the least achievable peak is {min_peak:,} bytes"
            f" (at {where})"
        )
        return result(INFEASIBLE, cost, blocks, cost, [note])
    least_cost: list[float] = []
    found = run(budget_bytes, False, least_cost)
    notes = []
    if found is None:
        # Only with states thinned: the cheapest-plan run dropped every state that fits, while
        # the least-peak run kept one. That plan fits, so it is the answer (not optimal).
        assert any(approximate), "the least-peak plan fits, so the exact program finds one"
        found = least
        notes.append("the least-peak plan: thinned states lost every cheaper plan that fits")
    cost, _peak, blocks = found
    exact = exact and not any(approximate)
    # A tie (``ties``) may take a plan up to its tolerance dearer than the cheapest one found.
    cheapest_cost = min(least_cost[0], cost) if least_cost and found is not least else cost
    lower = cheapest_cost if exact else min(cheapest_cost, _lower_bound(profile, budget_bytes))
    if max_segment < n:
        notes.append(f"segments capped at {max_segment} units (n = {n})")
    if ties is not None and cost > cheapest_cost + 1e-6:
        notes.append(
            f"costs within {ties.tolerance * 1e-6:.3g} ms (the timing resolution) are a tie,"
            f" decided by FLOPs: this plan replays fewer, for {cost - cheapest_cost:.3g} ms more"
            " than the cheapest"
        )
    if any(approximate):
        notes.append(
            f"states thinned to about {_frontier_limit(starts)} per unit (mixed unit sizes)"
        )
    solved = result(OPTIMAL if exact else FEASIBLE, cost, blocks, lower, notes)
    assert solved.predicted_peak_bytes <= budget_bytes, (solved.predicted_peak_bytes, budget_bytes)
    return solved
