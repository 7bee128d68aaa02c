"""fit.max_size's search probes few sizes and stays exact: the answer is the largest size whose
least peak fits, for any least peak that grows with the size (the oracle: a scan of every size)."""

from __future__ import annotations

import bisect

from hypothesis import given, settings
from hypothesis import strategies as st

import remat
from remat.fit import _Search, max_size
from remat.models.spec import load_model
from remat.profiling.estimate import estimate_profile


def _run(peak: list[int], budget: int, start: int = 1) -> tuple[int | None, list[int]]:
    """The search over sizes start..len(peak) - 1 (peak[size] is the least peak at size)."""
    limit = len(peak) - 1
    probed = [start]
    if peak[start] > budget:
        return None, probed
    search = _Search(budget_bytes=budget, limit=limit, low=start)
    search.record(start, peak[start])
    while not search.done():
        size = search.next_size()
        assert search.low < size and (search.high is None or size < search.high)
        assert size not in probed
        probed.append(size)
        search.record(size, peak[size])
    if search.high is not None:
        assert search.high == search.low + 1 and peak[search.high] > budget
    return search.low, probed


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.integers(0, 10**6), min_size=2, max_size=3000),
    base=st.integers(0, 10**9),
    budget=st.integers(0, 2 * 10**9),
)
def test_the_search_finds_what_a_scan_finds(steps: list[int], base: int, budget: int) -> None:
    peak = [base]
    for step in steps:  # any non-decreasing least peak, steps and plateaus included
        peak.append(peak[-1] + step)
    found, _ = _run(peak, budget)
    scan = bisect.bisect_right(peak, budget, lo=1) - 1  # the largest size >= 1 that fits
    assert found == (scan if scan >= 1 else None)


def test_a_straight_peak_takes_a_few_probes() -> None:
    """Piecewise linear, as a transformer's least peak in its sequence length (the optimizer step
    first, then the activations): six probes where doubling and bisecting took 33."""
    peak = [
        max(13_224_600_000 + 264_704 * s, 9_577_000_000 + 2_046_000 * s) for s in range(1 << 18)
    ]
    found, probed = _run(peak, 80_171_027_661)
    assert peak[found] <= 80_171_027_661 < peak[found + 1]
    assert len(probed) <= 6, probed


def test_max_size_probes_few_sizes_and_is_exact() -> None:
    overrides = {"n_blocks": 2, "width": 32, "in_features": 32}
    result = max_size("mlp", device="t4", budget="6MiB", optimizer="sgd", overrides=overrides)
    n = result.max_size
    assert result.status == "FOUND" and n > 100
    assert len(result.table) <= 6, [p.size for p in result.table]  # doubling alone takes 8
    for size, fits in ((n, True), (n + 1, False)):  # independently of the search
        built = load_model("mlp", device="meta", batch=size, overrides=overrides)
        prof = estimate_profile(built.model, built.example_inputs, loss_fn=built.loss_fn,
                                device="t4", optimizer="sgd", timing=False)  # fmt: skip
        assert (remat.solve(prof, "min").min_peak_bytes <= result.budget_bytes) == fits
