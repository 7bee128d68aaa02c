"""Gradient accumulation (issue 15, item 4): micro-batches after the first run their forward and
backward with the gradients alive, so the accumulated step's peak is above one step's, and plans
are made and measured for it.

Oracle: a plain accumulation loop written as users write it (AdamW, its state alive from a step
before, N micro-batches, then the optimizer step), its peak read by the tracker over all of it.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

import remat
from memory_oracle import StorageOracle
from remat.cli.main import main
from remat.models.gpt import GPT
from remat.plan import Plan
from remat.profiling.step import measure_step

SEQ = 32


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab=64, max_seq=SEQ, n_layer=3, d_model=32, n_head=4)


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, SEQ), generator=torch.Generator().manual_seed(seed))


def _loop_peak(model: GPT, micro_batches: int, plan: Plan | None = None) -> int:
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(_ids(0)).float().mean().backward()
    opt.step()  # the state exists, as in any step but the first
    opt.zero_grad(set_to_none=True)
    handle = remat.apply_(model, plan) if plan is not None else None
    with StorageOracle([model, opt]) as tracker:  # the independent oracle, not remat's tracker
        for k in range(micro_batches):
            logits = model(_ids(k))
            loss = logits.float().mean() / micro_batches
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if handle is not None:
        handle.remove()
    return tracker.peak_bytes


@pytest.mark.parametrize("micro_batches", [1, 4])
def test_the_measured_step_is_the_accumulated_loops_peak(micro_batches: int) -> None:
    model = _model()
    measured = measure_step(model, (_ids(0),), accumulation_steps=micro_batches).peak_bytes
    assert measured == _loop_peak(model, micro_batches)


def test_a_plan_for_accumulation_fits_the_accumulated_loop() -> None:
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = remat.auto_(
            model, (_ids(0),), budget="50%", actions=["keep", "recompute"], accumulation_steps=4
        )
    plan = handle.plan
    handle.remove()
    result = handle.result
    assert result.measured_peak_bytes == _loop_peak(model, 4, plan)
    assert result.iterations == 1  # the first plan fit when measured
    assert result.measured_peak_bytes <= result.budget_bytes  # and it is the loop's, above
    # one step's peak under the same plan is lower: the gradients were missing from it
    assert measure_step(model, (_ids(0),), optimizer="adamw").peak_bytes < _loop_peak(model, 4)


def test_cli_accumulate(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["plan", "gpt", "--set", "n_layer=3", "d_model=32", "n_head=4", "vocab=64"]
    argv += ["--seq", str(SEQ), "--batch", "2", "--strategy", "none", "--json"]
    peaks = {}
    for n in (1, 4):
        assert main([*argv, "--accumulate", str(n)]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["accumulation_steps"] == n
        peaks[n] = report["measured_peak_bytes"]
        assert report["predicted_peak_bytes"] == peaks[n]
    assert peaks[4] > peaks[1]
    with pytest.raises(SystemExit) as usage:
        main([*argv, "--accumulate", "0"])
    assert usage.value.code == 2


def test_the_profile_records_accumulation_and_plans_for_it() -> None:
    model = _model()
    one = remat.profile(model, (_ids(0),), options=(), repeats=0)
    four = remat.profile(model, (_ids(0),), options=(), repeats=0, accumulation_steps=4)
    assert (one.accumulation_steps, four.accumulation_steps) == (1, 4)
    assert four.peak_bytes == _loop_peak(model, 4) > one.peak_bytes
    with pytest.raises(ValueError, match="accumulation_steps: got 0"):
        remat.profile(model, (_ids(0),), options=(), repeats=0, accumulation_steps=0)
