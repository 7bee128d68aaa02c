"""Property test of ``remat.apply_``: on random architectures with random plans, a planned training
step is bitwise the unplanned one.

Architectures are chains of blocks (Linear, optional LayerNorm or BatchNorm1d, an activation,
dropout), with optional skip connections between non-adjacent blocks, or trees (two branches of
blocks run on the same input and summed, between an optional stem and tail). Plans give each unit
``keep``, ``recompute``, or a ``segment:<label>`` / ``nested:<label>`` covering a run of consecutive
units. Loss, every gradient, every buffer (BatchNorm running statistics) and, after optimizer steps,
every parameter must be ``torch.equal`` to those of a deep copy trained without the plan from the
same seeds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import remat
from remat.profiling.step import training_step

BUILD_SEED = 1234
NORMS = ("none", "layernorm", "batchnorm")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


# --------------------------------------------------------------------------------- the models
@dataclass(frozen=True)
class BlockSpec:
    norm: str
    activation: str
    dropout: float


class Block(nn.Module):
    """``dropout(act(norm(linear(x))))`` on (batch, width) inputs."""

    def __init__(self, width: int, spec: BlockSpec) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm: nn.Module | None = None
        if spec.norm == "layernorm":
            self.norm = nn.LayerNorm(width)
        elif spec.norm == "batchnorm":
            self.norm = nn.BatchNorm1d(width)
        self.act = ACTIVATIONS[spec.activation]()
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        if self.norm is not None:
            h = self.norm(h)
        return self.drop(self.act(h))


class Chain(nn.Module):
    """Blocks in a row; ``skips`` (i, j) add the output of block i to the input of block j > i+1."""

    def __init__(self, width: int, specs: list[BlockSpec], skips: list[tuple[int, int]]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, spec) for spec in specs)
        self.skips = skips

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs: list[torch.Tensor] = []
        h = x
        for j, block in enumerate(self.blocks):
            for i, target in self.skips:
                if target == j:
                    h = h + outputs[i]
            h = block(h)
            outputs.append(h)
        return h


class Tree(nn.Module):
    """``tail(left(stem(x)) + right(stem(x)))``; the stem and the tail may be empty."""

    def __init__(
        self,
        width: int,
        stem: list[BlockSpec],
        left: list[BlockSpec],
        right: list[BlockSpec],
        tail: list[BlockSpec],
    ) -> None:
        super().__init__()
        self.stem = nn.ModuleList(Block(width, spec) for spec in stem)
        self.left = nn.ModuleList(Block(width, spec) for spec in left)
        self.right = nn.ModuleList(Block(width, spec) for spec in right)
        self.tail = nn.ModuleList(Block(width, spec) for spec in tail)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.stem:
            x = block(x)
        a = b = x
        for block in self.left:
            a = block(a)
        for block in self.right:
            b = block(b)
        h = a + b
        for block in self.tail:
            h = block(h)
        return h


@dataclass(frozen=True)
class Case:
    """One drawn example: how to build the model, its input, the plan and the training."""

    kind: str
    width: int
    batch: int
    specs: dict[str, list[BlockSpec]]
    skips: list[tuple[int, int]]
    units_mode: str
    actions: list[str]
    """Per unit, in execution order."""
    train: bool
    input_grad: bool
    steps: int
    momentum: float

    def build(self) -> nn.Module:
        if self.kind == "chain":
            return Chain(self.width, self.specs["blocks"], self.skips)
        return Tree(
            self.width, *(self.specs.get(part, []) for part in ("stem", "left", "right", "tail"))
        )

    def unit_fqns(self) -> list[str]:
        """Block FQNs in execution order (registration order too)."""
        return [f"{part}.{i}" for part, specs in self.specs.items() for i in range(len(specs))]


block_specs = st.builds(
    BlockSpec,
    norm=st.sampled_from(NORMS),
    activation=st.sampled_from(sorted(ACTIVATIONS)),
    dropout=st.sampled_from((0.0, 0.2)),
)


@st.composite
def plan_actions(draw: st.DrawFn, count: int) -> list[str]:
    """Per unit an action: runs of consecutive units share keep, recompute, or one group label."""
    actions: list[str] = []
    run = 0
    while len(actions) < count:
        length = draw(st.integers(1, count - len(actions)))
        kind = draw(st.sampled_from(("keep", "recompute", "segment", "nested")))
        if kind in ("segment", "nested"):
            stem = draw(st.sampled_from(("s", "seg", "g-1", "a.b", "X_")))
            actions += [f"{kind}:{stem}{run}"] * length
        else:
            actions += [kind] * length
        run += 1
    return actions


@st.composite
def cases(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(("chain", "tree")))
    if kind == "chain":
        n = draw(st.integers(2, 6))
        specs = {"blocks": draw(st.lists(block_specs, min_size=n, max_size=n))}
        candidates = [(i, j) for i in range(n) for j in range(i + 2, n)]
        skips = (
            draw(st.lists(st.sampled_from(candidates), unique=True, max_size=3))
            if candidates
            else []
        )
    else:
        specs = {
            "stem": draw(st.lists(block_specs, max_size=1)),
            "left": draw(st.lists(block_specs, min_size=1, max_size=2)),
            "right": draw(st.lists(block_specs, min_size=1, max_size=2)),
            "tail": draw(st.lists(block_specs, max_size=1)),
        }
        specs = {part: blocks for part, blocks in specs.items() if blocks}
        skips = []
    count = sum(len(blocks) for blocks in specs.values())
    steps = draw(st.sampled_from((1, 2)))
    return Case(
        kind=kind,
        width=draw(st.integers(4, 16)),
        batch=draw(st.integers(4, 8)),
        specs=specs,
        skips=skips,
        units_mode=draw(st.sampled_from(("explicit", "found", "none"))),
        actions=draw(plan_actions(count)),
        train=draw(st.sampled_from((True, True, True, False))),  # mostly training mode
        input_grad=draw(st.booleans()),
        steps=steps,
        momentum=draw(st.sampled_from((0.0, 0.9))),
    )


# ------------------------------------------------------------------------------------ helpers
def loss_fn(output: torch.Tensor) -> torch.Tensor:
    return output.square().mean()


def snapshot(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "input_grad": None if x.grad is None else x.grad.clone(),
    }


def assert_equal_states(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    for group in ("params", "grads", "buffers"):
        assert list(got[group]) == list(want[group]), f"{where}: {group} names differ"
        for name, value in want[group].items():
            other = got[group][name]
            if value is None or other is None:
                assert value is other, f"{where}: {group} {name}: {other} vs {value}"
            else:
                assert torch.equal(other, value), f"{where}: {group} {name} differ"
    want_x, got_x = want["input_grad"], got["input_grad"]
    assert (want_x is None) == (got_x is None), f"{where}: input gradient presence differs"
    if want_x is not None:
        assert torch.equal(got_x, want_x), f"{where}: input gradients differ"


def make_plan(case: Case, model: nn.Module) -> remat.Plan:
    fqns = case.unit_fqns()
    actions = dict(zip(fqns, case.actions, strict=True))
    if case.units_mode == "explicit":
        units: list[str] | None = fqns
    elif case.units_mode == "found":
        units = remat.find_units(model)
    else:
        units = None  # apply_ finds them
    if case.units_mode != "explicit":
        assert remat.find_units(model) == fqns  # every Block, in execution order
    return remat.Plan(actions=actions, units=units)


def run(case: Case, model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, dict]]:
    """``case.steps`` training steps; the loss and a snapshot after each."""
    model.train(case.train)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=case.momentum)
    history = []
    for step in range(case.steps):
        x.grad = None
        torch.manual_seed(100 + step)
        loss = training_step(model, (x,), loss_fn=loss_fn, optimizer=optimizer)
        history.append((loss, snapshot(model, x)))
    return history


# ----------------------------------------------------------------------------------- property
@settings(
    derandomize=True,
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(case=cases())
def test_planned_step_is_bitwise_the_unplanned_one(case: Case) -> None:
    torch.manual_seed(BUILD_SEED)
    model = case.build()
    x = torch.randn(case.batch, case.width)
    reference = copy.deepcopy(model)
    x_ref = x.clone().requires_grad_(case.input_grad)
    x.requires_grad_(case.input_grad)

    handle = remat.apply_(model, make_plan(case, model))
    assert handle.units == case.unit_fqns()
    assert handle.checkpointed == [
        fqn for fqn, action in zip(case.unit_fqns(), case.actions, strict=True) if action != "keep"
    ]

    got = run(case, model, x)
    want = run(case, reference, x_ref)
    for step, ((loss, state), (loss_ref, state_ref)) in enumerate(zip(got, want, strict=True)):
        where = f"step {step + 1} of {case}"
        assert torch.equal(loss, loss_ref), f"{where}: loss {loss.item()} vs {loss_ref.item()}"
        assert_equal_states(state, state_ref, where)

    handle.remove()
    assert all("forward" not in m.__dict__ for m in model.modules())
