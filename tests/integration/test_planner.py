"""The planner end to end: profile -> solve -> apply -> measure, on the built-in models.

Predictions are checked against the tracker's measurement of the same plan (CPU, float32). Timing
claims (overhead within 10% of predicted, 96 units solved in under a second) are benchmarks, not
tests: see benchmarks/planner.py and benchmarks/results/.
"""

from __future__ import annotations

import json

import pytest
import torch

import remat
from memory_oracle import oracle_step_peak
from remat.auto import solve_measured
from remat.cli.main import main
from remat.models import build_builtin
from remat.profiling.step import measure_step
from remat.solve.solver import INFEASIBLE, OPTIMAL

SIZES = {
    "gpt": {"n_layer": 6, "d_model": 64, "n_head": 4, "seq": 64, "batch": 4, "vocab": 256},
    "mlp": {"batch": 64, "width": 128, "n_blocks": 6},
    "cnn": {"batch": 8, "image_size": 16},
    "unet": {"batch": 2, "image_size": 32},
    "moe": {"batch": 2, "seq": 32, "d_model": 64, "n_layer": 4},
}
BASELINES = ["none", "full", "every_n:2", "sqrt_n"]
BUDGETS = ["80%", "60%", "40%", "25%"]


def _build(name: str, device: str = "cpu", **extra: object) -> remat.models.BuiltModel:
    torch.manual_seed(0)
    with torch.device(device):
        return build_builtin(name, **{**SIZES[name], **extra})


def _measure(built: remat.models.BuiltModel, plan: remat.Plan) -> int:
    with remat.apply_(built.model, plan):
        torch.manual_seed(1)
        return measure_step(built.model, built.example_inputs, loss_fn=built.loss_fn).peak_bytes


def _oracle(built: remat.models.BuiltModel, plan: remat.Plan | None = None) -> int:
    """The step's peak by the independent oracle (tests/memory_oracle.py), ``plan`` applied
    (``None``: the model as it is, a plan applied in place included)."""
    if plan is None:
        return oracle_step_peak(built.model, built.example_inputs, loss_fn=built.loss_fn)
    with remat.apply_(built.model, plan):
        return oracle_step_peak(built.model, built.example_inputs, loss_fn=built.loss_fn)


@pytest.fixture(scope="module")
def profiles() -> dict[str, tuple[remat.models.BuiltModel, remat.Profile]]:
    found = {}
    for name in SIZES:
        built = _build(name)
        found[name] = (
            built,
            remat.profile(built.model, built.example_inputs, loss_fn=built.loss_fn, repeats=0),
        )
    return found


@pytest.mark.parametrize("name", list(SIZES))
def test_prediction_matches_measurement_for_baselines_and_solver_plans(
    name: str, profiles: dict
) -> None:
    built, prof = profiles[name]
    plans = {s: remat.baseline_plan(s, prof.unit_fqns) for s in BASELINES}
    for budget in BUDGETS:
        plans[f"remat:{budget}"] = remat.solve(prof, budget).plan
    for label, plan in plans.items():
        predicted = remat.simulate(prof, plan).peak_bytes
        measured = _measure(built, plan)
        # none and full are plans the profile measured: to the byte; the rest are composed
        # from them: within 0.2% (it was 2%, which hid a 10% U-Net and a 3.5% segment error)
        tolerance = 0 if label in ("none", "full") else 0.002
        assert predicted == pytest.approx(measured, rel=tolerance, abs=0), (
            f"{name} {label}: predicted {predicted:,} measured {measured:,}"
        )


@pytest.mark.parametrize("name", ["gpt", "cnn", "unet"])
def test_every_solver_plan_fits_its_budget_when_measured(name: str, profiles: dict) -> None:
    built, prof = profiles[name]
    for budget in [*BUDGETS, "min"]:
        result = remat.solve(prof, budget)
        assert result.fits, (name, budget)  # every percentage has a plan
        assert _oracle(built, result.plan) <= result.budget_bytes, (name, budget)


def test_recompute_cost_falls_as_the_budget_grows(profiles: dict) -> None:
    _, prof = profiles["gpt"]
    costs = [remat.solve(prof, f"{p}%").cost for p in (25, 40, 60, 80, 100)]
    assert costs == sorted(costs, reverse=True)
    assert costs[-1] == 0  # the unplanned step fits 100%


def test_sqrt_n_regime_on_a_24_layer_gpt() -> None:
    # Budgets below what `full` reaches need nested segments (a block's activations are ~40x its
    # input, so one-level segments never pay off); shapes alone (meta) are exact and fast.
    torch.manual_seed(0)
    with torch.device("meta"):
        built = build_builtin("gpt", n_layer=24, seq=512, dropout=0.0)
    prof = remat.profile(built.model, built.example_inputs, loss_fn=built.loss_fn)
    assert prof.time_source == "flops"
    full_peak = prof.full_peak_bytes
    assert full_peak is not None
    min_peak = remat.solve(prof, "min").min_peak_bytes
    assert min_peak < full_peak, "segments reach below every-unit checkpointing"
    for fraction in (0.25, 0.5, 0.75):
        budget = int(min_peak + fraction * (full_peak - min_peak))
        result = remat.solve(prof, budget)
        assert result.status == OPTIMAL
        kinds = {a.kind for a in result.plan.actions.values()}
        assert "nested" in kinds
        # the tracker, not the oracle: on meta, torch's meta kernels are not the CPU's (the
        # tracker mirrors the CPU's outputs there), so only the tracker measures the CPU's step
        assert _measure(built, result.plan) <= budget


def test_a_nested_segment_that_ends_before_the_last_unit_is_predicted_to_the_byte() -> None:
    # The last block's input outlives its forward only while GPT.forward's `x` still names it;
    # the profile once counted it as forward-only for the unit before, so a segment ending there
    # (its output stored by the kept last block) was predicted one block output short.
    # dropout=0.0: attention runs the CPU's flash kernel (mirrored on meta).
    built = _build("gpt", device="meta", n_layer=4, dropout=0.0)
    prof = remat.profile(built.model, built.example_inputs, loss_fn=built.loss_fn, options=())
    plan = remat.Plan(actions={"blocks.1": "nested:s", "blocks.2": "nested:s"})
    predicted = remat.simulate(prof, plan)
    assert predicted.peak_bytes == _measure(built, plan)
    assert predicted.where == "loss and head"


def test_auto_applies_a_plan_that_fits_and_keeps_gradients() -> None:
    reference = _build("gpt")
    torch.manual_seed(1)
    remat.profiling.step.training_step(
        reference.model, reference.example_inputs, loss_fn=reference.loss_fn
    )
    built = _build("gpt")
    handle = remat.auto_(built.model, built.example_inputs, budget="40%", loss_fn=built.loss_fn)
    result = handle.result
    assert result.iterations == 1  # the first plan fit when measured
    assert _oracle(built) <= result.budget_bytes  # the plan as applied, outside the closed loop
    assert result.predicted_overhead is not None and result.predicted_overhead > 1
    assert handle.checkpointed
    torch.manual_seed(1)
    remat.profiling.step.training_step(built.model, built.example_inputs, loss_fn=built.loss_fn)
    for (n, a), (_, b) in zip(
        reference.model.named_parameters(), built.model.named_parameters(), strict=True
    ):
        assert torch.equal(a.grad, b.grad), n
    handle.remove()


@pytest.mark.parametrize("name", ["unet", "gpt"])
def test_min_is_the_lowest_measured_peak_of_the_least_peak_plans(name: str, profiles: dict) -> None:
    built, prof = profiles[name]
    step = remat.Step(built.model, built.example_inputs, loss_fn=built.loss_fn)
    result = solve_measured(step, prof, "min")
    assert result.status != INFEASIBLE
    assert result.budget_bytes == result.measured_peak_bytes == _oracle(built, result.plan)
    assert any("least-peak plans" in note for note in result.notes), result.notes
    # Never above the lowest peak the whole-unit plans reach, which is one of those measured.
    whole_units = remat.solve(prof, "min", actions=["keep", "recompute"]).plan
    assert result.measured_peak_bytes <= _measure(built, whole_units)


def test_auto_raises_when_no_plan_fits() -> None:
    built = _build("mlp")
    with pytest.raises(remat.InfeasibleBudgetError, match="least achievable peak") as info:
        remat.auto_(built.model, built.example_inputs, budget=1000)
    assert info.value.result.min_peak_bytes > 1000


def test_profile_round_trips_through_json(profiles: dict) -> None:
    _, prof = profiles["unet"]
    again = remat.Profile.from_json(prof.to_json())
    assert again == prof
    assert prof.cross_unit, "the U-Net's skip tensors live across units"


TINY = ["--set", "n_layer=4", "d_model=64", "n_head=4", "vocab=256", "--seq", "64", "--batch", "4"]


def test_cli_plan_json_and_verify(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    assert main(["plan", "gpt", *TINY, "--budget", "50%", "--out", str(out), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("status", "budget_bytes", "predicted_peak_bytes", "predicted_overhead", "plan"):
        assert key in data
    assert data["status"] == "OPTIMAL"
    assert remat.Plan.load(out).units == data["plan"]["units"]
    # the saved plan on the same model, measured outside the CLI's closed loop
    torch.manual_seed(0)
    built = build_builtin("gpt", n_layer=4, d_model=64, n_head=4, vocab=256, seq=64, batch=4)
    assert _oracle(built, remat.Plan.load(out)) <= data["budget_bytes"]
    assert main(["verify", "gpt", *TINY, "--plan", str(out), "--json"]) == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["grads_equal"] and verdict["buffers_equal"]
    assert verdict["measured_peak_bytes"] < verdict["unplanned_peak_bytes"]


def test_cli_plan_baseline_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "gpt", *TINY, "--strategy", "sqrt_n", "--device", "meta", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["predicted_peak_bytes"] == data["measured_peak_bytes"]
    assert data["lower_bound"] <= data["recompute_cost"]


def test_cli_infeasible_budget_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "gpt", *TINY, "--device", "meta", "--budget", "1MiB"]) == 3
    err = capsys.readouterr().err
    assert "least feasible budget" in err and "--budget" in err


@pytest.mark.parametrize("budget", ["12 XB", "-1", "150%", "abc", "100.5%"])
def test_cli_malformed_budget_exits_2(budget: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["plan", "gpt", "--budget", budget])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "22GiB" in err and "%" in err and "min" in err  # the accepted forms are listed


def test_cli_plan_needs_a_budget_for_auto(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["plan", "gpt"])
    assert info.value.code == 2


def test_recompute_cost_is_measured_against_the_kept_unit() -> None:
    built = _build("mlp")
    prof = remat.profile(built.model, built.example_inputs, loss_fn=built.loss_fn, repeats=2)
    for unit in prof.units:
        assert unit.forward_ms is not None and unit.recompute_ms is not None
        # (recompute_ms >= forward_ms holds by construction, a floor pinned with made-up
        # timings in tests/unit/test_profiler_times.py)
        assert unit.recompute_cost("measured") == unit.recompute_ms
        assert unit.recompute_cost("flops") == float(unit.forward_flops)
    assert remat.Profile.from_json(prof.to_json()) == prof
    without = remat.profile(built.model, built.example_inputs, loss_fn=built.loss_fn, repeats=0)
    assert all(unit.recompute_ms is None for unit in without.units)


def test_segment_with_a_skip_from_outside_is_predicted() -> None:
    """A segment over the U-Net's first two up blocks stores the skip the second one takes from a
    down block outside it (a checkpoint input), which outlives the forward; the whole-model
    segment the profile measures cannot show that (there the skip is internal and dies). The
    prediction was one skip short: 1 MiB at the default size, where the peak is at the loss."""
    torch.manual_seed(0)
    built = build_builtin("unet")
    prof = remat.profile(
        built.model, built.example_inputs, loss_fn=built.loss_fn, repeats=0, options=()
    )
    segment = {"up.0": "segment:a", "up.1": "segment:a"}
    with_recompute = {**segment, "down.0": "recompute", "down.1": "recompute"}
    for actions in (segment, with_recompute):
        plan = remat.Plan(actions=actions)
        predicted = remat.simulate(prof, plan)
        assert predicted.where == "loss and head"  # where the retention decides the peak
        measured = _measure(built, plan)
        assert predicted.peak_bytes == pytest.approx(measured, rel=0.002), (actions, measured)
