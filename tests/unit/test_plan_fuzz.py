"""Fuzz tests of the plan loader (``Plan.load``, ``Plan.from_json``, ``Plan.from_dict``).

Whatever a plan file holds (random bytes, invalid UTF-8, random JSON, valid plans with one field
replaced or deleted), the only exception the loader raises is ``ValueError``, and whatever it
accepts round-trips through JSON and through a file. Also: a newer ``format_version`` is refused
with the version this remat reads, corrupt JSON is reported with the file, line and column, and
``Plan.save`` is atomic.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from remat.plan import FORMAT_VERSION, Plan

FUZZ = settings(
    derandomize=True,
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# --------------------------------------------------------------------------------- strategies
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)  # NaN != NaN: a plan holding it could not compare equal
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

labels = st.text(alphabet="abcXYZ019_.-", min_size=1, max_size=6)  # what a segment label may hold
actions = st.sampled_from(["keep", "recompute"]) | st.builds(
    "{}:{}".format, st.sampled_from(["segment", "nested"]), labels
)
selectors = (
    st.sampled_from(["_default", "blocks.0", "blocks.1", "head", "re:blocks\\.[0-9]+", "re:.*"])
    | st.text(min_size=1, max_size=12)
    | st.builds("re:{}".format, st.text(max_size=8))  # often not a valid regular expression
)
optional_ints = st.none() | st.integers(min_value=0, max_value=2**62)


def _plan_or_none(fields: dict[str, Any]) -> Plan | None:
    """The plan, or ``None`` when a drawn selector or action is refused (a bad regex, say)."""
    try:
        return Plan(**fields)
    except ValueError:
        return None


valid_plans = (
    st.fixed_dictionaries(
        {
            "actions": st.dictionaries(selectors, actions, max_size=5),
            "units": st.none() | st.lists(st.text(max_size=10), max_size=5),
            "strategy": st.sampled_from(["custom", "full", "none", "every_n:2", "sqrt_n"]),
            "fingerprint": st.none()
            | st.dictionaries(st.text(max_size=8), json_values, max_size=3),
            "budget_bytes": optional_ints,
            "predicted_peak_bytes": optional_ints,
            "predicted_overhead": st.none() | st.floats(allow_nan=False, allow_infinity=False),
            "metadata": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
        }
    )
    .map(_plan_or_none)
    .filter(lambda plan: plan is not None)
)
PLAN_KEYS = list(Plan().to_dict())


@st.composite
def mutated_plans(draw: st.DrawFn) -> Any:
    """A valid plan's ``to_dict()`` with one key (or one action) replaced by a random JSON value,
    or deleted, or a random key added."""
    data = draw(valid_plans).to_dict()
    how = draw(st.sampled_from(["replace", "delete", "add", "replace_action"]))
    if how == "replace":
        data[draw(st.sampled_from(PLAN_KEYS))] = draw(json_values)
    elif how == "delete":
        del data[draw(st.sampled_from(PLAN_KEYS))]
    elif how == "add":
        data[draw(st.text(max_size=10))] = draw(json_values)
    elif data["actions"]:
        selector = draw(st.sampled_from(sorted(data["actions"])))
        data["actions"][selector] = draw(json_values | actions)
    else:
        data["actions"][draw(st.text(max_size=10))] = draw(json_values | actions)
    return data


# ------------------------------------------------------------------------------------ helpers
def assert_round_trips(plan: Plan) -> None:
    """Through JSON text and through a file, the plan comes back the same (compared as JSON text,
    since a NaN that the loader accepted compares unequal to itself)."""
    text = plan.to_json()
    assert Plan.from_json(text).to_json() == text
    with tempfile.TemporaryDirectory() as folder:
        path = plan.save(Path(folder) / "plan.json")
        assert Plan.load(path).to_json() == text
        assert os.listdir(folder) == ["plan.json"]


def load_or_value_error(call: Any, *args: Any, **kwargs: Any) -> Plan | None:
    """``call(...)``: a plan, or ``None`` if it raised ``ValueError``; anything else propagates."""
    try:
        plan = call(*args, **kwargs)
    except ValueError as error:
        assert str(error)  # never an empty message
        return None
    assert isinstance(plan, Plan)
    return plan


# -------------------------------------------------------------------------------------- fuzzing
@st.composite
def file_contents(draw: st.DrawFn) -> bytes:
    """Random bytes, JSON text, or a valid plan file with some bytes flipped, cut or inserted."""
    kind = draw(st.sampled_from(["bytes", "json", "plan", "mutated"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(json_values)).encode()
    text = draw(valid_plans).to_json().encode()
    if kind == "plan":
        return text
    data = bytearray(text)
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["flip", "cut", "insert"]))
        if edit == "flip" and position < len(data):
            data[position] = draw(st.integers(0, 255))
        elif edit == "cut":
            del data[position : position + draw(st.integers(1, 8))]
        else:
            data[position:position] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


@FUZZ
@given(content=file_contents())
def test_load_raises_only_value_error_on_any_bytes(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.json"
        path.write_bytes(content)
        plan = load_or_value_error(Plan.load, path)
    if plan is not None:
        assert_round_trips(plan)


def test_load_refuses_invalid_utf8_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"format_version": 1, "actions": {"\xff\xfe": "keep"}}')
    with pytest.raises(ValueError, match=r"latin1\.json"):
        Plan.load(path)


@FUZZ
@given(value=json_values)
def test_from_json_raises_only_value_error_on_any_json(value: Any) -> None:
    for text in (json.dumps(value), json.dumps({"format_version": 1, "actions": value})):
        plan = load_or_value_error(Plan.from_json, text)
        if plan is not None:
            assert_round_trips(plan)
    plan = load_or_value_error(Plan.from_dict, value)
    if plan is not None:
        assert_round_trips(plan)


@FUZZ
@given(text=st.text(max_size=100))
def test_from_json_raises_only_value_error_on_any_text(text: str) -> None:
    plan = load_or_value_error(Plan.from_json, text, source="fuzz")
    if plan is not None:
        assert_round_trips(plan)


@FUZZ
@given(data=mutated_plans())
def test_mutated_plans_raise_only_value_error(data: Any) -> None:
    plan = load_or_value_error(Plan.from_dict, data, source="mutant")
    if plan is not None:
        assert_round_trips(plan)
    plan = load_or_value_error(Plan.from_json, json.dumps(data), source="mutant")
    if plan is not None:
        assert_round_trips(plan)


@FUZZ
@given(plan=valid_plans)
def test_valid_plans_round_trip(plan: Plan) -> None:
    assert_round_trips(plan)
    assert Plan.from_json(plan.to_json()) == plan
    assert Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


# ---------------------------------------------------------------- inputs that must be refused
@pytest.mark.parametrize(
    "text",
    [
        # a number too large for a float, where a float is expected
        '{"format_version": 1, "actions": {}, "predicted_overhead": 1' + "0" * 400 + "}",
        # a regular expression that compiles with OverflowError
        '{"format_version": 1, "actions": {"re:a{99999999999}": "keep"}}',
        # JSON nested deeper than the decoder's recursion limit
        "[" * 100_000 + "]" * 100_000,
        # a regular expression nested deeper than the compiler's recursion limit
        '{"format_version": 1, "actions": {"re:' + "(" * 5000 + ")" * 5000 + '": "keep"}}',
    ],
    ids=["huge-int-overhead", "regex-overflow", "deep-json", "deep-regex"],
)
def test_pathological_inputs_raise_value_error(text: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Plan.from_json(text)
    path = tmp_path / "plan.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"plan\.json"):
        Plan.load(path)


def test_integer_over_digit_limit_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text('{"format_version": ' + "1" * 5000 + ', "actions": {}}')
    with pytest.raises(ValueError, match=r"plan\.json"):
        Plan.load(path)


def test_newer_format_version_names_the_version_read(tmp_path: Path) -> None:
    data = Plan(actions={"blocks.0": "recompute"}).to_dict()
    data["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError) as caught:
        Plan.from_dict(data)
    message = str(caught.value)
    assert f"format_version {FORMAT_VERSION + 1}" in message
    assert f"({FORMAT_VERSION})" in message and "reads" in message
    path = tmp_path / "future.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"future\.json.*newer than this remat reads \(1\)"):
        Plan.load(path)


def test_corrupt_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.json"
    lines = Plan(actions={"blocks.0": "recompute"}).to_json().splitlines()
    assert lines[1].startswith('  "format_version"')
    lines[2] = lines[2].replace(":", "", 1)  # line 3: '  "kind" "remat.plan",'
    path.write_text("\n".join(lines))
    column = lines[2].index('"remat.plan"') + 1
    with pytest.raises(ValueError) as caught:
        Plan.load(path)
    message = str(caught.value)
    assert str(path) in message
    assert f"line 3, column {column}" in message


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "plan.json"
    old = Plan(actions={"blocks.0": "recompute"})
    old.save(target)
    before = target.read_bytes()
    assert os.listdir(tmp_path) == ["plan.json"]

    def fail(src: Any, dst: Any) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", fail)
    new = Plan(actions={"_default": "segment:all"}, units=["a", "b"])
    with pytest.raises(OSError, match="simulated"):
        new.save(target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["plan.json"]  # no temporary file left behind
    with pytest.raises(OSError, match="simulated"):
        new.save(tmp_path / "fresh.json")  # a file that did not exist is not created
    assert os.listdir(tmp_path) == ["plan.json"]

    monkeypatch.undo()
    new.save(target)
    assert Plan.load(target) == new
    assert os.listdir(tmp_path) == ["plan.json"]
