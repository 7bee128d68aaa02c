"""One description of the training step (``remat.Step``) and one pipeline (issue 15, item 1).

A property of the step stated once on a ``Step`` must reach every entry point: the profile, the
pipeline's measured plan, ``auto_``, ``bench`` and ``verify``. The oracle for the accumulated step
is a hand-written training loop (micro-batches' backward passes, then the optimizer step) under
the tracker, which shares nothing with remat's step code but the byte counting.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import remat
from remat.models.spec import load_model
from remat.profiling.tracker import track_memory

SRC = Path(__file__).resolve().parents[2] / "src" / "remat"


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()


@pytest.fixture
def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(32, 32), nn.GELU()) for _ in range(4)])


BATCH = (torch.randn(256, 32),)


def _loop_peak(model: nn.Module, micro_batches: int) -> int:
    """The peak of a plain accumulation loop: ``micro_batches`` backward passes, one SGD step."""
    snapshot = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for p in model.parameters():
        p.grad = None
    with track_memory(model, BATCH, opt) as tracker:
        for _ in range(micro_batches):
            _loss(model(*BATCH)).backward()
        opt.step()
    for p, saved in zip(model.parameters(), snapshot, strict=True):
        p.data.copy_(saved)
        p.grad = None
    return tracker.report().peak_bytes


def test_accumulation_stated_once_reaches_every_entry_point(model: nn.Module) -> None:
    step = remat.Step(model, BATCH, loss_fn=_loss, optimizer="sgd", accumulation_steps=4)
    loop = _loop_peak(model, 4)
    assert loop > _loop_peak(model, 1)  # the gradients alive in the last forward show
    assert remat.measure_plan(step) == loop
    assert remat.profile_step(step, options=(), repeats=0).peak_bytes == loop
    full = remat.baseline_plan("full", [str(i) for i in range(4)])
    report = remat.verify(step, full)
    assert report.unplanned_peak_bytes == loop
    assert report.grads_equal and report.applied
    assert report.measured_peak_bytes == remat.measure_plan(step, full) < loop
    result = remat.bench(step, strategies=["full"], budgets=[], steps=1, dominate=False)
    assert result.row("none").peak_bytes == loop
    assert result.row("full").peak_bytes == report.measured_peak_bytes
    handle = remat.auto_(step, budget="min", actions=["keep", "recompute"])
    handle.remove()
    assert handle.result.measured_peak_bytes == remat.measure_plan(step, handle.result.plan)
    assert handle.result.measured_peak_bytes < loop


def test_the_pipeline_plans_a_step_within_its_capacity(model: nn.Module) -> None:
    unplanned = _loop_peak(model, 1)
    capacity = unplanned * 9 // 10
    step = remat.Step(model, BATCH, loss_fn=_loss, optimizer="sgd", capacity_bytes=capacity)
    planned = remat.plan_step(step, "100%")  # 100% is the unplanned peak: over the capacity
    assert planned.profile.peak_bytes == unplanned  # measured in windows that fit
    assert planned.profile.profiling_peak_bytes <= capacity
    assert planned.result.budget_bytes == capacity
    assert planned.result.measured_peak_bytes <= capacity
    assert planned.step is step and planned.plan is planned.result.plan


def test_an_estimated_step_is_solved_per_rank_and_never_run_here() -> None:
    built = load_model(
        "gpt",
        device="meta",
        batch=2,
        seq=64,
        overrides={"n_layer": 2, "d_model": 64, "n_head": 4, "vocab": 128},
    )
    one = remat.Step(built.model, built.example_inputs, loss_fn=built.loss_fn, target="h100-80gb")
    sharded = one.replace(world_size=8, fsdp=True)
    whole, per_rank = (remat.plan_step(s, "device") for s in (one, sharded))
    assert per_rank.profile.world_size == 8 and per_rank.profile.fsdp
    assert per_rank.profile.static_bytes < whole.profile.static_bytes
    assert per_rank.result.measured_peak_bytes is None  # solved, not measured
    with pytest.raises(ValueError, match="estimated for 'h100-80gb'"):
        remat.measure_plan(one)
    with pytest.raises(ValueError, match="estimated for 'h100-80gb'"):
        remat.bench(one, budgets=["min"], steps=1)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"precision": "bf16"}, "precision: got 'bf16'"),
        ({"accumulation_steps": 0}, "accumulation_steps: got 0"),
        ({"world_size": 0}, "world_size: got 0"),
        ({"capacity_bytes": 0}, "capacity_bytes: got 0"),
        ({"optimizer": "adam"}, "optimizer: got 'adam'"),
        ({"dtype": "bfloat16"}, "dtype, attention: given without a target"),
    ],
)
def test_a_step_refuses_what_cannot_run(model: nn.Module, fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        remat.Step(model, BATCH, **fields)


def test_a_missing_batch_is_named(model: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"batch: got None; expected one batch"):
        remat.auto_(model, budget="min")


def test_a_step_is_not_restated_beside_it(model: nn.Module) -> None:
    step = remat.Step(model, BATCH, optimizer="sgd")
    with pytest.raises(ValueError, match=r"optimizer: got beside a Step.*step.replace\(optimizer"):
        remat.auto_(step, budget="min", optimizer="adamw_typo_is_not_checked_first")
    with pytest.raises(ValueError, match="batch: got beside a Step"):
        remat.verify(step, remat.Plan(), BATCH)
    with pytest.raises(ValueError, match="precision: got beside a Step"):
        remat.bench(step, precision="bf16-mixed")


def _calls(name: str) -> dict[str, list[int]]:
    """Modules of src/remat that call ``name(...)`` (as a bare name or an attribute)."""
    found: dict[str, list[int]] = {}
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
                if called == name:
                    found.setdefault(str(path.relative_to(SRC)), []).append(node.lineno)
    return found


def test_the_step_reaches_the_profiler_and_the_closed_loop_in_one_place() -> None:
    # The pipeline (auto.py) is the only caller of the profiler's entry points and of the
    # closed loop, besides the profiler's own recursion; verify's saving check profiles with no
    # optimizer on purpose (information only). The entry points call the pipeline.
    assert set(_calls("profile")) <= {"auto.py", "profiling/profiler.py", "verify.py"}
    assert set(_calls("estimate_profile")) == set()
    assert set(_calls("estimate_via_meta")) == {
        "auto.py",
        "profiling/profiler.py",
        "profiling/estimate.py",
    }
    assert set(_calls("solve_measured")) == {"auto.py"}
    assert set(_calls("measure_step")) <= {"auto.py", "profiling/step.py", "cli/profile.py"}
    assert set(_calls("per_rank")) <= {"profiling/profiler.py", "solve/solver.py"}
    callers = set(_calls("plan_step"))
    assert {
        "auto.py",
        "cli/plan.py",
        "cli/_estimate.py",
        "fit.py",
        "benchmarking/run.py",
    } <= callers
    assert "verify.py" in set(_calls("measure_plan"))
