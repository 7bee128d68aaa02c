"""Variable shapes: a plan knows the batch it was made for, and a larger batch under it is warned
about once with its predicted peak (issue 15, item 8).

Oracle: the peak of the larger batch's step under the same plan, measured by the tracker.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import remat
from remat.apply.shapes import scaled_peak_bytes
from remat.models.gpt import GPT
from remat.plan import Plan
from remat.profiling.step import measure_step
from remat.units import format_bytes

SEQ = 32


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(vocab=128, max_seq=SEQ, n_layer=4, d_model=32, n_head=4)


def _ids(batch: int) -> torch.Tensor:
    return torch.randint(0, 128, (batch, SEQ), generator=torch.Generator().manual_seed(batch))


@pytest.fixture(scope="module")
def planned() -> tuple[GPT, remat.Handle]:
    model = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = remat.auto_(model, (_ids(2),), budget="50%", actions=["keep", "recompute"])
    yield model, handle
    handle.remove()


def _forwards(model: GPT, *batches: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(_ids(batch)).float().mean().backward()
    return [str(w.message) for w in caught if "remat: this batch" in str(w.message)]


def test_the_plan_records_the_batch_it_was_made_for(planned: tuple[GPT, remat.Handle]) -> None:
    _, handle = planned
    assert handle.plan.input_shapes == [[2, SEQ]]
    assert handle.plan.base_bytes is not None and 0 < handle.plan.base_bytes
    back = Plan.from_json(handle.plan.to_json())
    assert back.input_shapes == [[2, SEQ]] and back.base_bytes == handle.plan.base_bytes


def test_a_larger_batch_is_warned_about_once_with_its_predicted_peak(
    planned: tuple[GPT, remat.Handle],
) -> None:
    model, handle = planned
    assert _forwards(model, 2, 1) == []  # the planned batch, and a smaller one: nothing said
    with torch.no_grad():
        assert _forwards_no_grad(model, 8) == []  # evaluation is not the planned step
    messages = _forwards(model, 4, 4, 8)
    assert len(messages) == 1, messages
    message = messages[0]
    assert "[[4, 32]]" in message and "2.00x" in message and "[[2, 32]]" in message
    assert "plan on the largest batch" in message
    predicted = scaled_peak_bytes(handle.plan.predicted_peak_bytes, handle.plan.base_bytes, 2.0)
    assert format_bytes(predicted) in message
    # The prediction against the step of batch 4 measured under the same plan.
    model.zero_grad(set_to_none=True)  # no gradients of the forwards above alive in it
    measured = measure_step(model, (_ids(4),)).peak_bytes
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


def _forwards_no_grad(model: GPT, batch: int) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(_ids(batch))
    return [str(w.message) for w in caught if "remat: this batch" in str(w.message)]


def test_remove_stops_watching_and_plans_without_a_batch_say_nothing() -> None:
    model = _model()
    plan = Plan(actions={"_default": "recompute"}, input_shapes=[[2, SEQ]])
    handle = remat.apply_(model, plan)
    handle.remove()
    assert _forwards(model, 8) == []
    with remat.apply_(model, Plan(actions={"_default": "recompute"})):  # knows no batch
        assert _forwards(model, 8) == []


class _WithItemCount(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gpt = _model()

    def forward(self, ids: torch.Tensor, num_items_in_batch: torch.Tensor) -> torch.Tensor:
        return self.gpt(ids)


def test_a_zero_dim_tensor_beside_the_batch_is_not_a_larger_batch() -> None:
    # Hugging Face's Trainer passes num_items_in_batch, a 0-dim tensor, beside the batch.
    model = _WithItemCount()
    plan = Plan(actions={"_default": "recompute"}, input_shapes=[[2, SEQ]])
    with remat.apply_(model, plan), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(_ids(2), num_items_in_batch=torch.tensor(2 * SEQ))
        silent = [str(w.message) for w in caught if "remat: this batch" in str(w.message)]
        model(_ids(3), num_items_in_batch=torch.tensor(3 * SEQ))  # a larger batch still is
    said = [str(w.message) for w in caught if "remat: this batch" in str(w.message)]
    assert silent == [] and len(said) == 1
