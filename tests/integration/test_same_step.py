"""``bench``, ``verify`` and ``plan`` report the peak of the same step (issue 15, item 7): one
training step with the optimizer's step and state, so their numbers compare to the byte.

Oracle: a plain loop of that step (AdamW built by hand, its state made by its own first step),
its peak read by the tracker; bench's rows and verify's report against it.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import remat
from remat.models.gpt import GPT
from remat.plan import Plan
from remat.profiling.tracker import track_memory


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab=64, max_seq=16, n_layer=3, d_model=32, n_head=4)


def _plain_loop_peak(model: GPT, ids: torch.Tensor, plan: Plan | None) -> int:
    """The step as a user writes it, on a copy: AdamW, its state alive (a step already taken)."""
    model = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(ids).float().mean().backward()
    opt.step()  # the state exists, as in any step but the first
    model.zero_grad(set_to_none=True)
    handle = remat.apply_(model, plan) if plan is not None else None
    with track_memory(model, ids, opt) as tracker:
        logits = model(ids)  # held through backward, as `out = model(x)` in a user's loop
        loss = logits.float().mean()
        loss.backward()
        opt.step()
    if handle is not None:
        handle.remove()
    return tracker.report().peak_bytes


@pytest.mark.parametrize("strategy", ["sqrt_n"])
def test_bench_and_verify_report_the_peak_of_the_same_step(strategy: str) -> None:
    model = _model()
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = remat.bench(model, (ids,), strategies=[strategy], budgets=[], steps=1)
    rows = {row.strategy: row for row in result.results}
    plan = Plan(actions=rows[strategy].plan, units=list(rows[strategy].plan))
    report = remat.verify(model, plan, (ids,))
    assert report.unplanned_peak_bytes == rows["none"].peak_bytes
    assert report.measured_peak_bytes == rows[strategy].peak_bytes
    assert rows["none"].peak_bytes == _plain_loop_peak(model, ids, None)
    assert rows[strategy].peak_bytes == _plain_loop_peak(model, ids, plan)
    assert rows[strategy].peak_bytes < rows["none"].peak_bytes
