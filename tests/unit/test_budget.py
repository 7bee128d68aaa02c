"""Percent budgets (issue 14, item 3): ``P%`` is ``P%`` of the way from the least peak any plan
reaches (0%) to the unplanned peak (100%), so every percentage has a plan."""

from __future__ import annotations

import pytest

from remat.cost.model import Profile, UnitProfile, simulate
from remat.plan import Plan
from remat.solve.budget import Budget
from remat.solve.solver import INFEASIBLE, OPTIMAL, solve


def test_percent_resolves_exactly_between_the_least_and_the_unplanned_peak() -> None:
    def at(text: str, peak: int, least: int) -> int:
        return Budget.parse(text).resolve(peak_bytes=peak, min_peak_bytes=least)

    assert at("0%", 2000, 1200) == 1200
    assert at("50%", 2000, 1200) == 1600
    assert at("100%", 2000, 1200) == 2000
    assert at("60%", 2000, 1200) == 1680
    assert at("50%", 2001, 1200) == 1600  # 400.5 bytes above the least: rounded down
    # Exact to the byte at real sizes, in fractions: 33.3% of a 2 TB span is 666 GB.
    assert at("33.3%", 3 * 10**12 + 7, 10**12 + 7) == 10**12 + 7 + 666 * 10**9
    assert at("12.5%", 10**12 + 8, 8) == 8 + 125 * 10**9
    # An unplanned peak below the least (a profile where no plan helps) leaves the least.
    assert at("50%", 900, 1000) == 1000


def test_percent_ignores_the_static_bytes() -> None:
    # The old meaning was static + P% of (peak - static): 100 + 0.5 * 1900 = 1050 here.
    budget = Budget.parse("50%")
    assert budget.resolve(peak_bytes=2000, min_peak_bytes=1200, static_bytes=100) == 1600


@pytest.mark.parametrize("text", ["50%", "0%", "min"])
def test_a_percent_or_min_without_the_least_peak_is_an_internal_error(text: str) -> None:
    with pytest.raises(TypeError, match=r"internal error.*min_peak_bytes"):
        Budget.parse(text).resolve(peak_bytes=2000)


def test_zero_and_hundred_percent_parse_and_beyond_is_refused() -> None:
    assert (Budget.parse("0%").kind, Budget.parse("0%").value) == ("percent", 0.0)
    assert Budget.parse("100%").value == 100.0
    for text in ("100.5%", "-1%", "101%"):
        with pytest.raises(ValueError, match="from 0"):
            Budget.parse(text)


def test_bytes_and_device_ignore_the_peaks() -> None:
    assert Budget.parse("1500").resolve(peak_bytes=10, min_peak_bytes=20) == 1500
    device = Budget.parse("device:l4").resolve(peak_bytes=10, min_peak_bytes=20)
    assert device == Budget.parse("device").resolve(peak_bytes=0, device="l4")


def head_heavy_profile() -> Profile:
    """Four units (test_solver's hand profile) and 1,000 bytes the loss and head's backward need
    (a large head's gradients): no plan frees them, so the least peak is far above the static
    bytes, as gradients alive at the backward peak put it on ConvNeXt, Swin, ViT and BERT."""
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
    profile = Profile(
        units=units,
        static_bytes=900,
        base_bytes=1000,
        fixed_peak_bytes=1000,
        end_need_bytes=1000,
        peak_bytes=0,
        step_ms=20.0,
    )
    profile.peak_bytes = simulate(profile, Plan()).peak_bytes
    return profile


def test_old_fifty_percent_was_infeasible_and_new_fifty_percent_solves() -> None:
    profile = head_heavy_profile()
    assert (profile.static_bytes, profile.peak_bytes) == (900, 2700)
    least = solve(profile, "min").predicted_peak_bytes
    assert least == 2010
    old = profile.static_bytes + (profile.peak_bytes - profile.static_bytes) // 2
    assert old == 1800 < least
    assert solve(profile, old).status == INFEASIBLE
    new = solve(profile, "50%")
    assert new.budget_bytes == 2010 + (2700 - 2010) // 2 == 2355
    assert new.status == OPTIMAL
    assert least <= new.predicted_peak_bytes <= 2355


def test_every_percent_is_feasible() -> None:
    profile = head_heavy_profile()
    least = solve(profile, "min").predicted_peak_bytes
    budgets = []
    span = profile.peak_bytes - least
    for tenths in [*range(0, 1001, 10), 5, 999]:  # 0%, 1%, ..., 100%, 0.5%, 99.9%
        result = solve(profile, f"{tenths // 10}.{tenths % 10}%")
        assert result.budget_bytes == least + span * tenths // 1000
        assert result.status == OPTIMAL, tenths
        assert result.predicted_peak_bytes <= result.budget_bytes
        budgets.append(result.budget_bytes)
    assert budgets[0] == least and budgets[100] == profile.peak_bytes
    assert budgets[:101] == sorted(budgets[:101])
    # 0% is min's plan; 100% keeps every unit.
    assert solve(profile, "0%").plan.actions == solve(profile, "min").plan.actions
    assert set(map(str, solve(profile, "100%").plan.actions.values())) == {"keep"}
