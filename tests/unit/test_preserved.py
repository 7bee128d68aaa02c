"""Profiling does not train the model, and holds no copy of its parameters to make sure of it
(issue 15 item 5): inside ``preserved_state`` the optimizers profiling makes step with learning
rate 0, which moves no parameter of torch's optimizers, so only buffers are copied.

Oracle: the parameters' bits before and after (a ``-0.0`` kept as ``-0.0``), and the bytes the
context says it holds against a hand count.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import remat
from remat.profiling.step import (
    LR_EXACT,
    make_optimizer,
    preserved_state,
    training_step,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        model[0].weight[0, 0] = -0.0  # a step with lr 0 may flip its sign: it must be kept
    return model


def _bits(model: nn.Module) -> list[torch.Tensor]:
    return [
        t.detach().clone().view(torch.int32)
        for t in model.state_dict().values()
        if t.is_floating_point()
    ]


def _steps(model: nn.Module, spec: object) -> int:
    with preserved_state(model, spec) as kept:
        opt = make_optimizer(spec, model)
        for _ in range(2):
            training_step(model, (torch.randn(4, 8),), optimizer=opt)
    return kept.held_bytes


BUFFER_BYTES = 16 * 4 * 2 + 8  # BatchNorm's running mean and variance, and its counter


@pytest.mark.parametrize("cls", LR_EXACT, ids=lambda c: c.__name__)
def test_lr_exact_optimizers_move_no_parameter_and_copy_none(cls: type) -> None:
    model = _model()
    before = _bits(model)
    mine = (
        cls(model.parameters(), weight_decay=0.1)
        if cls is not torch.optim.ASGD
        else cls(model.parameters())
    )
    state = copy.deepcopy(mine.state_dict())
    held = _steps(model, mine)
    assert all(torch.equal(a, b) for a, b in zip(before, _bits(model), strict=True))
    # the buffers, and only the parameter with a negative zero (16 x 8 floats)
    assert held == BUFFER_BYTES + 16 * 8 * 4
    assert repr(mine.state_dict()) == repr(state)  # the user's optimizer untouched


@pytest.mark.parametrize(
    "spec",
    [lambda params: torch.optim.Rprop(params), "factory-adam"],
    ids=["Rprop", "factory"],
)
def test_other_optimizers_are_undone_from_copies(spec: object) -> None:
    model = _model()
    if spec == "factory-adam":
        spec = lambda params: torch.optim.Adam(params, lr=0.1)  # noqa: E731
    elif callable(spec):
        spec = spec(model.parameters())  # an Rprop instance: its steps ignore lr
    before = _bits(model)
    held = _steps(model, spec)
    assert all(torch.equal(a, b) for a, b in zip(before, _bits(model), strict=True))
    params_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert held == BUFFER_BYTES + params_bytes


def test_profiling_holds_no_more_than_the_step_it_profiles() -> None:
    """Before, a copy of every parameter was held beside each tracked step."""
    model = nn.Sequential(*[nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(4)])
    prof = remat.profile(model, (torch.randn(8, 64),), options=(), repeats=0)
    assert prof.profiling_peak_bytes == prof.peak_bytes  # nothing beside the tracked steps


def test_a_different_optimizer_inside_is_an_error() -> None:
    model = _model()
    with preserved_state(model, "adamw"), pytest.raises(RuntimeError, match="holds still"):
        make_optimizer(torch.optim.Rprop(model.parameters()), model)


def test_a_transformers_bert_profile_holds_at_most_its_step_plus_ten_percent() -> None:
    """The issue's case at a small size: BertForMaskedLM in train mode, labels in a dict batch,
    the default profile (every option, timed rounds)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config).train()
    ids = torch.randint(0, 128, (2, 32))
    prof = remat.profile(model, {"input_ids": ids, "labels": ids}, repeats=1)
    assert prof.profiling_peak_bytes is not None
    assert prof.profiling_peak_bytes <= 1.1 * prof.peak_bytes
