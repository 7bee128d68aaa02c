"""Long runs: 200 training steps with a plan are bitwise the 200 steps without it, and live memory
does not grow from step to step.

Two small built-ins, a GPT with dropout (AdamW) and a ResNet-style CNN with BatchNorm (SGD with
momentum), train for 200 steps under one ``remat.track_memory`` each: without a plan, with every unit
recomputed (``full``) and with all units in one segment. Every step's loss, and the parameters and
buffers at the end, must be equal to the unplanned run's; the tracker's live bytes at the end of step
200 must equal those at the end of step 2, once the optimizer state exists.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import pytest
import torch

import remat
from remat.models import build_builtin
from remat.profiling.step import make_optimizer, training_step

STEPS = 200
BUILD_SEED = 0
MODELS: dict[str, dict[str, Any]] = {
    "gpt": {"n_layer": 2, "d_model": 32, "n_head": 2, "seq": 16, "batch": 2, "vocab": 64},
    "cnn": {"batch": 4, "image_size": 8, "channels": (4, 8), "blocks_per_stage": 1},
}
PLANS = ("none", "full", "segment")


@dataclass(frozen=True)
class Run:
    losses: list[float]
    """The loss of every step (a Python float holds a float32 exactly)."""
    live_bytes: list[int]
    """``tracker.current_bytes`` at the end of every step."""
    parameters: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]
    units: list[str]
    checkpointed: list[str]


def make_plan(kind: str, units: list[str]) -> remat.Plan | None:
    if kind == "none":
        return None
    if kind == "full":
        return remat.Plan(actions={"_default": "recompute"}, units=units, strategy="full")
    return remat.Plan(actions={"_default": "segment:all"}, units=units)


@functools.cache
def train(model_name: str, plan_kind: str) -> Run:
    torch.manual_seed(BUILD_SEED)
    overrides = dict(MODELS[model_name])
    if model_name == "gpt":
        overrides["dropout"] = 0.1
    built = build_builtin(model_name, **overrides)
    model = built.model
    if model_name == "gpt":
        optimizer = make_optimizer("adamw", model)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    units = remat.find_units(model)
    plan = make_plan(plan_kind, units)
    handle = remat.apply_(model, plan) if plan is not None else None
    losses: list[float] = []
    live: list[int] = []
    with remat.track_memory(model, optimizer) as tracker:
        for step in range(STEPS):
            torch.manual_seed(1000 + step)
            loss = training_step(
                model, built.example_inputs, loss_fn=built.loss_fn, optimizer=optimizer
            )
            losses.append(loss.item())
            del loss
            live.append(tracker.current_bytes)
    checkpointed = handle.checkpointed if handle is not None else []
    if handle is not None:
        handle.remove()
    return Run(
        losses=losses,
        live_bytes=live,
        parameters={n: p.detach().clone() for n, p in model.named_parameters()},
        buffers={n: b.detach().clone() for n, b in model.named_buffers()},
        units=units,
        checkpointed=checkpointed,
    )


@pytest.mark.slow
@pytest.mark.parametrize("plan_kind", ["full", "segment"])
@pytest.mark.parametrize("model_name", list(MODELS))
def test_planned_run_is_bitwise_the_unplanned_run(model_name: str, plan_kind: str) -> None:
    planned, reference = train(model_name, plan_kind), train(model_name, "none")
    assert planned.checkpointed == planned.units and len(planned.units) >= 2
    assert len(planned.losses) == STEPS
    differ = [
        s + 1
        for s, (a, b) in enumerate(zip(planned.losses, reference.losses, strict=True))
        if a != b
    ]
    assert not differ, f"losses differ from step {differ[0]} on ({len(differ)} steps)"
    assert len(set(reference.losses)) > STEPS // 2  # it trains: the loss changes
    for name, value in reference.parameters.items():
        assert torch.equal(planned.parameters[name], value), f"parameter {name} differs"
    for name, value in reference.buffers.items():
        assert torch.equal(planned.buffers[name], value), f"buffer {name} differs"


@pytest.mark.slow
@pytest.mark.parametrize("plan_kind", PLANS)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_live_memory_does_not_grow(model_name: str, plan_kind: str) -> None:
    live = train(model_name, plan_kind).live_bytes
    assert live[STEPS - 1] == live[1], (
        f"live bytes: {live[1]} after step 2, {live[-1]} after {STEPS}"
    )
    grew = [s + 1 for s in range(1, STEPS) if live[s] != live[1]]
    assert not grew, f"live bytes change after steps {grew[:10]}: {sorted(set(live[1:]))}"
