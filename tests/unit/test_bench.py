"""The benchmark's own arithmetic, with a fake clock and a fake tracker: no timing is asserted.

What would make a benchmark lie: warm-up steps in the median, a median of the wrong samples,
strategies run in blocks instead of interleaved, an overhead against another run's baseline, a
dominance or claim verdict that ignores the numbers.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import remat
from remat.benchmarking.result import (
    BenchResult,
    StrategyResult,
    check_claims,
    check_dominance,
    summarize,
    time_ratio,
)
from remat.benchmarking.run import Timed, run_interleaved


class FakeClock:
    """Advances only when a step tells it how long it took: each strategy's step costs what the
    test says, so medians and overheads have exact expected values."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def spend(self, ms: float) -> None:
        self.now += ms / 1e3


def test_warmup_is_reported_apart_and_the_median_uses_timed_steps_only() -> None:
    clock = FakeClock()
    costs = {"a": iter([500.0, 10.0, 30.0, 20.0]), "b": iter([900.0, 40.0, 41.0, 90.0])}
    timings = run_interleaved(
        {name: (lambda n=name: clock.spend(next(costs[n]))) for name in costs},
        rounds=3,
        warmup=1,
        clock=clock,
    )
    assert timings["a"].warmup_ms == pytest.approx([500.0])
    assert timings["a"].samples_ms == pytest.approx([10.0, 30.0, 20.0])
    assert timings["a"].median_ms == pytest.approx(20.0)
    assert timings["b"].median_ms == pytest.approx(41.0)  # the 90 ms outlier does not move it


def test_steps_are_interleaved_and_setup_is_untimed() -> None:
    clock = FakeClock()
    log: list[str] = []

    def step(name: str) -> Timed:
        return Timed(
            run=lambda: (log.append(name), clock.spend(1.0)),
            before=lambda: (log.append(f"before {name}"), clock.spend(1000.0)),
            after=lambda: clock.spend(1000.0),
        )

    timings = run_interleaved({n: step(n) for n in "ABC"}, rounds=2, warmup=1, clock=clock)
    assert [e for e in log if not e.startswith("before")] == list("ABC" * 3)
    assert log[:2] == ["before A", "A"]
    assert all(t == pytest.approx(1.0) for t in timings["B"].samples_ms + timings["B"].warmup_ms)


def test_interleaved_needs_a_timed_round() -> None:
    with pytest.raises(ValueError, match="at least 1 timed"):
        run_interleaved({"a": lambda: None}, rounds=0)


def test_overhead_is_against_none_of_the_same_rows() -> None:
    rows = [
        StrategyResult(strategy="full", kind="peer", samples_ms=[13.0, 14.0, 12.0]),
        StrategyResult(strategy="none", kind="peer", samples_ms=[10.0, 9.0, 11.0]),
        StrategyResult(
            strategy="remat:50%", kind="remat", samples_ms=[10.5], budget_bytes=10, peak_bytes=11
        ),
    ]
    summarize(rows)
    assert [r.overhead for r in rows] == pytest.approx([1.3, 1.0, 1.05])
    assert rows[2].budget_met is False
    other_run = [StrategyResult(strategy="none", kind="peer", samples_ms=[20.0]), rows[0]]
    summarize(other_run)
    assert rows[0].overhead == pytest.approx(0.65)  # only the rows given count


def test_overhead_and_dominance_pair_samples_of_the_same_round() -> None:
    # The machine runs at half speed in rounds 2 and 3: every strategy's step takes twice as long.
    none = StrategyResult(strategy="none", kind="peer", samples_ms=[10.0, 20.0, 20.0, 10.0, 10.0])
    peer = StrategyResult(
        strategy="every_n:2", kind="peer", samples_ms=[12.0, 24.0, 24.0, 12.0, 12.0], peak_bytes=50
    )
    plan = StrategyResult(
        strategy="remat:@every_n:2",
        kind="remat",
        samples_ms=[11.5, 23.0, 23.0, 11.5, 11.5],
        peak_bytes=50,
    )
    summarize([none, peer, plan])
    assert peer.overhead == pytest.approx(1.2) and plan.overhead == pytest.approx(1.15)
    # Medians of each alone would agree here; a slow round in the plan's place would not:
    plan.samples_ms[0] = 23.0  # the plan's first step hit a slow moment, the others did not
    summarize([none, peer, plan])
    assert plan.overhead == pytest.approx(1.15)  # the median of per-round ratios holds
    assert time_ratio(plan, peer) == pytest.approx(11.5 / 12.0)
    (verdict,) = check_dominance([none, peer, plan])[1:]
    assert verdict.dominated_by == "remat:@every_n:2"
    assert verdict.margin == pytest.approx(11.5 / 12.0 - 1)
    # Samples of different lengths (another run) fall back to the ratio of medians.
    other = StrategyResult(strategy="x", kind="peer", samples_ms=[30.0], step_ms=30.0)
    assert time_ratio(other, none) == 3.0


def row(strategy: str, peak: int, ms: float, **extra: object) -> StrategyResult:
    kind = "remat" if strategy.startswith("remat:") else "peer"
    return StrategyResult(strategy=strategy, kind=kind, peak_bytes=peak, step_ms=ms, **extra)  # type: ignore[arg-type]


def test_dominance_needs_no_more_memory_and_at_most_two_percent_more_time() -> None:
    rows = [
        row("full", 100, 100.0),
        row("sqrt_n", 150, 90.0),
        row("remat:@full", 100, 101.9),  # 1.9% slower: within the noise margin
        row("remat:a", 101, 50.0),  # faster but 1 byte more: does not dominate full
        row("remat:b", 140, 92.1),  # 2.3% slower than sqrt_n: does not dominate it
    ]
    verdicts = {d.peer: d for d in check_dominance(rows)}
    assert verdicts["full"].dominated_by == "remat:@full"
    assert verdicts["full"].margin == pytest.approx(0.019)
    # sqrt_n: remat:a (101 bytes, 50 ms) is the fastest that fits under it
    assert verdicts["sqrt_n"].dominated_by == "remat:a"
    rows[3].peak_bytes = 200
    assert not {d.peer: d for d in check_dominance(rows)}["sqrt_n"].dominated


def test_unmeasured_peers_are_not_judged() -> None:
    rows = [
        row("none", 200, 10.0),
        StrategyResult(strategy="compile:0.5", kind="compile", step_ms=5.0),
        row("remat:@none", 200, 10.0),
    ]
    dominance = check_dominance(rows)
    assert [d.reason for d in dominance] == ["", "peak not measured"]
    pareto = next(c for c in check_claims(rows, dominance) if c.name == "pareto")
    assert pareto.status == "pass" and "compile:0.5" in pareto.detail


def claims_of(rows: list[StrategyResult]) -> dict[str, str]:
    summarize(rows)
    return {c.name: c.status for c in check_claims(rows, check_dominance(rows))}


def test_claims_follow_the_numbers() -> None:
    def rows_with(half_ms: float, at_full_ms: float, min_peak: int) -> list[StrategyResult]:
        return [
            StrategyResult(strategy="none", kind="peer", peak_bytes=1000, samples_ms=[100.0]),
            StrategyResult(strategy="full", kind="peer", peak_bytes=400, samples_ms=[130.0]),
            StrategyResult(
                strategy="remat:50%",
                kind="remat",
                budget="50%",
                budget_bytes=600,
                peak_bytes=590,
                samples_ms=[half_ms],
            ),
            StrategyResult(
                strategy="remat:min",
                kind="remat",
                budget="min",
                budget_bytes=300,
                peak_bytes=min_peak,
                samples_ms=[140.0],
            ),
            StrategyResult(
                strategy="remat:@full",
                kind="remat",
                budget="@full",
                budget_bytes=400,
                peak_bytes=400,
                samples_ms=[at_full_ms],
            ),
            StrategyResult(
                strategy="remat:@none",
                kind="remat",
                budget="@none",
                budget_bytes=1000,
                peak_bytes=1000,
                samples_ms=[100.0],
            ),
        ]

    good = claims_of(rows_with(half_ms=105.0, at_full_ms=117.0, min_peak=300))
    assert good == {
        "budgets_met": "pass",
        "pareto": "pass",
        "fits_where_peers_do_not": "pass",  # min (300 bytes): no peer fits, remat does
        "overhead_at_50pct": "pass",
        "overhead_at_full_memory": "pass",  # 1.17 <= 0.9 * 1.3
    }
    bad = claims_of(rows_with(half_ms=105.1, at_full_ms=117.1, min_peak=301))
    assert bad == {
        "budgets_met": "fail",
        "pareto": "pass",
        "fits_where_peers_do_not": "fail",
        "overhead_at_50pct": "fail",
        "overhead_at_full_memory": "fail",
    }
    assert claims_of(rows_with(105.0, 117.0, 300)[:2])["overhead_at_50pct"] == "not_evaluated"
    # a budget below the least achievable peak fits no plan at all: listed, not held against remat
    below = rows_with(105.0, 117.0, 300)
    below[3] = StrategyResult(
        strategy="remat:min",
        kind="remat",
        budget="100B",
        budget_bytes=100,
        status="infeasible",
        min_peak_bytes=300,
    )
    assert claims_of(below)["fits_where_peers_do_not"] == "not_evaluated"
    # infeasible although the solver predicted a plan under the budget: the closed loop failed
    below[3].min_peak_bytes = 90
    assert claims_of(below)["fits_where_peers_do_not"] == "fail"


def test_failed_overhead_claims_say_whether_any_plan_could_pass() -> None:
    """A failed claim names the solver's bound: noise (the bound is under the limit) reads
    differently from a claim no plan can meet (the bound is over it), and a full whose peak is
    the least any plan reaches is named as such. The status stays ``fail`` either way."""
    rows = [
        StrategyResult(strategy="none", kind="peer", peak_bytes=1000, samples_ms=[100.0]),
        StrategyResult(strategy="full", kind="peer", peak_bytes=400, samples_ms=[140.0]),
        StrategyResult(
            strategy="remat:50%",
            kind="remat",
            budget="50%",
            budget_bytes=600,
            peak_bytes=590,
            samples_ms=[112.0],
            predicted_overhead=1.11,
            overhead_bound=1.1,
        ),
        StrategyResult(
            strategy="remat:@full",
            kind="remat",
            budget="@full",
            budget_bytes=400,
            peak_bytes=400,
            samples_ms=[140.0],
            same_as="full",
            predicted_overhead=1.4,
            overhead_bound=1.4,
        ),
    ]
    summarize(rows)
    claims = {c.name: c for c in check_claims(rows, check_dominance(rows))}
    half, at_full = claims["overhead_at_50pct"], claims["overhead_at_full_memory"]
    assert (half.status, at_full.status) == ("fail", "fail")
    assert "no plan that fits is predicted under 1.100, above the limit" in half.detail
    assert "the solver's plan at full's peak is full's own" in at_full.detail
    rows[2].overhead_bound, rows[3].same_as = 1.02, None  # reachable: noise or the model
    claims = {c.name: c for c in check_claims(rows, check_dominance(rows))}
    assert "under 1.020)" in claims["overhead_at_50pct"].detail
    assert "above the limit" not in claims["overhead_at_50pct"].detail
    assert "above the limit" in claims["overhead_at_full_memory"].detail  # 1.4 > 0.9 * 1.4


def test_bench_result_round_trips_and_refuses_other_json() -> None:
    rows = [row("none", 5, 1.0, samples_ms=[1.0], warmup_ms=[9.0])]
    result = BenchResult(model="m", results=rows, dominance=check_dominance(rows))
    again = BenchResult.from_json(result.to_json())
    assert again.to_dict() == result.to_dict()
    assert result.to_dict()["dominance"][0]["dominated"] is False
    with pytest.raises(ValueError, match="not a remat bench result"):
        BenchResult.from_json('{"kind": "remat.profile", "format_version": 1}')
    with pytest.raises(ValueError, match="format_version"):
        BenchResult.from_json('{"kind": "remat.bench", "format_version": 99, "results": []}')


def tiny_model() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(4)])
    return model, (torch.randn(16, 32),)


def test_bench_with_a_fake_clock_and_tracker() -> None:
    """The whole pipeline on a real tiny model, with time and peaks that the test dictates:
    every step costs 1 ms except under full (3 ms); peaks are what the fake tracker says."""
    model, inputs = tiny_model()
    clock = FakeClock()
    ticks = itertools.count()

    def fake_peak(m: nn.Module, _inputs: object) -> int:
        checkpointed = sum("forward" in child.__dict__ for child in m.children())
        return 10**9 - 100 * checkpointed  # the fake tracker: each checkpointed unit frees 100

    def fake_clock() -> float:
        next(ticks)
        return clock()

    seen: list[int] = []

    def spend() -> None:
        checkpointed = sum("forward" in child.__dict__ for child in model.children())
        seen.append(checkpointed)
        clock.spend(3.0 if checkpointed == 4 else 1.0)

    hook = model.register_forward_pre_hook(lambda *_: spend())
    try:
        result = remat.bench(
            model,
            inputs,
            strategies=["full", "every_n:2"],
            budgets=["min"],
            steps=3,
            warmup=2,
            optimizer="sgd",
            clock=fake_clock,
            measure_peak=fake_peak,
        )
    finally:
        hook.remove()
    by = {r.strategy: r for r in result.results}
    assert list(by) == [
        "none",
        "full",
        "every_n:2",
        "remat:min",
        "remat:@none",
        "remat:@full",
        "remat:@every_n:2",
    ]
    assert by["none"].peak_bytes == 10**9 and by["full"].peak_bytes == 10**9 - 400
    assert by["every_n:2"].peak_bytes == 10**9 - 200
    assert len(by["none"].warmup_ms) == 2 and len(by["none"].samples_ms) == 3
    assert by["none"].step_ms == pytest.approx(1.0) and by["full"].step_ms == pytest.approx(3.0)
    assert by["full"].overhead == pytest.approx(3.0) and by["none"].overhead == pytest.approx(1.0)
    # remat's plans at a peer's peak that are that peer's plan are measured once, named twice
    assert by["remat:@none"].same_as == "none"
    assert by["remat:@none"].samples_ms == by["none"].samples_ms
    # interleaved: the profile's steps come first; then rounds of one step per distinct plan
    distinct = [r for r in result.results if r.same_as is None and r.status == "ok"]
    tail = seen[-(2 + 3) * len(distinct) :]
    first_round = tail[: len(distinct)]
    assert tail == first_round * 5
    assert result.steps == 3 and result.warmup_steps == 2
    assert {c.name for c in result.claims} >= {"pareto", "budgets_met"}
    # every solved plan carries the solver's bound, which no plan's prediction undercuts
    for row in result.results:
        if row.kind == "remat" and row.status == "ok":
            assert row.overhead_bound is not None and row.predicted_overhead is not None
            assert 1.0 <= row.overhead_bound <= row.predicted_overhead + 1e-9, row.strategy
    # the model is left as it was: no plan installed, weights unchanged
    assert not any("forward" in child.__dict__ for child in model.children())
    fresh, _ = tiny_model()
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )


def test_bench_refuses_bad_arguments() -> None:
    model, inputs = tiny_model()
    with pytest.raises(ValueError, match="strategy"):
        remat.bench(model, inputs, strategies=["every_other"])
    with pytest.raises(ValueError, match="steps"):
        remat.bench(model, inputs, steps=0)
    with pytest.raises(ValueError, match="budget"):
        remat.bench(model, inputs, budgets=["lots"])


def test_compiled_models_at_different_budgets_do_not_share_a_cache_entry() -> None:
    """Dynamo caches compiled graphs per code object, with no guard on the functorch config: two
    compiles of one model must start from different code objects, or the second fraction would
    silently reuse the first one's graph. Nothing is compiled here (that takes seconds)."""
    from remat import _compat

    model, _ = tiny_model()
    first = _compat.compile_with_activation_budget(model, 1.0)
    second = _compat.compile_with_activation_budget(model, 0.0)
    codes = {m._orig_mod.forward.__code__ for m in (first, second)}  # type: ignore[union-attr]
    assert len(codes) == 2
    assert [p.data_ptr() for p in first.parameters()] == [p.data_ptr() for p in model.parameters()]


def test_a_peer_that_fails_is_reported_not_fatal() -> None:
    model, inputs = tiny_model()

    def peak(m: nn.Module, _inputs: object) -> int:
        if any("forward" in child.__dict__ for child in m.children()):
            raise RuntimeError("this policy does not apply here")
        return 10**9

    result = remat.bench(
        model,
        inputs,
        strategies=["full"],
        budgets=[],
        steps=1,
        optimizer="sgd",
        measure_peak=peak,
        clock=itertools.count().__next__,  # every step takes 1 s
    )
    full = result.row("full")
    assert full.status == "failed" and "does not apply" in full.notes[0]
    assert full.samples_ms == [] and result.row("none").samples_ms == [1000.0]
    pareto = next(c for c in result.claims if c.name == "pareto")
    assert "full" in pareto.detail and pareto.status == "pass"
