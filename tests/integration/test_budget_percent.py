"""Percent budgets on real steps (issue 14, item 3): ``P%`` runs from the least peak any plan
reaches (0%) to the unplanned peak (100%), so every percentage has a plan that fits when measured.
"""

from __future__ import annotations

import types
from typing import Any

import pytest
import torch

import remat
import remat.auto
from memory_oracle import oracle_step_peak, step_peak
from remat.auto import solve_measured
from remat.models import build_builtin
from remat.profiling.step import measure_step
from remat.solve.solver import INFEASIBLE


def test_fifty_percent_fits_a_small_bert_where_the_old_meaning_had_no_plan() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        use_cache=False,
    )
    model = transformers.BertForMaskedLM(config).train()
    ids = torch.randint(0, 64, (2, 16))
    batch = {"input_ids": ids, "labels": ids}

    def loss_fn(out: Any) -> torch.Tensor:
        return out.loss

    prof = remat.profile(model, batch, loss_fn=loss_fn, repeats=0, options=[])
    result = remat.solve(prof, "50%")
    least = result.min_peak_bytes
    assert result.budget_bytes == least + (prof.peak_bytes - least) // 2
    assert result.fits
    # The old meaning, static + 50% of (peak - static), is below the least peak: gradients alive
    # at the backward peak counted as activation memory no plan frees.
    old = prof.static_bytes + (prof.peak_bytes - prof.static_bytes) // 2
    assert remat.solve(prof, old).status == INFEASIBLE
    with remat.apply_(model, result.plan):
        measured = oracle_step_peak(model, batch, loss_fn=loss_fn)  # outside remat
    assert measured <= result.budget_bytes


@pytest.fixture(scope="module")
def gpt() -> tuple[remat.models.BuiltModel, remat.Profile]:
    torch.manual_seed(0)
    built = build_builtin("gpt", n_layer=4, d_model=64, n_head=4, seq=64, batch=4, vocab=256)
    prof = remat.profile(
        built.model, built.example_inputs, loss_fn=built.loss_fn, repeats=0, options=[]
    )
    return built, prof


@pytest.mark.slow
def test_a_percent_is_met_when_the_least_plan_measures_above_its_prediction(
    gpt: tuple[remat.models.BuiltModel, remat.Profile], monkeypatch: pytest.MonkeyPatch
) -> None:
    built, prof = gpt
    predicted_least = remat.solve(prof, "min").min_peak_bytes
    span = prof.peak_bytes - predicted_least
    offset = span // 4
    real = measure_step

    def measured_high(*args: Any, **kwargs: Any) -> Any:
        # Every plan measures `offset` bytes above what the simulator predicts for it.
        return types.SimpleNamespace(peak_bytes=real(*args, **kwargs).peak_bytes + offset)

    monkeypatch.setattr(remat.auto, "measure_step", measured_high)

    step = remat.Step(built.model, built.example_inputs, loss_fn=built.loss_fn)

    def run(budget: str | int) -> remat.SolveResult:
        return solve_measured(step, prof, budget)

    # A size stays a size: the predicted least peak in bytes has no plan that fits it measured.
    assert run(predicted_least).status == INFEASIBLE
    least = run("min").measured_peak_bytes
    assert least is not None and least > predicted_least
    for percent in (0, 10):
        result = run(f"{percent}%")
        assert result.status != INFEASIBLE, result.notes
        # Resolved again from the least measured peak, and met.
        assert result.budget_bytes == least + (prof.peak_bytes - least) * percent // 100
        assert result.measured_peak_bytes is not None
        assert result.measured_peak_bytes <= result.budget_bytes
        # the offset is made up: the oracle's bytes plus it must fit too
        assert step_peak(step, result.plan) + offset <= result.budget_bytes
        assert any("least measured peak" in note for note in result.notes), result.notes
    # Where a plan fits the percent resolved from the predicted least peak, that is the budget.
    half = run("50%")
    assert half.budget_bytes == predicted_least + span // 2
    assert half.measured_peak_bytes is not None
    assert half.measured_peak_bytes <= half.budget_bytes
    assert step_peak(step, half.plan) + offset <= half.budget_bytes
    assert not any("least measured peak" in note for note in half.notes), half.notes
