"""Planning a step that does not fit (issue 15, item 5): under a simulated capacity the unplanned
step raises ``torch.OutOfMemoryError`` as CUDA would, and profiling takes it in windows that fit,
combined exactly.

Oracles: the profile taken without a capacity (every field of every unit equal, and the whole
step's peak predicted equal to the one measured there); the plan's step measured under the
capacity; the CLI's JSON read as a user reads it.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import remat
from memory_oracle import oracle_step_peak
from remat.cli.main import main
from remat.models import build_builtin
from remat.profiling.tracker import simulated_capacity

OPTIONS = ["selective:save_matmuls"]


def _profile(name: str, capacity_bytes: int | None = None, **sizes: int) -> remat.Profile:
    built = build_builtin(name, **sizes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return remat.profile(
            built.model,
            built.example_inputs,
            loss_fn=built.loss_fn,
            options=OPTIONS,
            repeats=0,
            capacity_bytes=capacity_bytes,
        )


def _differences(whole: remat.Profile, pieces: remat.Profile) -> list[str]:
    a, b = whole.to_dict(), pieces.to_dict()
    skip = ("units", "profiling_peak_bytes", "capacity_bytes")
    found = [k for k in a if k not in skip and a[k] != b[k]]
    for unit_a, unit_b in zip(a["units"], b["units"], strict=True):
        found += [f"{unit_a['fqn']}.{k}" for k in unit_a if unit_a[k] != unit_b[k]]
    return found


GPT = {"n_layer": 4, "d_model": 32, "n_head": 4, "seq": 64, "batch": 4, "vocab": 64}


@pytest.mark.parametrize(("name", "sizes", "fraction"), [("gpt", GPT, 0.9), ("unet", {}, 0.95)])
def test_a_step_that_does_not_fit_is_profiled_in_windows_exactly(
    name: str, sizes: dict[str, int], fraction: float
) -> None:
    whole = _profile(name, **sizes)
    capacity = int(whole.peak_bytes * fraction)
    built = build_builtin(name, **sizes)
    with simulated_capacity(capacity), pytest.raises(torch.OutOfMemoryError):
        remat.profiling.step.measure_step(built.model, built.example_inputs, loss_fn=built.loss_fn)
    pieces = _profile(name, capacity, **sizes)
    assert _differences(whole, pieces) == []
    assert pieces.peak_bytes == whole.peak_bytes  # predicted from the windows, measured whole
    assert pieces.profiling_peak_bytes is not None
    assert pieces.profiling_peak_bytes <= capacity < whole.profiling_peak_bytes


def test_a_capacity_below_every_plan_is_refused_naming_the_fix() -> None:
    whole = _profile("gpt", **GPT)
    with pytest.raises(torch.OutOfMemoryError, match="Fix: a smaller batch"):
        _profile("gpt", whole.full_peak_bytes // 2, **GPT)


def test_cli_plan_under_a_capacity_fits_when_measured(capsys: pytest.CaptureFixture[str]) -> None:
    """The must-show: ``remat plan gpt --capacity <70% of the unplanned peak> --budget 60%``."""
    whole = _profile("gpt", **GPT)
    capacity = int(whole.peak_bytes * 0.7)
    sizes = [f"{k}={v}" for k, v in GPT.items() if k not in ("seq", "batch")]
    argv = ["plan", "gpt", "--seq", str(GPT["seq"]), "--batch", str(GPT["batch"]), "--set", *sizes]
    code = main([*argv, "--capacity", str(capacity), "--budget", "60%", "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["capacity_bytes"] == capacity
    assert report["unplanned_peak_bytes"] == whole.peak_bytes  # predicted from the windows
    assert report["measured_peak_bytes"] <= report["budget_bytes"] <= capacity
    # the plan on the same model (the CLI's seed, 0), measured outside remat's closed loop
    torch.manual_seed(0)
    built = build_builtin("gpt", **GPT)
    with remat.apply_(built.model, remat.Plan(actions=report["plan"]["actions"])):
        peak = oracle_step_peak(built.model, built.example_inputs, loss_fn=built.loss_fn)
    assert peak <= report["budget_bytes"]
    assert report["profiling_peak_bytes"] <= capacity
    with pytest.raises(SystemExit) as usage:
        main([*argv, "--capacity", "lots", "--budget", "60%"])
    assert usage.value.code == 2 and "--capacity: size: got 'lots'" in capsys.readouterr().err


def test_auto_under_a_capacity_profiles_in_windows_and_plans_within_it() -> None:
    built = build_builtin("gpt", **GPT)
    whole = _profile("gpt", **GPT)
    capacity = int(whole.peak_bytes * 0.7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = remat.auto_(
            built.model,
            built.example_inputs,
            budget="100%",  # the unplanned peak: over the capacity, so lowered to it
            loss_fn=built.loss_fn,
            actions=["keep", "recompute"],
            capacity_bytes=capacity,
        )
    try:
        assert handle.result.budget_bytes == capacity
        assert handle.result.measured_peak_bytes <= capacity
    finally:
        handle.remove()
