"""Save sets that noise in small ops' times does not change (``save_set_candidates``'s tie rule):
names whose prices per byte differ by less than ``TIE_TOLERANCE`` of the dearest name's are
dropped together, so their order in one profile or the next leaves every set the same. Made-up
replay graphs and times: the prices are exact and the noise is chosen."""

from __future__ import annotations

import pytest

from remat.apply.selective import ReplayGraph
from remat.profiling import options
from remat.profiling.options import save_set_candidates

# Five ops, each its own output kept (1000 bytes each), none read by another: dropping one
# replays just it. ln, gelu and mul are cheap (a layer norm, a GELU and a dropout's multiply in a
# GPT block); softmax is dearer, addmm the dearest.
NAMES = ("ln", "gelu", "mul", "softmax", "addmm")
KEYS = {name: (name, 0) for name in NAMES}
GRAPH = ReplayGraph(
    deps={},
    always=frozenset(),
    forced=frozenset(),
    kept_bytes={key: 1000 for key in KEYS.values()},
    covers={key: (key,) for key in KEYS.values()},
)


def candidates(ms: dict[str, float]) -> list[str]:
    times = [{KEYS[name]: (ms[name], 0) for name in NAMES}]
    return save_set_candidates(times, [GRAPH], count=4)


def test_cheap_ops_in_either_order_give_the_same_sets() -> None:
    # Two profiles: the cheap ops' times swap order (noise), the dear ones' stay apart.
    first = candidates({"ln": 0.06, "gelu": 0.07, "mul": 0.09, "softmax": 0.45, "addmm": 1.5})
    second = candidates({"ln": 0.06, "gelu": 0.12, "mul": 0.08, "softmax": 0.47, "addmm": 1.4})
    assert first == second
    # the three cheap ops go together, then softmax, then addmm is all that is kept
    assert first == ["ops.addmm.softmax", "ops.addmm"]


def test_without_the_tie_rule_the_order_of_cheap_ops_changes_the_sets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The test above can fail: with no tolerance the same two profiles give different sets."""
    monkeypatch.setattr(options, "TIE_TOLERANCE", 0.0)
    first = candidates({"ln": 0.06, "gelu": 0.07, "mul": 0.09, "softmax": 0.45, "addmm": 1.5})
    second = candidates({"ln": 0.06, "gelu": 0.12, "mul": 0.08, "softmax": 0.47, "addmm": 1.4})
    assert first != second


def test_dear_ops_that_differ_by_more_than_the_tolerance_stay_apart() -> None:
    cheap = {"ln": 0.06, "gelu": 0.07, "mul": 0.09}
    # softmax and addmm 0.15 ms per 1000 bytes apart, a quarter of the dearest's price: apart,
    # so there is a set that keeps addmm alone
    assert candidates({**cheap, "softmax": 0.45, "addmm": 0.6}) == [
        "ops.addmm.softmax",
        "ops.addmm",
    ]
    # 0.03 apart, 5% of the dearest's (under TIE_TOLERANCE, 8%): dropped together
    assert candidates({**cheap, "softmax": 0.57, "addmm": 0.6}) == ["ops.addmm.softmax"]


def test_a_tie_spans_at_most_tie_span_of_its_cheapest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside one dear op every other op is within TIE_TOLERANCE of the dearest's price of the
    next; the span cap still leaves a set for the dearer of the cheap ones (an attention block's
    softmax beside conv blocks)."""
    names = ("a", "b", "c", "d", "conv")
    keys = {name: (name, 0) for name in names}
    graph = ReplayGraph(
        deps={},
        always=frozenset(),
        forced=frozenset(),
        kept_bytes={key: 1000 for key in keys.values()},
        covers={key: (key,) for key in keys.values()},
    )
    ms = {"a": 1.0, "b": 1.6, "c": 2.5, "d": 3.0, "conv": 17.0}
    times = [{keys[name]: (ms[name], 0) for name in names}]
    # steps of 0.6, 0.9 and 0.5 are all under 8% of 17: one tie without the cap
    assert save_set_candidates(times, [graph], count=4) == ["ops.conv.d", "ops.conv"]
    monkeypatch.setattr(options, "TIE_SPAN", 100.0)
    assert save_set_candidates(times, [graph], count=4) == ["ops.conv"]
