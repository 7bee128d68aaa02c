"""Tests of plans (remat.plan), baseline strategies (remat.solve.baselines) and byte / time units
(remat.units): parsing, selector precedence, strict resolution, JSON, atomic saves, invariants."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import remat.plan as plan_module
from remat.plan import FORMAT_VERSION, Action, Plan, closest_names
from remat.solve.baselines import STRATEGIES, baseline_plan, parse_strategy
from remat.units import format_bytes, format_ms, parse_bytes

UNITS = [f"blocks.{i}" for i in range(4)]


# ------------------------------------------------------------------------------------- Action
@pytest.mark.parametrize(
    ("text", "kind", "label"),
    [
        ("keep", "keep", None),
        ("recompute", "recompute", None),
        ("segment:0", "segment", "0"),
        ("segment:enc-1.a_b", "segment", "enc-1.a_b"),
        ("  recompute  ", "recompute", None),
    ],
)
def test_action_parse_valid(text: str, kind: str, label: str | None) -> None:
    action = Action.parse(text)
    assert (action.kind, action.label) == (kind, label)
    assert str(action) == text.strip()
    assert Action.parse(action) is action  # an Action passes through
    assert Action.parse(str(action)) == action
    assert action.checkpoints == (kind != "keep")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "Recompute",  # case matters
        "offload:x",  # offload takes no label
        "selective",  # selective needs a policy
        "selective:everything",  # ... a known one
        "selective:ops.mm+addmm",  # ops are separated by dots
        "segment",  # a segment needs a label
        "segment:",  # ... a non-empty one
        "segment:a b",  # labels: letters, digits, '_', '-', '.'
        "segment:a:b",
        "keep:1",  # only segments take a label
        "recompute:x",
        3,
        None,
    ],
)
def test_action_parse_invalid(text: object) -> None:
    with pytest.raises(ValueError, match=r"action|label|policy"):
        Action.parse(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text", ["offload", "selective:megatron", "selective:save_matmuls", "selective:ops.mm.addmm"]
)
def test_action_parse_selective_and_offload(text: str) -> None:
    assert str(Action.parse(text)) == text
    assert Action.parse(text).checkpoints


def test_action_constructor_checks() -> None:
    with pytest.raises(ValueError):
        Action("segment")
    with pytest.raises(ValueError):
        Action("keep", "x")
    with pytest.raises(ValueError):
        Action("bogus")
    assert Action("segment", "x") == Action.parse("segment:x")


# ------------------------------------------------------------------------------- selectors
def test_exact_beats_regex_even_when_the_regex_comes_first() -> None:
    plan = Plan(actions={"re:blocks\\.[0-9]+": "recompute", "blocks.1": "keep"})
    assert str(plan.action_for("blocks.1")) == "keep"
    assert str(plan.action_for("blocks.0")) == "recompute"


def test_regex_beats_default() -> None:
    plan = Plan(actions={"_default": "recompute", "re:blocks\\.[13]": "keep"})
    assert [str(plan.action_for(u)) for u in UNITS] == ["recompute", "keep", "recompute", "keep"]
    assert str(plan.action_for("head")) == "recompute"


def test_first_matching_regex_wins() -> None:
    plan = Plan(actions={"re:blocks\\..*": "recompute", "re:blocks\\.1": "segment:a"})
    assert str(plan.action_for("blocks.1")) == "recompute"
    swapped = Plan(actions={"re:blocks\\.1": "segment:a", "re:blocks\\..*": "recompute"})
    assert str(swapped.action_for("blocks.1")) == "segment:a"
    assert str(swapped.action_for("blocks.2")) == "recompute"


def test_regex_must_match_the_whole_fqn() -> None:
    plan = Plan(actions={"re:blocks": "recompute", "re:\\.1": "recompute"})
    assert str(plan.action_for("blocks.1")) == "keep"
    assert str(plan.action_for("blocks")) == "recompute"


def test_no_default_means_keep() -> None:
    plan = Plan(actions={"blocks.0": "recompute"})
    assert str(plan.action_for("blocks.3")) == "keep"
    assert Plan().action_for("anything") == Action("keep")


@pytest.mark.parametrize("selector", ["", "re:(", "re:[a-"])
def test_bad_selectors_are_refused(selector: str) -> None:
    with pytest.raises(ValueError, match="selector"):
        Plan(actions={selector: "keep"})


def test_bad_action_in_plan_is_refused() -> None:
    with pytest.raises(ValueError, match="action"):
        Plan(actions={"blocks.0": "checkpoint"})


# ---------------------------------------------------------------------------------- resolve
def test_resolve_maps_every_unit() -> None:
    plan = Plan(actions={"blocks.0": "keep", "re:blocks\\.[0-9]+": "recompute"})
    resolved = plan.resolve(UNITS)
    assert {fqn: str(a) for fqn, a in resolved.items()} == {
        "blocks.0": "keep",
        "blocks.1": "recompute",
        "blocks.2": "recompute",
        "blocks.3": "recompute",
    }


def test_resolve_exact_selector_may_name_a_non_unit_module() -> None:
    plan = Plan(actions={"head": "recompute"})
    resolved = plan.resolve(UNITS, ["", "blocks", *UNITS, "head"])
    assert str(resolved["head"]) == "recompute"
    assert all(str(resolved[u]) == "keep" for u in UNITS)


def test_resolve_unknown_fqn_lists_close_names() -> None:
    plan = Plan(actions={"blocks.10": "recompute"})
    with pytest.raises(ValueError, match="names no module") as info:
        plan.resolve(UNITS, ["", "blocks", *UNITS, "head"])
    message = str(info.value)
    assert "'blocks.10'" in message
    assert "closest" in message
    assert "'blocks.1'" in message


def test_resolve_typo_in_fqn_suggests_the_right_one() -> None:
    plan = Plan(actions={"blokcs.2": "recompute"})
    with pytest.raises(ValueError) as info:
        plan.resolve(UNITS)
    closest = re.search(r"closest: (\[.*?\])", str(info.value))
    assert closest is not None
    assert "blocks.2" in closest.group(1)


def test_resolve_regex_matching_nothing_is_an_error() -> None:
    plan = Plan(actions={"re:layers\\.[0-9]+": "recompute"})
    with pytest.raises(ValueError, match="matches no unit") as info:
        plan.resolve(UNITS, ["", "layers"])
    assert "blocks.0" in str(info.value)  # the units are listed


def test_resolve_regex_matches_units_only() -> None:
    # "head" is a module but not a unit: a pattern over units does not see it.
    plan = Plan(actions={"re:head": "recompute"})
    with pytest.raises(ValueError, match="matches no unit"):
        plan.resolve(UNITS, ["head"])


def test_resolve_default_alone_matches_nothing_and_is_fine() -> None:
    assert Plan(actions={"_default": "recompute"}).resolve([]) == {}


def test_resolve_non_consecutive_segment_is_an_error() -> None:
    plan = Plan(actions={"blocks.0": "segment:a", "blocks.2": "segment:a"})
    with pytest.raises(ValueError, match="not consecutive") as info:
        plan.resolve(UNITS)
    assert "blocks.0" in str(info.value)
    assert "blocks.2" in str(info.value)


def test_resolve_consecutive_segments() -> None:
    plan = Plan(
        actions={
            "blocks.0": "segment:a",
            "blocks.1": "segment:a",
            "blocks.2": "segment:b",
            "blocks.3": "segment:b",
        }
    )
    assert [str(a) for a in plan.resolve(UNITS).values()] == ["segment:a"] * 2 + ["segment:b"] * 2


def test_resolve_non_consecutive_segment_by_regex() -> None:
    plan = Plan(actions={"re:blocks\\.[02]": "segment:x"})
    with pytest.raises(ValueError, match="not consecutive"):
        plan.resolve(UNITS)


def test_resolve_segment_on_a_non_unit_is_an_error() -> None:
    plan = Plan(actions={"head": "segment:a"})
    with pytest.raises(ValueError, match="not a unit"):
        plan.resolve(UNITS, ["head"])


def test_closest_names() -> None:
    # difflib ratios: "blocks.1" 0.94, "blocks.10" 0.89, "head" below the cutoff
    assert closest_names("blocks.1O", ["blocks.10", "blocks.1", "head"], count=2) == [
        "blocks.1",
        "blocks.10",
    ]
    # nothing alike: the first candidates, so that the message still lists names
    assert closest_names("zzz", ["a", "b", "c"], count=2) == ["a", "b"]


# ------------------------------------------------------------------------------------- JSON
def _full_plan() -> Plan:
    return Plan(
        actions={
            "blocks.0": "keep",
            "re:blocks\\.[0-9]+": "recompute",
            "blocks.5": "segment:s0",
            "_default": "keep",
        },
        units=[f"blocks.{i}" for i in range(8)],
        strategy="custom",
        fingerprint={"model_class": "GPT", "num_parameters": 12, "parameters": {"w": [3, 4]}},
        budget_bytes=22 * 2**30,
        predicted_peak_bytes=123456789,
        predicted_overhead=0.125,
        metadata={"torch": "2.13.0", "notes": ["a", 1, None, True, 2.5]},
    )


def test_json_round_trip_keeps_everything_and_the_order() -> None:
    plan = _full_plan()
    text = plan.to_json()
    data = json.loads(text)
    assert data["format_version"] == FORMAT_VERSION
    assert data["kind"] == "remat.plan"
    assert list(data["actions"]) == list(plan.actions)  # selector order is meaning
    again = Plan.from_json(text)
    assert again == plan
    assert list(again.actions.items()) == list(plan.actions.items())
    assert again.to_json() == text


def test_to_dict_is_json_ready() -> None:
    data = _full_plan().to_dict()
    assert json.loads(json.dumps(data)) == data


def test_from_json_corrupt_names_line_and_column() -> None:
    text = '{\n  "format_version": 1,\n  "actions": {,}\n}'
    with pytest.raises(ValueError, match=r"line 3, column 15") as info:
        Plan.from_json(text, source="plan file x.json")
    assert "plan file x.json" in str(info.value)
    assert "not valid JSON" in str(info.value)


def test_from_json_truncated() -> None:
    text = _full_plan().to_json()[:40]
    with pytest.raises(ValueError, match=r"line \d+, column \d+"):
        Plan.from_json(text)


def test_newer_format_version_says_to_upgrade() -> None:
    data = _full_plan().to_dict()
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match="upgrade remat"):
        Plan.from_json(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"format_version": None}, "format_version"),
        ({"format_version": "1"}, "format_version"),
        ({"format_version": True}, "format_version"),
        ({"actions": ["blocks.0"]}, "actions"),
        ({"actions": {"blocks.0": "bogus"}}, "action"),
        ({"units": "blocks.0"}, "units"),
        ({"units": [1, 2]}, "units"),
        ({"fingerprint": [1]}, "fingerprint"),
        ({"metadata": [1]}, "metadata"),
        ({"budget_bytes": "22GiB"}, "budget_bytes"),
        ({"budget_bytes": True}, "budget_bytes"),
        ({"budget_bytes": 1.5}, "budget_bytes"),
        ({"predicted_overhead": "x"}, "predicted_overhead"),
    ],
)
def test_from_dict_refuses_bad_shapes(change: dict, match: str) -> None:
    data = _full_plan().to_dict()
    data.update(change)
    with pytest.raises(ValueError, match=match):
        Plan.from_dict(data)


def test_from_json_not_an_object() -> None:
    with pytest.raises(ValueError, match="JSON object"):
        Plan.from_json("[1, 2]")


def test_save_and_load(tmp_path: Path) -> None:
    plan = _full_plan()
    path = plan.save(tmp_path / "sub" / "plan.json")
    assert path == tmp_path / "sub" / "plan.json"
    assert path.read_text() == plan.to_json() + "\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["plan.json"]  # no temp files left
    assert Plan.load(path) == plan


def test_save_is_atomic_when_the_write_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "plan.json"
    old = Plan(actions={"blocks.0": "recompute"})
    old.save(path)
    before = path.read_text()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(plan_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        _full_plan().save(path)
    monkeypatch.undo()
    assert path.read_text() == before  # the old plan is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # temp file removed


def test_save_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    Plan(actions={"blocks.0": "recompute"}).save(path)
    _full_plan().save(path)
    assert Plan.load(path) == _full_plan()
    assert os.listdir(tmp_path) == ["plan.json"]


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(ValueError, match=r"missing\.json"):
        Plan.load(missing)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text("{")
    with pytest.raises(ValueError, match=r"corrupt\.json.*line 1, column 2"):
        Plan.load(corrupt)


# --------------------------------------------------------------------- JSON round trip (property)
_fqn = st.text(alphabet="abcxyz0123456789._", min_size=1, max_size=12)
_selector = st.one_of(
    _fqn,
    _fqn.map(lambda s: "re:" + re.escape(s)),
    st.sampled_from(["_default", "re:blocks\\.[0-9]+", "re:.*", "re:(a|b)+"]),
)
_action = st.one_of(
    st.sampled_from(["keep", "recompute"]),
    st.text(alphabet="ab01_-.", min_size=1, max_size=6).map(lambda label: f"segment:{label}"),
)
_json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False),
    st.text(max_size=8),
)
_json = st.recursive(
    _json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_plans = st.builds(
    Plan,
    actions=st.dictionaries(_selector, _action, max_size=6),
    units=st.one_of(st.none(), st.lists(_fqn, max_size=6)),
    strategy=st.text(max_size=10),
    fingerprint=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), _json, max_size=3)),
    budget_bytes=st.one_of(st.none(), st.integers(min_value=0, max_value=2**60)),
    predicted_peak_bytes=st.one_of(st.none(), st.integers(min_value=0, max_value=2**60)),
    predicted_overhead=st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
    metadata=st.dictionaries(st.text(max_size=5), _json, max_size=3),
)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(_plans)
def test_json_round_trip_of_random_plans(plan: Plan) -> None:
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert list(again.actions.items()) == list(plan.actions.items())
    assert again.to_json() == plan.to_json()


# -------------------------------------------------------------------------------- baselines
def test_strategies_listed() -> None:
    assert STRATEGIES == (
        "none",
        "full",
        "every_n:K",
        "sqrt_n",
        "megatron",
        "save_matmuls",
        "offload",
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("none", ("none", None)),
        ("full", ("full", None)),
        ("sqrt_n", ("sqrt_n", None)),
        ("every_n:1", ("every_n", 1)),
        ("every_n:12", ("every_n", 12)),
        (" every_n:3 ", ("every_n", 3)),
    ],
)
def test_parse_strategy(text: str, expected: tuple) -> None:
    assert parse_strategy(text) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("every_n", "positive integer"),
        ("every_n:", "positive integer"),
        ("every_n:0", "positive integer"),
        ("every_n:x", "positive integer"),
        ("every_n:-1", "positive integer"),
        ("every_n:1.5", "positive integer"),
        ("bogus", "expected none, full"),
        ("full:2", "expected none, full"),
        ("none:1", "expected none, full"),
        ("sqrt_n:", "expected none, full"),
        ("", "expected none, full"),
        ("Full", "expected none, full"),
    ],
)
def test_parse_strategy_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        parse_strategy(text)
    assert repr(text) in str(info.value)


def test_parse_strategy_not_a_string() -> None:
    with pytest.raises(ValueError, match="strategy"):
        parse_strategy(None)  # type: ignore[arg-type]


def test_baseline_plan_errors_like_parse_strategy() -> None:
    with pytest.raises(ValueError, match="every_n"):
        baseline_plan("every_n:0", UNITS)


def _units(n: int) -> list[str]:
    return [f"layers.{i}" for i in range(n)]


def _segments(plan: Plan, units: list[str]) -> dict[str, list[int]]:
    """Label -> indices of its units (in unit order)."""
    groups: dict[str, list[int]] = {}
    for index, unit in enumerate(units):
        action = plan.action_for(unit)
        if action.kind == "segment":
            groups.setdefault(action.label or "", []).append(index)
    return groups


@pytest.mark.parametrize("n", range(0, 31))
def test_none_and_full(n: int) -> None:
    units = _units(n)
    none = baseline_plan("none", units)
    assert none.actions == {}
    assert none.units == units
    assert none.strategy == "none"
    assert all(str(a) == "keep" for a in none.resolve(units).values())
    full = baseline_plan("full", units)
    assert full.strategy == "full"
    assert full.units == units
    resolved = full.resolve(units)
    assert list(resolved) == units
    assert all(str(a) == "recompute" for a in resolved.values())


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("n", range(1, 31))
def test_every_n(n: int, k: int) -> None:
    units = _units(n)
    plan = baseline_plan(f"every_n:{k}", units)
    assert plan.strategy == f"every_n:{k}"
    resolved = plan.resolve(units)
    recomputed = [i for i, u in enumerate(units) if str(resolved[u]) == "recompute"]
    assert recomputed == list(range(k - 1, n, k))  # units K-1, 2K-1, ...
    assert len(recomputed) == n // k
    assert all(str(resolved[u]) in ("keep", "recompute") for u in units)


def _check_sqrt_n(n: int) -> None:
    units = _units(n)
    plan = baseline_plan("sqrt_n", units)
    assert plan.strategy == "sqrt_n"
    resolved = plan.resolve(units)  # raises on a non-consecutive segment
    if n == 0:
        assert plan.actions == {}
        return
    if n == 1:  # one unit: nothing to split, it is recomputed
        assert str(resolved[units[0]]) == "recompute"
        return
    groups = _segments(plan, units)
    kept = [i for i, u in enumerate(units) if resolved[u].kind == "keep"]
    assert all(resolved[u].kind in ("keep", "segment") for u in units)
    num_segments = len(groups) + 1  # the kept tail is the last segment
    assert num_segments == max(2, round(math.sqrt(n)))
    assert abs(num_segments - math.sqrt(n)) <= 1
    # labels distinct, each segment consecutive and non-empty, in order, then the kept tail
    ordered = sorted(groups.values())
    for indices in ordered:
        assert indices
        assert indices == list(range(indices[0], indices[-1] + 1))
    flat = [i for indices in ordered for i in indices]
    assert flat == list(range(len(flat)))  # segments start at unit 0 and do not overlap
    assert kept == list(range(len(flat), n))  # the last segment is kept ...
    assert kept  # ... and is not empty
    assert sorted(flat + kept) == list(range(n))  # every unit covered exactly once
    # segments have about n / num_segments units each
    sizes = [len(indices) for indices in ordered] + [len(kept)]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n", range(0, 31))
def test_sqrt_n(n: int) -> None:
    _check_sqrt_n(n)


def test_sqrt_n_examples() -> None:
    # n=5: 2 segments, bounds round(0), round(2.5) == 2 (half to even), 5: units 0-1, kept 2-4
    assert [str(a) for a in baseline_plan("sqrt_n", _units(5)).actions.values()] == [
        "segment:0"
    ] * 2
    plan = baseline_plan("sqrt_n", _units(16))  # 4 segments of 4, the last kept
    assert _segments(plan, _units(16)) == {
        "0": [0, 1, 2, 3],
        "1": [4, 5, 6, 7],
        "2": [8, 9, 10, 11],
    }


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=400))
def test_sqrt_n_property(n: int) -> None:
    _check_sqrt_n(n)


@settings(derandomize=True, max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=300), st.integers(min_value=1, max_value=40))
def test_every_n_property(n: int, k: int) -> None:
    units = _units(n)
    plan = baseline_plan(f"every_n:{k}", units)
    resolved = plan.resolve(units)
    recomputed = {i for i, u in enumerate(units) if resolved[u].kind == "recompute"}
    assert recomputed == {i for i in range(n) if (i + 1) % k == 0}
    assert set(plan.actions) <= set(units)
    # every run of K consecutive units recomputes exactly one of them
    for start in range(0, n - k + 1, k):
        assert len(recomputed & set(range(start, start + k))) == 1


# ------------------------------------------------------------------------------ bytes and time
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("22GiB", 22 * 2**30),
        ("22GB", 22 * 10**9),
        ("22 GB", 22 * 10**9),
        ("22gib", 22 * 2**30),
        ("512MiB", 512 * 2**20),
        ("512MB", 512 * 10**6),
        ("2.5KiB", 2560),
        ("1kB", 1000),
        ("1TiB", 2**40),
        ("1TB", 10**12),
        ("100B", 100),
        ("100", 100),
        ("0", 0),
        ("1.5e9", 1_500_000_000),
        ("1E3", 1000),
        ("1e3KiB", 1_024_000),
        ("1.9", 1),  # rounded down
        ("  7 MiB  ", 7 * 2**20),
        (1024, 1024),
        (0, 0),
    ],
)
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected
    assert isinstance(parse_bytes(text), int)


def test_gib_and_gb_differ() -> None:
    assert parse_bytes("22GiB") - parse_bytes("22GB") == 22 * (2**30 - 10**9)


@pytest.mark.parametrize(
    "text", ["12 XB", "-1", "abc", "", "  ", "GiB", "1.5.5", "1e-3", "1 G i B"]
)
def test_parse_bytes_errors(text: str) -> None:
    with pytest.raises(ValueError, match="size") as info:
        parse_bytes(text)
    assert "GiB" in str(info.value)  # the accepted forms are listed


@pytest.mark.parametrize("value", [-1, True, False])
def test_parse_bytes_bad_ints(value: int) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_bytes(value)


@pytest.mark.parametrize(
    ("num_bytes", "text"),
    [
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (10 * 1024, "10.0 KiB"),
        (100 * 1024, "100 KiB"),
        (437.2 * 2**20, "437 MiB"),
        (111.2 * 2**20, "111 MiB"),
        (2**30, "1.00 GiB"),
        (22 * 2**30, "22.0 GiB"),
        (2**40, "1.00 TiB"),
        (2**50, "1024 TiB"),  # TiB is the largest unit
        (-1536, "-1.50 KiB"),
        (-5, "-5 B"),
    ],
)
def test_format_bytes(num_bytes: float, text: str) -> None:
    assert format_bytes(num_bytes) == text


def test_format_bytes_unit_boundary() -> None:
    assert format_bytes(2**20 - 1) == "1.00 MiB"
    assert format_bytes(10 * 1024 - 1) == "10.0 KiB"


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (None, "-"),
        (0, "0.000 ms"),
        (0.01234, "0.012 ms"),
        (0.5, "0.500 ms"),
        (1, "1.0 ms"),
        (12.345, "12.3 ms"),
        (123.4, "123 ms"),
        (4567.8, "4568 ms"),
    ],
)
def test_format_ms(ms: float | None, text: str) -> None:
    assert format_ms(ms) == text


def test_plan_records_precision_and_the_batch_it_was_made_for() -> None:
    plan = Plan(
        actions={"_default": "recompute"},
        precision="bf16-mixed",
        input_shapes=[[2, 16], [2, 16]],
        base_bytes=1024,
    )
    back = Plan.from_json(plan.to_json())
    assert back == plan and back.precision == "bf16-mixed" and back.input_shapes == [[2, 16]] * 2
    old = plan.to_dict()
    for key in ("precision", "input_shapes", "base_bytes"):
        del old[key]  # a plan written before these fields
    assert Plan.from_dict(old).precision == "32" and Plan.from_dict(old).input_shapes is None
    with pytest.raises(ValueError, match="precision: got 'bf16'"):
        Plan(actions={}, precision="bf16")
    with pytest.raises(ValueError, match="'input_shapes' must be a list of shapes"):
        Plan.from_dict({**plan.to_dict(), "input_shapes": [[2, "x"]]})
