"""The compiled path end to end: a profile priced by compiled steps, ``auto_(compile=...)``, and
bench's ``remat:<budget>+compile`` rows.

Oracles: a hand count of how measured step times are shared among units; the compiled unplanned
model's gradients (bitwise, aot_eager); the eager engine made to raise if it runs.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

import remat
from remat.apply.compile import compile_units_
from remat.cost.model import OptionProfile, example_profile
from remat.models import build_builtin
from remat.profiling import compiled
from remat.profiling.step import Step


def test_compiled_times_are_shared_by_eager_costs(monkeypatch: pytest.MonkeyPatch) -> None:
    # Four units: eager recompute costs 1, 1, 2, 4 ms (sum 8); a selective option on units 0 and
    # 2 only, eager costs 3 and 1 ms. Compiled steps (fake): unplanned 6 ms, all recomputed 10 ms,
    # the option on its units 5 ms (faster than unplanned: costs nothing).
    prof = example_profile(4)
    costs = [1.0, 1.0, 2.0, 4.0]
    units = []
    for index, (unit, cost) in enumerate(zip(prof.units, costs, strict=True)):
        options = []
        if index in (0, 2):
            option = OptionProfile(action="selective:ops.mm", retain_bytes=50, cost_ms=3.0 - index)
            options.append(option)
        units.append(dataclasses.replace(unit, recompute_ms=cost, options=options))
    prof = dataclasses.replace(prof, units=units, step_ms=12.0, time_resolution_ms=0.12)
    asked = {}

    def fake_times(step: Step, plans: dict, **_kwargs: object) -> dict[str, float]:
        asked.update(plans)
        return {"none": 6.0, "recompute": 10.0, "selective:ops.mm": 5.0}

    monkeypatch.setattr(compiled, "time_compiled", fake_times)
    monkeypatch.setattr(compiled, "time_compiled_units", lambda *_a, **_k: None)  # not alone
    step = Step(nn.Linear(2, 2), (torch.ones(1, 2),))
    out = compiled.compiled_profile(step, prof, backend="aot_eager")
    assert sorted(asked) == ["none", "recompute", "selective:ops.mm"]
    assert {fqn: str(a) for fqn, a in asked["selective:ops.mm"].actions.items()} == {
        "b.0": "selective:ops.mm",
        "b.2": "selective:ops.mm",
    }
    assert out.step_ms == 6.0 and out.time_resolution_ms == 0.06
    # 10 - 6 = 4 ms shared as 1:1:2:4 of 8.
    assert [u.recompute_ms for u in out.units] == [0.5, 0.5, 1.0, 2.0]
    assert [o.cost_ms for u in out.units for o in u.options] == [0.0, 0.0]
    # forward_ms scaled by 6 / 12; bytes as they were; the input profile untouched.
    assert [u.forward_ms for u in out.units] == [0.5] * 4
    assert out.peak_bytes == prof.peak_bytes and out.units[0].keep_bytes == prof.units[0].keep_bytes
    assert prof.units[0].recompute_ms == 1.0 and prof.units[0].options[0].cost_ms == 3.0
    assert "compiled path" in out.notes[-1]


def test_compiled_times_of_units_alone_price_each_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Where every unit runs alone, each is priced by its own compiled times (fake here: unit i
    # recomputed costs i ms, its option 10 + i), and whole steps are timed only unplanned.
    prof = example_profile(3)
    option = OptionProfile(action="selective:ops.mm", retain_bytes=50, cost_ms=9.0)
    units = [dataclasses.replace(u, recompute_ms=5.0, options=[option]) for u in prof.units]
    prof = dataclasses.replace(prof, units=units, step_ms=12.0)
    asked: dict = {}

    def fake_alone(step: Step, fqns: list, actions: list, **_kwargs: object) -> list:
        asked["actions"] = actions
        return [
            {"recompute": float(i), "selective:ops.mm": 10.0 + i, "compiled_over_eager": -2.0}
            for i in range(len(fqns))
        ]

    def no_steps(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("whole steps are not timed where every unit ran alone")

    monkeypatch.setattr(compiled, "time_compiled_units", fake_alone)
    monkeypatch.setattr(compiled, "time_compiled", no_steps)
    out = compiled.compiled_profile(Step(nn.Linear(2, 2), (torch.ones(1, 2),)), prof)
    assert asked == {"actions": [["recompute", "selective:ops.mm"]] * 3}
    assert [u.recompute_ms for u in out.units] == [0.0, 1.0, 2.0]
    assert [u.options[0].cost_ms for u in out.units] == [10.0, 11.0, 12.0]
    # The eager step, each of the three units 2 ms faster compiled.
    assert out.step_ms == 12.0 - 3 * 2.0 and "each unit timed alone" in out.notes[-1]
    assert prof.units[1].options[0].cost_ms == 9.0  # the eager profile untouched


def test_time_compiled_units_times_each_distinct_unit_once(monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)]
    model = nn.Sequential(*blocks, nn.Linear(8, 4))
    step = Step(model, (torch.randn(4, 8),), optimizer="sgd", units=["0", "1", "2"])
    timed: list[nn.Module] = []
    original = compiled._time_variants

    def counting(unit: nn.Module, *args: object) -> dict[str, float]:
        timed.append(unit)
        return original(unit, *args)

    monkeypatch.setattr(compiled, "_time_variants", counting)
    before = [p.detach().clone() for p in model.parameters()]
    actions = [["recompute", "selective:ops.addmm"]] * 3
    found = compiled.time_compiled_units(step, ["0", "1", "2"], actions, backend="aot_eager")
    assert timed == [blocks[0]]  # the three blocks are one unit's structure
    assert found is not None and found[0] is found[2]
    assert sorted(found[0]) == ["compiled_over_eager", "recompute", "selective:ops.addmm"]
    assert found[0]["recompute"] >= 0 and found[0]["selective:ops.addmm"] >= 0
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    # A unit none of whose outputs needs a gradient cannot be timed alone: None (whole steps).
    frozen = nn.Embedding(10, 8).requires_grad_(False)  # integer input, frozen weights
    step = Step(nn.Sequential(frozen, nn.Linear(8, 4)), (torch.arange(4),), units=["0"])
    assert compiled.time_compiled_units(step, ["0"], [["recompute"]], backend="eager") is None


@pytest.fixture(scope="module")
def mlp() -> object:
    torch.manual_seed(0)
    return build_builtin("mlp", batch=256, width=32, n_blocks=3, in_features=16)


def _grads(model: nn.Module, built: object) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    built.loss_fn(model(*built.example_inputs)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_auto_compile_plans_for_and_runs_the_compiled_path(
    mlp: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch._dynamo.reset()
    reference = copy.deepcopy(mlp.model)
    compile_units_(reference, remat.find_units(reference), backend="aot_eager")
    expected = _grads(reference, mlp)
    torch._dynamo.reset()
    model = copy.deepcopy(mlp.model)
    handle = remat.auto_(
        model,
        mlp.example_inputs,
        loss_fn=mlp.loss_fn,
        budget="min",
        actions=["keep", "recompute", "segment"],  # selective: compiled in test_compile.py
        compile="aot_eager",
    )
    kinds = {action.split(":")[0] for action in handle.actions.values()}
    # Segments are not priced for the compiled path: left out of the plan.
    assert "recompute" in kinds and kinds <= {"keep", "recompute"}, handle.actions
    assert handle.result.measured_peak_bytes <= handle.result.budget_bytes
    from remat.apply import checkpoint as engine

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("remat's eager engine ran on a model planned with compile=")

    monkeypatch.setattr(engine, "OpLog", refuse)
    monkeypatch.setattr(engine.Region, "_frame_for", refuse)
    grads = _grads(model, mlp)
    for name, grad in expected.items():
        assert torch.equal(grads[name], grad), name


def test_bench_with_compile_adds_remat_compiled_rows() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(3)])
    batch = (torch.randn(16, 32),)
    result = remat.bench(
        model,
        batch,
        strategies=["full"],
        budgets=["min"],
        steps=1,
        optimizer="sgd",
        dominate=False,
        with_compile=True,
        compile_fractions=(),
        compile_backend="aot_eager",
    )
    row = result.row("remat:min+compile")
    assert row.status == "ok" and row.kind == "remat", row.notes
    assert {a.split(":")[0] for a in row.plan.values()} <= {"keep", "recompute", "selective"}
    assert row.plan != dict.fromkeys(row.plan, "keep")
    # The CPU measures no compiled peak: none is claimed, the prediction is there.
    assert row.peak_bytes is None and row.budget_met is None
    assert row.predicted_peak_bytes is not None and row.step_ms is not None
    assert any("peak not measured" in note for note in row.notes)
    # The same first step as the eager unplanned model's (same weights and seed), compiled.
    torch.testing.assert_close(row.loss, result.row("none").loss, rtol=1e-6, atol=0)
    assert "remat:min+compile" in remat.benchmarking.report.render_markdown(result)
