"""Tests of the torch-free chain solver (remat.solve.solver) and budgets (remat.solve.budget).

The solver's answers are checked against a brute force written here: every way to cut a small
chain into blocks (keep one unit, recompute one unit, or replay a run of units as one segment),
each evaluated with the model's own simulator (``evaluate_blocks``). Profiles are random but
plausible (non-negative sizes, retentions that shrink from keep to recompute, some missing backward
needs). Nothing here imports torch directly; the solver modules are also imported in a subprocess
without the ``remat`` package (whose ``__init__`` imports torch) to check they need none.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from remat.cost import model as model_module
from remat.cost.model import (
    Block,
    Profile,
    UnitProfile,
    evaluate_blocks,
    example_profile,
    simulate,
)
from remat.plan import Plan
from remat.solve import solver as solver_module
from remat.solve.budget import ACCEPTED_BUDGETS, Budget
from remat.solve.solver import (
    FEASIBLE,
    INFEASIBLE,
    OPTIMAL,
    SolveResult,
    plan_from_blocks,
    solve,
)

ALL_ACTIONS = tuple(solver_module.ACTIONS)  # keep, recompute, segment (and nested, if offered)
CLASSIC = ("keep", "recompute", "segment")
GROUP_KIND = {"segment": "replay", "nested": "nested"}  # action -> Block kind of a multi-unit run
PROPERTY = settings(
    derandomize=True,
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ------------------------------------------------------------------------------ random profiles
def _unit(
    fqn: str,
    *,
    keep: int,
    recompute: int,
    inner: int,
    input_freed: int,
    needs: Sequence[int],
    excess: int,
    backward: Sequence[int | None],
    forward_ms: float,
    forward_only: Sequence[int],
) -> UnitProfile:
    return UnitProfile(
        fqn=fqn,
        keep_bytes=keep,
        recompute_bytes=recompute,
        inner_bytes=inner,
        keep_forward_only_bytes=forward_only[0],
        recompute_forward_only_bytes=forward_only[1],
        inner_forward_only_bytes=forward_only[2],
        input_freed_bytes=input_freed,
        forward_need_keep_bytes=needs[0],
        forward_need_recompute_bytes=needs[1],
        forward_need_inner_bytes=needs[2],
        forward_excess_bytes=excess,
        backward_need_keep_bytes=backward[0],
        backward_need_recompute_bytes=backward[1],
        backward_start_recompute_bytes=backward[2],
        forward_ms=forward_ms,
    )


def _finish(
    units: list[UnitProfile],
    *,
    static: int,
    base_extra: int,
    fixed_extra: int,
    end_need: int,
    fingerprint: bool = False,
) -> Profile:
    """A profile around ``units`` whose ``peak_bytes`` is the unplanned (all-keep) peak."""
    base = static + base_extra
    profile = Profile(
        units=units,
        static_bytes=static,
        base_bytes=base,
        fixed_peak_bytes=base + fixed_extra,
        end_need_bytes=end_need,
        peak_bytes=0,
        step_ms=3 * sum(u.forward_ms or 0 for u in units) + 1.0,
        fingerprint={"model": "synthetic", "units": len(units)} if fingerprint else None,
    )
    profile.peak_bytes = evaluate_blocks(profile, keep_all(len(units))).peak_bytes
    return profile


@st.composite
def profiles(draw: st.DrawFn, max_units: int = 6) -> Profile:
    """A chain of 1..max_units units with plausible random figures."""
    n = draw(st.integers(1, max_units))
    maybe_none = st.one_of(st.none(), st.integers(0, 600)) if draw(st.booleans()) else None
    units = []
    previous_recompute = 0
    for i in range(n):
        keep = draw(st.integers(0, 500))
        recompute = draw(st.integers(0, keep))
        inner = draw(
            st.one_of(st.just(0), st.integers(-previous_recompute, 0), st.integers(0, recompute))
        )
        backward = [
            draw(maybe_none if maybe_none is not None else st.integers(0, 600)) for _ in range(3)
        ]
        units.append(
            _unit(
                f"blocks.{i}",
                keep=keep,
                recompute=recompute,
                inner=inner,
                input_freed=draw(st.integers(0, 200)),
                needs=[draw(st.integers(0, 600)) for _ in range(3)],
                excess=draw(st.integers(0, 400)),
                backward=backward,
                forward_ms=draw(
                    st.one_of(
                        st.integers(1, 20),
                        st.floats(0.01, 20.0, allow_nan=False, allow_infinity=False),
                    )
                ),
                forward_only=[
                    draw(st.integers(0, keep)),
                    draw(st.integers(0, recompute)),
                    draw(st.integers(0, max(inner, 0))),
                ],
            )
        )
        previous_recompute = recompute
    return _finish(
        units,
        static=draw(st.integers(1, 2000)),
        base_extra=draw(st.integers(100, 600)),
        fixed_extra=draw(st.one_of(st.just(0), st.integers(0, 1500))),
        end_need=draw(st.integers(0, 600)),
        fingerprint=draw(st.booleans()),
    )


STAGES = (1, 2)  # KiB per output in each stage of staged_profile


def staged_profile(num_units: int = 96) -> Profile:
    """A long chain shaped like a real network: an embedding, stages of different widths
    (``STAGES``), each alternating a wide unit (10 outputs kept) and a narrow one (6), and a head;
    recomputing costs in proportion to what a unit keeps."""
    kib = 2**10
    units = []
    for i in range(num_units):
        width = STAGES[len(STAGES) * i // num_units] * kib
        keep = 24 * kib if i in (0, num_units - 1) else (10 if i % 2 else 6) * width
        units.append(
            UnitProfile(
                fqn=f"layers.{i}",
                keep_bytes=keep,
                recompute_bytes=width,
                inner_bytes=0,
                input_freed_bytes=width,
                forward_need_keep_bytes=keep + width,
                forward_need_recompute_bytes=2 * width,
                forward_need_inner_bytes=2 * width,
                forward_excess_bytes=keep + width,
                backward_need_keep_bytes=2 * keep,
                backward_need_recompute_bytes=3 * keep,
                backward_start_recompute_bytes=width,
                forward_ms=keep / kib / 4,
            )
        )
    return _finish(
        units, static=2**20, base_extra=64 * kib, fixed_extra=128 * kib, end_need=256 * kib
    )


# ---------------------------------------------------------------------------------- brute force
def keep_all(n: int) -> list[Block]:
    return [Block("keep", i, i) for i in range(n)]


def block_sequences(
    n: int, actions: Sequence[str] = ALL_ACTIONS, max_segment: int | None = None
) -> list[tuple[Block, ...]]:
    """Every cut of units 0..n-1 into consecutive blocks that ``actions`` and ``max_segment``
    (longest segment, in units) allow: keep one unit, recompute one unit, or replay a run of two or
    more units as a segment (or a nested segment, where the solver offers it)."""
    longest = n if max_segment is None else max_segment

    def cuts(start: int) -> list[tuple[Block, ...]]:
        if start == n:
            return [()]
        options = []
        if "keep" in actions:
            options.append(Block("keep", start, start))
        if "recompute" in actions:
            options.append(Block("replay", start, start))
        for action, kind in GROUP_KIND.items():
            if action in actions:
                for length in range(2, longest + 1):
                    if start + length <= n:
                        options.append(Block(kind, start, start + length - 1))
        return [(block, *rest) for block in options for rest in cuts(block.end + 1)]

    return cuts(0)


def brute_force(
    profile: Profile, actions: Sequence[str] = ALL_ACTIONS, max_segment: int | None = None
) -> list[tuple[float, int, tuple[Block, ...]]]:
    """(recompute cost, peak, blocks) of every plan."""
    results = []
    for blocks in block_sequences(len(profile.units), actions, max_segment):
        sim = evaluate_blocks(profile, blocks)
        results.append((sim.recompute_cost, sim.peak_bytes, blocks))
    return results


def least_cost(plans: list[tuple[float, int, tuple[Block, ...]]], budget: int) -> float | None:
    costs = [cost for cost, peak, _ in plans if peak <= budget]
    return min(costs) if costs else None


def test_block_sequences_counts() -> None:
    # a(n) = 2 a(n-1) + a(n-2) + ... + a(0): keep or recompute the first unit, or a segment.
    assert [len(block_sequences(n, CLASSIC)) for n in range(7)] == [1, 2, 5, 13, 34, 89, 233]
    assert [len(block_sequences(n, ("keep", "recompute"))) for n in range(5)] == [1, 2, 4, 8, 16]
    assert len(block_sequences(5, max_segment=1)) == 32
    assert len(block_sequences(3, ("keep",))) == 1


@st.composite
def profile_and_budget(draw: st.DrawFn) -> tuple[Profile, int]:
    """A profile and a budget: sometimes below the least peak, sometimes above the unplanned
    peak, sometimes exactly some plan's peak, usually in between."""
    profile = draw(profiles())
    peaks = sorted({peak for _, peak, _ in brute_force(profile)})
    least, unplanned = peaks[0], profile.peak_bytes
    regime = draw(st.integers(0, 9))  # hypothesis favours small numbers: the usual case first
    if regime <= 5:
        budget = draw(st.integers(least, unplanned))
    elif regime <= 7:
        budget = draw(st.sampled_from(peaks))
    elif regime == 8:
        budget = least - draw(st.integers(1, least - 1))
    else:
        budget = unplanned + draw(st.integers(0, 10**6))
    return profile, budget


def check_result_consistent(profile: Profile, result: SolveResult) -> None:
    """What every result must satisfy, whatever its status."""
    sim = simulate(profile, result.plan)
    assert sim.peak_bytes == result.predicted_peak_bytes
    assert math.isclose(sim.recompute_cost, result.cost, rel_tol=1e-9, abs_tol=1e-9)
    assert sim.step_ms == result.predicted_step_ms or math.isclose(
        sim.step_ms, result.predicted_step_ms, rel_tol=1e-9
    )
    assert result.plan.units == profile.unit_fqns
    assert set(result.plan.actions) == set(profile.unit_fqns)
    assert result.plan.budget_bytes == result.budget_bytes
    assert result.plan.predicted_peak_bytes == result.predicted_peak_bytes
    assert result.plan.fingerprint == profile.fingerprint
    assert result.fits == (result.status != INFEASIBLE)


# ---------------------------------------------------------------------- 3. exact against brute
@PROPERTY
@given(profile_and_budget())
def test_solve_matches_brute_force(case: tuple[Profile, int]) -> None:
    profile, budget = case
    plans = brute_force(profile)
    least_peak = min(peak for _, peak, _ in plans)
    best = least_cost(plans, budget)

    result = solve(profile, budget)

    assert result.budget_bytes == budget
    assert result.min_peak_bytes == least_peak
    check_result_consistent(profile, result)
    if best is not None:
        assert result.status == OPTIMAL
        assert math.isclose(result.cost, best, rel_tol=1e-9, abs_tol=1e-9), (result.cost, best)
        assert result.predicted_peak_bytes <= budget
        assert result.lower_bound == result.cost  # documented: an exact solve's bound is its cost
        # the relaxation a capped or thinned solve reports is below the true optimum
        assert solver_module._lower_bound(profile, budget) <= best + 1e-9, (
            solver_module._lower_bound(profile, budget),
            best,
        )
        assert result.notes == []
    else:
        assert result.status == INFEASIBLE
        assert result.predicted_peak_bytes == least_peak
        assert simulate(profile, result.plan).peak_bytes == least_peak
        cheapest = least_cost(plans, least_peak)  # the cheapest of the plans with the least peak
        assert math.isclose(result.cost, cheapest, rel_tol=1e-9, abs_tol=1e-9)
        assert str(least_peak) in result.notes[0].replace(",", "")


@PROPERTY
@given(profiles())
def test_min_budget_reaches_least_peak_at_least_cost(profile: Profile) -> None:
    plans = brute_force(profile)
    least_peak = min(peak for _, peak, _ in plans)
    result = solve(profile, "min")
    assert result.status == OPTIMAL
    assert result.budget_bytes == result.min_peak_bytes == least_peak
    assert simulate(profile, result.plan).peak_bytes == least_peak
    assert math.isclose(result.cost, least_cost(plans, least_peak), rel_tol=1e-9, abs_tol=1e-9)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(
    profile_and_budget(),
    st.sampled_from(
        [
            ("keep",),
            ("keep", "recompute"),
            ("keep", "segment"),
            ("recompute", "keep", "segment"),
            *[("keep", action) for action in ALL_ACTIONS if action not in CLASSIC],
        ]
    ),
    st.one_of(st.none(), st.integers(1, 4)),
)
def test_restricted_solve_matches_restricted_brute_force(
    case: tuple[Profile, int], actions: tuple[str, ...], max_segment: int | None
) -> None:
    """With fewer actions or capped segments the program is exact over the plans it may use; a
    capped result is FEASIBLE, and its lower bound holds against every plan it may use (and, with
    every action allowed, against uncapped plans too)."""
    profile, budget = case
    allowed = brute_force(profile, actions, max_segment)
    least_peak = min(peak for _, peak, _ in allowed)
    best = least_cost(allowed, budget)
    best_any = least_cost(brute_force(profile), budget)

    result = solve(profile, budget, actions=actions, max_segment=max_segment)

    assert result.min_peak_bytes == least_peak
    check_result_consistent(profile, result)
    kinds = {action.kind for action in result.plan.actions.values()}
    assert kinds <= set(actions)
    if best is None:
        assert result.status == INFEASIBLE
        assert result.predicted_peak_bytes == least_peak
        return
    assert result.status == (OPTIMAL if max_segment is None else FEASIBLE)
    assert math.isclose(result.cost, best, rel_tol=1e-9, abs_tol=1e-9)
    assert result.predicted_peak_bytes <= budget
    # the relaxation (every option, fractional) is below the optimum over every plan, capped or
    # not, restricted or not; the result's bound is the cost when exact, else the lesser of both
    assert best_any is not None
    assert solver_module._lower_bound(profile, budget) <= best_any + 1e-9, (
        solver_module._lower_bound(profile, budget),
        best_any,
    )
    if set(actions) == set(ALL_ACTIONS):  # capped segments: the bound holds for uncapped plans too
        assert best_any is not None
        assert result.lower_bound <= best_any + 1e-9, (result.lower_bound, best_any)


# -------------------------------------------------------------------------- 4. monotone in budget
@settings(derandomize=True, max_examples=200, deadline=None)
@given(profiles())
def test_cost_never_rises_as_budget_grows(profile: Profile) -> None:
    least = solve(profile, "min").min_peak_bytes
    unplanned = profile.peak_bytes
    budgets = sorted({least + (unplanned - least) * k // 14 for k in range(15)})
    costs = []
    for budget in budgets:
        result = solve(profile, budget)
        assert result.status == OPTIMAL
        costs.append(result.cost)
    assert all(later <= earlier + 1e-9 for earlier, later in itertools.pairwise(costs)), costs
    assert costs[-1] == 0.0  # the unplanned peak admits keeping everything


# ------------------------------------------------------------------------------- 5. the regimes
def hand_profile() -> Profile:
    """Four units; blocks.1 is large (400 bytes kept) and dearer to recompute (2.5 ms).

    All kept, the retention before each unit's forward is 0, 100, 500, 600, so the forward moments
    are base (1000) + that + 50 = 1050, 1150, 1550, 1650, and after the forward base + 700 = 1700
    (the unplanned peak, at the loss). Recomputing a unit leaves 10 bytes instead of its keep_bytes.
    """
    units = [
        UnitProfile(
            fqn=f"blocks.{i}",
            keep_bytes=keep,
            recompute_bytes=10,
            inner_bytes=0,
            input_freed_bytes=10,
            forward_need_keep_bytes=50,
            forward_need_recompute_bytes=50,
            forward_need_inner_bytes=50,
            forward_excess_bytes=50,
            backward_need_keep_bytes=50,
            backward_need_recompute_bytes=50,
            backward_start_recompute_bytes=10,
            forward_ms=ms,
        )
        for i, (keep, ms) in enumerate([(100, 1.0), (400, 2.5), (100, 1.0), (100, 1.0)])
    ]
    return Profile(
        units=units,
        static_bytes=900,
        base_bytes=1000,
        fixed_peak_bytes=1000,
        end_need_bytes=0,
        peak_bytes=1700,
        step_ms=20.0,
    )


def actions_of(result: SolveResult) -> dict[str, str]:
    return {fqn: str(action) for fqn, action in result.plan.actions.items()}


@pytest.mark.parametrize("profile", [example_profile(), hand_profile()], ids=["example", "hand"])
def test_budget_not_binding_keeps_everything(profile: Profile) -> None:
    assert simulate(profile, Plan()).peak_bytes == profile.peak_bytes
    for budget in (profile.peak_bytes, profile.peak_bytes + 1, 10**12, "100%"):
        result = solve(profile, budget)
        assert result.status == OPTIMAL
        assert result.cost == 0.0
        assert set(actions_of(result).values()) == {"keep"}
        assert result.predicted_peak_bytes == profile.peak_bytes
        assert result.predicted_overhead == 1.0


def test_binding_budget_hand_profile() -> None:
    # Budget 1500: blocks.3's forward needs retention before it <= 450 (of 600) and the loss needs
    # the final retention <= 500 (of 700). Recomputing blocks.1 alone sheds 390 for 2.5 ms: 310
    # retained, moments at most 1310. Without blocks.1, each other unit sheds 90 for 1 ms; the
    # forward of blocks.3 needs blocks.0 and blocks.2 (180 >= 150) and the loss then blocks.3 too
    # (270 >= 200): 3 ms. A segment ending at blocks.3 holds blocks.0..2's retention at its first
    # forward (1000 + 500 + 10 + 50 > 1500); a segment with blocks.1 costs at least 3.5 ms (a nested
    # segment more: it replays all but its last unit twice). So the only optimum recomputes
    # blocks.1, at a peak of 1310 (the loss).
    profile = hand_profile()
    result = solve(profile, 1500)
    assert result.status == OPTIMAL
    assert actions_of(result) == {
        "blocks.0": "keep",
        "blocks.1": "recompute",
        "blocks.2": "keep",
        "blocks.3": "keep",
    }
    assert result.cost == 2.5
    assert result.predicted_peak_bytes == 1310
    assert result.where == "loss and head"
    assert result.predicted_step_ms == 22.5


def test_binding_budget_example_profile() -> None:
    # example_profile: identical units keeping 100 bytes (10 when recomputed); kept, the forward of
    # b.i peaks at 1000 + 100 i + 150, so b.3's reaches 1450. Budget 1400: one recompute (1 ms) is
    # needed, and suffices if it is before b.3 (b.3 then peaks at 1000 + 210 + 150 = 1360), but a
    # recomputed unit's backward needs 230 over what precedes it: 1000 + 100 i + 230 <= 1400 only for
    # i <= 1. So the optimum recomputes exactly one of b.0, b.1 and keeps the rest.
    profile = example_profile()
    result = solve(profile, 1400)
    assert result.status == OPTIMAL
    assert result.cost == 1.0
    actions = actions_of(result)
    recomputed = [fqn for fqn, action in actions.items() if action != "keep"]
    assert len(recomputed) == 1 and recomputed[0] in ("b.0", "b.1")
    assert actions[recomputed[0]] == "recompute"
    assert result.predicted_peak_bytes <= 1400


@pytest.mark.parametrize("profile", [example_profile(), hand_profile()], ids=["example", "hand"])
def test_infeasible_returns_least_peak_plan(profile: Profile) -> None:
    least = min(peak for _, peak, _ in brute_force(profile))
    for budget in (least - 1, profile.base_bytes, 1):
        result = solve(profile, budget)
        assert result.status == INFEASIBLE
        assert not result.fits
        assert result.min_peak_bytes == result.predicted_peak_bytes == least
        assert simulate(profile, result.plan).peak_bytes == least
        assert "no plan fits" in result.notes[0]
    assert solve(profile, least).status == OPTIMAL


def test_hand_profile_least_peak() -> None:
    # With keep, recompute and segments: everything recomputed retains 10 per unit, so blocks.3's
    # forward and backward peak at 1000 + 30 + 50 = 1080. Keeping blocks.3 leaves 130 at the loss
    # (1130); a segment replays its units' kept activations in backward (at least
    # 1000 + 100 + 50 = 1150 for one that ends after blocks.0). So 1080 is the least.
    profile = hand_profile()
    result = solve(profile, "min", actions=CLASSIC)
    assert result.status == OPTIMAL
    assert result.min_peak_bytes == result.predicted_peak_bytes == 1080
    assert set(actions_of(result).values()) == {"recompute"}
    assert solve(profile, 1079, actions=CLASSIC).status == INFEASIBLE
    # More actions can only lower it.
    assert solve(profile, "min").min_peak_bytes <= 1080


@pytest.mark.parametrize("profile", [example_profile(), hand_profile(), example_profile(7)])
def test_min_budget_plan_reaches_min_peak(profile: Profile) -> None:
    result = solve(profile, "min")
    assert result.status == OPTIMAL
    assert simulate(profile, result.plan).peak_bytes == result.min_peak_bytes
    assert result.budget_bytes == result.min_peak_bytes
    assert solve(profile, Budget.parse("min")).cost == result.cost


def test_flops_profile_costs_flops() -> None:
    profile = hand_profile()
    profile.time_source = "flops"
    profile.step_ms = None
    for i, unit in enumerate(profile.units):
        unit.forward_ms = None
        unit.forward_flops = [10, 25, 10, 10][i] * 10**9
    result = solve(profile, 1500)
    assert result.status == OPTIMAL
    assert actions_of(result)["blocks.1"] == "recompute"
    assert result.cost == 25e9
    assert result.predicted_step_ms is None and result.predicted_overhead is None


# ------------------------------------------------------------------------------------- 6. actions
@settings(derandomize=True, max_examples=100, deadline=None)
@given(profile_and_budget())
def test_keep_and_recompute_never_segments(case: tuple[Profile, int]) -> None:
    profile, budget = case
    result = solve(profile, budget, actions=("keep", "recompute"))
    kinds = {action.kind for action in result.plan.actions.values()}
    assert "segment" not in kinds
    assert kinds <= {"keep", "recompute"}


def test_keep_only_is_the_unplanned_step() -> None:
    profile = hand_profile()
    result = solve(profile, profile.peak_bytes, actions=("keep",))
    assert result.status == OPTIMAL and result.cost == 0.0
    result = solve(profile, profile.peak_bytes - 1, actions=("keep",))
    assert result.status == INFEASIBLE
    assert result.min_peak_bytes == profile.peak_bytes


@pytest.mark.parametrize(
    "actions",
    [("recompute",), ("recompute", "segment"), (), ("keep", "checkpoint"), ("keep", "Segment")],
)
def test_bad_actions_raise(actions: tuple[str, ...]) -> None:
    with pytest.raises(ValueError, match="includes keep"):
        solve(example_profile(), 1300, actions=actions)


@pytest.mark.parametrize("max_segment", [0, -3])
def test_bad_max_segment_raises(max_segment: int) -> None:
    with pytest.raises(ValueError, match="max_segment"):
        solve(example_profile(), 1300, max_segment=max_segment)


def test_plan_from_blocks_labels_segments_apart() -> None:
    profile = example_profile(6)
    blocks = [
        Block("replay", 0, 1),
        Block("replay", 2, 3),
        Block("keep", 4, 4),
        Block("replay", 5, 5),
    ]
    plan = plan_from_blocks(profile, blocks)
    assert model_module.blocks_of(profile, plan) == blocks
    assert simulate(profile, plan) == evaluate_blocks(profile, blocks)


# ------------------------------------------------------------------------------------- 7. budgets
@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("22GiB", "bytes", 22 * 2**30),
        ("22GB", "bytes", 22 * 10**9),
        (" 22 GiB ", "bytes", 22 * 2**30),
        ("512MiB", "bytes", 512 * 2**20),
        ("1.5e9", "bytes", 1_500_000_000),
        ("1500000000", "bytes", 1_500_000_000),
        (1_500_000_000, "bytes", 1_500_000_000),
        (1, "bytes", 1),
        ("60%", "percent", 60.0),
        ("100%", "percent", 100.0),
        ("0.5 %", "percent", 0.5),
        ("0%", "percent", 0.0),
        ("min", "min", 0),
        (" MIN ", "min", 0),
    ],
)
def test_budget_parse(text: str | int, kind: str, value: float) -> None:
    budget = Budget.parse(text)
    assert (budget.kind, budget.value) == (kind, value)
    assert Budget.parse(budget) is budget


def test_budget_binary_and_decimal_differ() -> None:
    assert Budget.parse("22GiB").value != Budget.parse("22GB").value
    assert Budget.parse("22GiB").value - Budget.parse("22GB").value == 22 * (2**30 - 10**9)


def test_budget_resolve() -> None:
    # "60%": 60% of the way from the least peak (0%) to the unplanned one (100%).
    assert Budget.parse("60%").resolve(peak_bytes=2000, min_peak_bytes=1000) == 1600
    assert Budget.parse("100%").resolve(peak_bytes=2000, min_peak_bytes=1000) == 2000
    assert Budget.parse("0%").resolve(peak_bytes=2000, min_peak_bytes=1000) == 1000
    assert Budget.parse("60%").resolve(peak_bytes=2000, min_peak_bytes=5000) == 5000  # no span
    assert Budget.parse("22GB").resolve(peak_bytes=2) == 22 * 10**9
    assert Budget.parse("min").resolve(peak_bytes=2, min_peak_bytes=7) == 7
    with pytest.raises(TypeError, match=r"internal error.*min_peak_bytes"):
        Budget.parse("min").resolve(peak_bytes=2)


def test_percent_budget_in_solve() -> None:
    profile = hand_profile()  # unplanned peak 1700
    result = solve(profile, "60%")
    least = result.min_peak_bytes
    assert least == solve(profile, "min").predicted_peak_bytes
    assert result.budget_bytes == least + (profile.peak_bytes - least) * 60 // 100
    assert result.status == OPTIMAL and result.predicted_peak_bytes <= result.budget_bytes


@pytest.mark.parametrize(
    "text",
    [
        "12 XB",
        "-1",
        "150%",
        "100.5%",
        "-5%",
        "abc",
        "",
        "   ",
        "0",
        0,
        -5,
        True,
        False,
        1.5e9,
        None,
        "1.5.3GB",
        "GiB",
        "12 GiB extra",
    ],
)
def test_budget_errors_list_accepted_forms(text: object) -> None:
    with pytest.raises(ValueError) as error:
        Budget.parse(text)  # type: ignore[arg-type]
    assert ACCEPTED_BUDGETS in str(error.value)
    with pytest.raises(ValueError):
        solve(example_profile(), text)  # type: ignore[arg-type]


def test_budget_overflowing_size_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        Budget.parse("1e999")


# ---------------------------------------------------------------------------------------- 8. JSON
@settings(derandomize=True, max_examples=50, deadline=None)
@given(profile_and_budget())
def test_result_to_dict_is_json_and_plan_round_trips(case: tuple[Profile, int]) -> None:
    profile, budget = case
    result = solve(profile, budget)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["status"] == result.status
    assert data["budget_bytes"] == result.budget_bytes
    assert data["min_peak_bytes"] == result.min_peak_bytes
    assert data["plan"] == result.plan.to_dict()
    again = Plan.from_json(result.plan.to_json())
    assert again == result.plan
    assert Plan.from_dict(data["plan"]) == result.plan
    assert simulate(profile, again).peak_bytes == result.predicted_peak_bytes
    assert Profile.from_json(profile.to_json()) == profile


def test_example_result_to_dict() -> None:
    result = solve(example_profile(), 1300)
    data = json.loads(json.dumps(result.to_dict()))
    assert set(data) >= {
        "status", "budget_bytes", "predicted_peak_bytes", "predicted_step_ms",
        "predicted_overhead", "cost", "lower_bound", "min_peak_bytes", "solve_time_s", "where",
        "notes", "plan",
    }  # fmt: skip
    assert data["plan"]["kind"] == "remat.plan"
    assert data["plan"]["strategy"] == "auto"
    assert data["solve_time_s"] >= 0


# ------------------------------------------------------------------------------- 9. a long chain
def test_long_chain_is_feasible_with_capped_segments() -> None:
    # 96 units (> 64): segments are capped, so the result is FEASIBLE, not OPTIMAL. No timing here:
    # solve time belongs in benchmarks/planner.py.
    profile = staged_profile(96)
    result = solve(profile, "50%")
    assert result.status == FEASIBLE
    least = result.min_peak_bytes
    assert result.budget_bytes == least + (profile.peak_bytes - least) // 2
    assert result.min_peak_bytes < result.predicted_peak_bytes <= result.budget_bytes
    assert 0 < result.lower_bound  # a bound that says something (<= cost by construction)
    check_result_consistent(profile, result)
    (cap,) = [int(m) for note in result.notes for m in re.findall(r"capped at (\d+) units", note)]
    assert 1 < cap < 96
    blocks = model_module.blocks_of(profile, result.plan)
    assert max(block.end - block.start + 1 for block in blocks) <= cap
    assert {str(a) for a in result.plan.actions.values()} != {"keep"}  # the budget binds


# ------------------------------------------------------------------------------------ no torch
def test_solver_imports_no_torch() -> None:
    # remat/__init__ imports torch, so load the solver modules by path, under stub packages.
    root = Path(model_module.__file__).resolve().parents[1]
    loader = (
        "import sys, types, pathlib\n"
        "root = pathlib.Path(sys.argv[1])\n"
        "for name, path in (('remat', root), ('remat.solve', root / 'solve'),"
        " ('remat.cost', root / 'cost')):\n"
        "    pkg = types.ModuleType(name); pkg.__path__ = [str(path)]; sys.modules[name] = pkg\n"
        "import remat.cost.model, remat.solve.solver, remat.solve.budget\n"
        "from remat.cost.model import example_profile\n"
        "from remat.solve.solver import solve\n"
        "result = solve(example_profile(), 'min')\n"
        "assert result.status == 'OPTIMAL', result.status\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", loader, str(root)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr or "the solver imported torch"


def test_solve_pauses_the_cyclic_collector_and_restores_it() -> None:
    """The program runs with the cyclic GC off (its tuples form no cycles; with a large heap the
    collector cost more than the program) and leaves it as it found it, also on errors."""
    import gc

    profile = example_profile()
    seen = []
    real_run = solver_module._run

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(gc.isenabled())
        return real_run(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(solver_module, "_run", spy)
        assert gc.isenabled()
        solve(profile, "min")
        assert gc.isenabled() and seen and not any(seen)
        gc.disable()
        try:
            solve(profile, "min")
            assert not gc.isenabled()
        finally:
            gc.enable()
        with pytest.raises(ValueError, match="actions"):
            solve(profile, "min", actions=["recompute"])
        assert gc.isenabled()


# --------------------------------------------------- 10. option profiles and the thinned program
OPTION_ACTIONS = ("selective:megatron", "selective:save_matmuls", "offload")


@st.composite
def profiles_with_options(draw: st.DrawFn) -> Profile:
    """A random chain (at most 4 units) whose units have up to two measured options each."""
    profile = draw(profiles(max_units=4))
    for unit in profile.units:
        for action in draw(st.lists(st.sampled_from(OPTION_ACTIONS), unique=True, max_size=2)):
            retain = draw(st.integers(0, unit.keep_bytes))
            unit.options.append(
                model_module.OptionProfile(
                    action=action,
                    retain_bytes=retain,
                    forward_only_bytes=draw(st.integers(0, retain)),
                    forward_need_bytes=draw(st.integers(0, 600)),
                    backward_need_bytes=draw(st.integers(0, 600)),
                    cost_ms=draw(st.floats(0.01, 20.0, allow_nan=False, allow_infinity=False)),
                )
            )
    return profile


def brute_force_with_options(profile: Profile) -> list[tuple[float, int, tuple[Block, ...]]]:
    """(cost, peak, blocks) of every plan, each unit's options among its single-unit blocks."""
    n = len(profile.units)

    def cuts(start: int) -> list[tuple[Block, ...]]:
        if start == n:
            return [()]
        blocks = [Block("keep", start, start), Block("replay", start, start)]
        blocks += [Block("option", start, start, o.action) for o in profile.units[start].options]
        for kind in GROUP_KIND.values():
            blocks += [Block(kind, start, end) for end in range(start + 1, n)]
        return [(block, *rest) for block in blocks for rest in cuts(block.end + 1)]

    results = []
    for blocks in cuts(0):
        sim = evaluate_blocks(profile, blocks)
        results.append((sim.recompute_cost, sim.peak_bytes, blocks))
    return results


@settings(PROPERTY, max_examples=300)
@given(profiles_with_options(), st.integers(0, 100))
def test_solve_with_options_matches_brute_force(profile: Profile, percent: int) -> None:
    """Selective and offload options are single-unit choices the program weighs like any other:
    the solve is the least cost over every plan that uses them, and the least peak too."""
    plans = brute_force_with_options(profile)
    least_peak = min(peak for _, peak, _ in plans)
    budget = least_peak + (profile.peak_bytes - least_peak) * percent // 100
    best = least_cost(plans, budget)
    result = solve(profile, budget)
    assert result.min_peak_bytes == least_peak
    assert result.status == OPTIMAL and best is not None
    assert math.isclose(result.cost, best, rel_tol=1e-9, abs_tol=1e-9), (result.cost, best)
    assert result.predicted_peak_bytes <= budget
    check_result_consistent(profile, result)
    for unit in profile.units:  # each unit's action is one it has (or a segment's)
        action = str(result.plan.action_for(unit.fqn))
        allowed = {"keep", "recompute", *(o.action for o in unit.options)}
        assert action in allowed or action.startswith(("segment:", "nested:")), action


@settings(PROPERTY, max_examples=150)
@given(profiles(max_units=6), st.integers(0, 100))
def test_thinned_states_give_a_feasible_plan_that_fits(profile: Profile, percent: int) -> None:
    """The FEASIBLE path: with the states per unit thinned (a limit of 4 here, as a long chain of
    mixed unit sizes gets past WORK_LIMIT), the plan still fits the budget, costs no less than the
    optimum, the bound is below the optimum, and the result says it was thinned."""
    plans = brute_force(profile)
    least_peak = min(peak for _, peak, _ in plans)
    budget = least_peak + (profile.peak_bytes - least_peak) * percent // 100
    best = least_cost(plans, budget)
    assert best is not None
    result = _solve_thinned(profile, budget, limit=4)  # FEASIBLE in about a third of the cases
    check_result_consistent(profile, result)
    assert result.status in (FEASIBLE, OPTIMAL, INFEASIBLE)
    thinned = any("states thinned" in note for note in result.notes)
    assert (result.status == FEASIBLE) == (thinned and result.fits), result
    if result.fits:
        assert result.predicted_peak_bytes <= budget  # every kept state is exact
        assert result.cost >= best - 1e-9
        assert result.lower_bound <= best + 1e-9
    else:  # thinning may lose every plan that fits; it must then say no plan fits honestly
        assert result.predicted_peak_bytes > budget or result.status == INFEASIBLE


def _solve_thinned(profile: Profile, budget: int, limit: int) -> SolveResult:
    original = solver_module._frontier_limit
    solver_module._frontier_limit = lambda starts: limit
    try:
        return solve(profile, budget)
    finally:
        solver_module._frontier_limit = original


@settings(PROPERTY, max_examples=100, phases=(Phase.explicit, Phase.generate))
@given(profiles(max_units=6))
def test_hard_thinning_still_returns_a_result(profile: Profile) -> None:
    # a budget of the true least peak, which the thinned least-peak run may not reach
    least_peak = min(peak for _, peak, _ in brute_force(profile))
    result = _solve_thinned(profile, least_peak, limit=2)
    if result.status == INFEASIBLE:  # the thinned least-peak run did not reach it: said so
        assert result.min_peak_bytes > least_peak
    else:
        assert result.status in (OPTIMAL, FEASIBLE) and result.predicted_peak_bytes <= least_peak
