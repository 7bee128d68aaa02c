"""Property tests that search (issue 17 item 3): random models under random plans of every action,
each case checked bitwise against the unplanned step and by the independent memory oracle against
the simulator's prediction.

Models: chains of up to 16 blocks with skips between non-adjacent blocks (a DAG), each block one of
Linear + norm (none, LayerNorm, BatchNorm1d) + activation (an in-place ReLU among them) + dropout,
a Linear whose output is changed in place, or a parameter-only block (scale and shift, no matmul).
Width 8 to 16, batch 2 to 4, float32 or bf16 autocast.

Plans: per unit keep, recompute, selective (megatron, save_matmuls), offload, or a run of
consecutive units in one segment or nested segment; plans that checkpoint nothing are not drawn.

Each model is profiled once (with the selective and offload options) and then takes
``PLANS_PER_MODEL`` plans; each plan is one case:

- the planned step's loss, gradients and buffers (BatchNorm statistics) are ``torch.equal`` to the
  unplanned step's from the same state and seed;
- its peak by tests/memory_oracle.py is remat's tracker's (``remat.measure_plan``, taken on
  every fifth plan and on every plan with offload) to the byte, except with offload: on the CPU an
  offloaded activation's host copy is in the same memory, which the oracle counts and the tracker
  counts apart (remat plans device memory);
- the simulator's prediction is never more than ``TOLERANCE`` (0.2%) under that measured peak (the
  oracle's; the tracker's device bytes with offload), and never more than ``TOLERANCE`` over it for
  plans of single-unit actions (keep, recompute, selective, offload), ``COMPOSED_BOUND`` (2.7%) over
  it for plans with segments or nested segments.

The composed bound is measured, not exact. Searches that collect every plan's miss
(tests/integration/collect_property_misses.py: this module's cases, no bitwise checks), after the
last simulator change: ``--seed -1 --models 100`` (its derandomized draws: 2,000 plans, 1,629
composed) and ``--seed 1``, ``2``, ``3`` ``--models 60`` (983, 971, 921 composed) find
154, 111, 38 and 107 composed plans over by more than 0.2%, at most 1.07%, 2.64%, 2.06%, 1.40%:
mostly nested segments, under bf16 autocast, beside offload or selective blocks; the largest (seed
1), a segment whose first unit follows a kept unit that holds its input, is counted as holding its
checkpoint's frame through that unit's whole backward where under autocast it dies earlier. Under
by more than 0.2%: 5, 0, 1 and 30 plans, all but 15 of them (at most 0.32% under) with offloaded
units beside segments, at most 2.56% under (a nested segment after a selective block, then
offload); causes not found (they predate the last changes), so a search that large fails. One 1.08%
under-prediction is pinned as a strict xfail (``test_composed_under_prediction_known``);
``test_composed_misprediction_reproducer`` keeps the misses fixed so far within 0.2%.
docs/memory-model.md says what the simulator counts.

CI runs ``MODELS`` x ``PLANS_PER_MODEL`` derandomized cases (25 x 20 = 500; 25-40 s on one
thread of the quiet 2-core machine, minutes when it is shared). To search more:
``REMAT_PROPERTY_SEED=random`` (hypothesis's own unseeded draws) or an integer seed, with
``REMAT_PROPERTY_MODELS=200``, e.g.
``REMAT_PROPERTY_SEED=random REMAT_PROPERTY_MODELS=200 pytest tests/integration/test_properties_search.py``.
Shrinking is off (a model case takes minutes to shrink); a failure prints the whole case.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from torch import nn

import remat
from memory_oracle import oracle_step_peak

MODELS = int(os.environ.get("REMAT_PROPERTY_MODELS", "25"))
PLANS_PER_MODEL = 20
TOLERANCE = 0.002
COMPOSED_BOUND = 0.027
SEED = os.environ.get("REMAT_PROPERTY_SEED")
OPTIONS = ["selective:save_matmuls", "selective:megatron", "offload"]
KINDS = ("linear", "inplace", "params")
NORMS = ("none", "layernorm", "batchnorm")
ACTIVATIONS = ("relu", "relu_inplace", "gelu", "tanh")


@dataclass(frozen=True)
class BlockSpec:
    kind: str
    norm: str
    activation: str
    dropout: float


class Block(nn.Module):
    def __init__(self, width: int, spec: BlockSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.kind == "params":  # parameters only: no op that autograd-saved selective keeps
            self.scale = nn.Parameter(torch.randn(width) * 0.5 + 1.0)
            self.shift = nn.Parameter(torch.randn(width) * 0.1)
            return
        self.linear = nn.Linear(width, width)
        self.norm = {
            "none": nn.Identity,
            "layernorm": lambda: nn.LayerNorm(width),
            "batchnorm": lambda: nn.BatchNorm1d(width),
        }[spec.norm]()
        self.act = {
            "relu": nn.ReLU,
            "relu_inplace": lambda: nn.ReLU(inplace=True),
            "gelu": nn.GELU,
            "tanh": nn.Tanh,
        }[spec.activation]()
        self.drop = nn.Dropout(spec.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.kind == "params":
            return torch.tanh(x * self.scale + self.shift)
        h = self.linear(x)
        if self.spec.kind == "inplace":
            h.mul_(0.5)  # the matmul's own output, changed in place before anything saves it
        return self.drop(self.act(self.norm(h)))


class Chain(nn.Module):
    """Blocks in a row; ``skips`` (i, j) add block i's output to block j's input (j > i + 1)."""

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


@dataclass(frozen=True)
class ModelCase:
    width: int
    batch: int
    specs: list[BlockSpec]
    skips: list[tuple[int, int]]
    precision: str
    plans: list[list[str]]
    """Per plan, per unit, an action."""


block_specs = st.builds(
    BlockSpec,
    kind=st.sampled_from(KINDS),
    norm=st.sampled_from(NORMS),
    activation=st.sampled_from(ACTIVATIONS),
    dropout=st.sampled_from((0.0, 0.25)),
)
SINGLE = ("keep", "recompute", "selective:megatron", "selective:save_matmuls", "offload")


@st.composite
def plan_actions(draw: st.DrawFn, count: int) -> list[str]:
    """Per unit an action; runs of consecutive units may share a segment or a nested segment.
    At least one unit is not kept."""
    actions: list[str] = []
    while len(actions) < count:
        kind = draw(st.sampled_from((*SINGLE, "keep", "recompute", "segment", "nested")))
        if kind in ("segment", "nested"):
            length = draw(st.integers(1, min(4, count - len(actions))))
            actions += [f"{kind}:g{len(actions)}"] * length
        else:
            actions.append(kind)
    if all(action == "keep" for action in actions):
        actions[draw(st.integers(0, count - 1))] = draw(st.sampled_from(SINGLE[1:]))
    return actions


@st.composite
def model_cases(draw: st.DrawFn) -> ModelCase:
    n = draw(st.integers(2, 16))
    candidates = [(i, j) for i in range(n) for j in range(i + 2, n)]
    skips = (
        draw(st.lists(st.sampled_from(candidates), unique=True, max_size=3)) if candidates else []
    )
    return ModelCase(
        width=draw(st.sampled_from((8, 12, 16))),
        batch=draw(st.integers(2, 4)),
        specs=draw(st.lists(block_specs, min_size=n, max_size=n)),
        skips=sorted(skips),
        precision=draw(st.sampled_from(("32", "32", "bf16-mixed"))),
        plans=draw(st.lists(plan_actions(n), min_size=PLANS_PER_MODEL, max_size=PLANS_PER_MODEL)),
    )


def loss_fn(output: torch.Tensor) -> torch.Tensor:
    return output.float().square().mean()


def one_step(model: nn.Module, x: torch.Tensor, precision: str) -> dict[str, Any]:
    """Forward, loss and backward from seed 7; the loss, gradients and buffers after it."""
    for param in model.parameters():
        param.grad = None
    torch.manual_seed(7)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else None
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = loss_fn(model(x))
    loss.backward()
    state = {
        "loss": loss.detach(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
    }
    for param in model.parameters():
        param.grad = None  # none alive when a peak is measured next
    return state


def assert_bitwise(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    assert torch.equal(got["loss"], want["loss"]), f"{where}: loss"
    for group in ("grads", "buffers"):
        assert got[group].keys() == want[group].keys(), f"{where}: {group}"
        for name, value in want[group].items():
            assert torch.equal(got[group][name], value), f"{where}: {group} {name}"


def check_model(case: ModelCase, composed_bound: float = COMPOSED_BOUND) -> None:
    torch.manual_seed(1234)
    model = Chain(case.width, case.specs, case.skips).train()
    x = torch.randn(case.batch, case.width)
    units = [f"blocks.{i}" for i in range(len(case.specs))]
    state = copy.deepcopy(model.state_dict())
    step = remat.Step(model, (x,), loss_fn=loss_fn, optimizer="sgd", precision=case.precision)
    prof = remat.profile(
        model,
        (x,),
        loss_fn=loss_fn,
        optimizer="sgd",
        units=units,
        options=OPTIONS,
        precision=case.precision,
        warmup=0,
        repeats=0,
    )
    model.load_state_dict(state)
    want = one_step(model, x, case.precision)
    for index, actions in enumerate(case.plans):
        plan = remat.Plan(actions=dict(zip(units, actions, strict=True)), units=units)
        where = f"plan {index} {actions} of {case}"
        model.load_state_dict(state)
        with remat.apply_(model, plan):
            got = one_step(model, x, case.precision)
            model.load_state_dict(state)
            oracle = oracle_step_peak(
                model, (x,), loss_fn=loss_fn, optimizer="sgd", precision=case.precision
            )
            offload = "offload" in actions
            # the tracker's device bytes where the oracle counts host copies too, and on every
            # fifth plan besides, as a cross-check of the two counts (a third of the time)
            tracker = remat.measure_plan(step) if offload or index % 5 == 0 else oracle
        assert_bitwise(got, want, where)
        if offload:
            assert oracle >= tracker, f"{where}: oracle {oracle:,} tracker {tracker:,}"
        else:
            assert oracle == tracker, f"{where}: oracle {oracle:,} tracker {tracker:,}"
        measured = tracker
        predicted = remat.simulate(prof, plan).peak_bytes
        composed = any(action.startswith(("segment:", "nested:")) for action in actions)
        over = composed_bound if composed else TOLERANCE
        assert -TOLERANCE * measured <= predicted - measured <= over * measured, (
            f"{where}: predicted {predicted:,} measured {measured:,}"
        )


SETTINGS = settings(
    derandomize=SEED is None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),  # shrinking a model case takes minutes
    max_examples=MODELS,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.filterwarnings("ignore::UserWarning")
@SETTINGS
@given(case=model_cases())
def test_random_models_under_random_plans(case: ModelCase) -> None:
    check_model(case)


if SEED not in (None, "random"):  # "random": hypothesis's own unseeded draws
    test_random_models_under_random_plans = seed(int(SEED))(test_random_models_under_random_plans)


def _spec(kind: str, norm: str, activation: str, dropout: float) -> BlockSpec:
    return BlockSpec(kind=kind, norm=norm, activation=activation, dropout=dropout)


# Composed plans this search found mispredicted, each by one thing the simulator left out:
# (width, batch, precision, skips, blocks, plan, what the miss was).
REPRODUCERS = {
    "nested_frame_state": (
        8,
        3,
        "32",
        [],
        [("params", "layernorm", "tanh", 0.25), ("linear", "batchnorm", "tanh", 0.0)],
        ["nested:g0", "nested:g0"],
        "the one checkpoint holds the BatchNorm block's counter clone (8 bytes) through the"
        " first block's backward too: 0.56% low",
    ),
    "skip_sum_held_by_the_segment": (
        16,
        4,
        "32",
        [(0, 2)],
        [
            ("linear", "batchnorm", "gelu", 0.0),
            ("linear", "layernorm", "relu_inplace", 0.0),
            ("linear", "layernorm", "tanh", 0.0),
        ],
        ["keep", "segment:g1", "segment:g1"],
        "the checkpoint stores its last unit's input (a skip's sum) until its first unit's"
        " backward ends: 3.0% low",
    ),
    "replay_holds_every_output": (
        8,
        4,
        "32",
        [(0, 3), (4, 6)],
        [
            ("linear", "none", "relu", 0.25),
            ("linear", "layernorm", "relu_inplace", 0.0),
            ("params", "batchnorm", "relu", 0.0),
            ("params", "batchnorm", "gelu", 0.0),
            ("inplace", "batchnorm", "relu_inplace", 0.0),
            ("linear", "batchnorm", "relu", 0.25),
            ("linear", "none", "tanh", 0.25),
            ("linear", "batchnorm", "tanh", 0.25),
        ],
        ["selective:save_matmuls", "keep", "recompute", "recompute", *["segment:g4"] * 4],
        "the replay keeps every replayed output until it ends, and clones the BatchNorm"
        " buffers around each call: 2.3% low",
    ),
    "checkpoint_dies_before_the_peak": (
        16,
        4,
        "bf16-mixed",
        [(1, 3), (1, 4), (2, 4)],
        [
            ("inplace", "none", "relu", 0.0),
            ("inplace", "layernorm", "tanh", 0.25),
            ("inplace", "none", "tanh", 0.25),
            ("inplace", "layernorm", "tanh", 0.0),
            ("params", "none", "relu", 0.25),
        ],
        ["segment:g0", "segment:g0", "segment:g0", "keep", "nested:g4"],
        "the first unit's backward, where the checkpoint dies with the unit's last saved tensor,"
        " peaks after that: 2.4% low",
    ),
    "segment_output_stored_by_the_next_block": (
        8,
        4,
        "bf16-mixed",
        [],
        [
            ("linear", "layernorm", "tanh", 0.25),
            ("params", "layernorm", "gelu", 0.25),
            ("linear", "batchnorm", "relu", 0.0),
            ("linear", "layernorm", "relu_inplace", 0.25),
            ("linear", "layernorm", "relu_inplace", 0.25),
        ],
        ["segment:g0", "segment:g0", "selective:megatron", "keep", "keep"],
        "the segment's output is the selective block's stored input, alive at the loss: 3.4% low",
    ),
    "segment_after_a_unit_that_holds_its_output": (
        16,
        2,
        "32",
        [(2, 4)],
        [
            ("params", "none", "relu_inplace", 0.25),
            ("params", "none", "relu_inplace", 0.0),
            ("inplace", "layernorm", "gelu", 0.0),
            ("params", "batchnorm", "relu", 0.0),
            ("params", "batchnorm", "relu", 0.0),
            ("params", "layernorm", "relu", 0.0),
            ("params", "none", "gelu", 0.25),
            ("params", "layernorm", "gelu", 0.0),
            ("inplace", "layernorm", "relu", 0.0),
        ],
        ["segment:g0", *["segment:g1"] * 4, *["segment:g5"] * 3, "recompute"],
        "the checkpoint lives through its first unit's whole backward when the unit's input"
        " outlives it: 1.7% low",
    ),
    "nested_frame_dies_with_the_first_checkpoint": (
        16,
        3,
        "bf16-mixed",
        [(0, 2), (0, 3), (1, 3)],
        [
            ("linear", "batchnorm", "relu", 0.25),
            ("linear", "none", "relu", 0.25),
            ("linear", "layernorm", "relu", 0.25),
            ("params", "none", "relu", 0.0),
        ],
        ["nested:g0"] * 4,
        "the nested segment's boundaries die with its first unit's checkpoint, before that"
        " unit's backward peaks: 3.6% high",
    ),
    "segment_output_summed_with_a_skip": (
        12,
        4,
        "32",
        [(0, 2), (2, 4)],
        [
            ("params", "none", "gelu", 0.25),
            ("inplace", "layernorm", "gelu", 0.0),
            ("linear", "batchnorm", "relu", 0.25),
            ("params", "layernorm", "gelu", 0.25),
            ("inplace", "layernorm", "relu_inplace", 0.25),
        ],
        ["nested:g0", "nested:g0", "selective:megatron", "selective:megatron", "recompute"],
        "the next checkpoint stores the sum of the segment's output and a skip, not the output,"
        " which dies with the forward: 3.3% high",
    ),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(REPRODUCERS))
def test_composed_misprediction_reproducer(name: str) -> None:
    """Each composed plan the search once found mispredicted (see ``REPRODUCERS``) is
    predicted within ``TOLERANCE`` of the oracle's peak, besides the bitwise checks."""
    width, batch, precision, skips, blocks, plan, _ = REPRODUCERS[name]
    case = ModelCase(
        width=width,
        batch=batch,
        specs=[_spec(*block) for block in blocks],
        skips=skips,
        precision=precision,
        plans=[plan],
    )
    check_model(case, composed_bound=TOLERANCE)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.xfail(
    strict=True,
    reason="predicted 2,936 bytes, measured 2,968 (1.08% under): a segment over an in-place"
    " Linear block and a parameter-only block under bf16 autocast, after a recompute, with skips"
    " into both; its replay's peak is not the one the simulator composes (not found yet)",
)
def test_composed_under_prediction_known() -> None:
    case = ModelCase(
        width=8,
        batch=4,
        specs=[
            _spec("linear", "none", "gelu", 0.25),
            _spec("linear", "batchnorm", "gelu", 0.25),
            _spec("params", "batchnorm", "relu_inplace", 0.0),
            _spec("inplace", "none", "relu_inplace", 0.25),
            _spec("params", "layernorm", "relu", 0.25),
        ],
        skips=[(0, 3), (0, 4), (1, 3)],
        precision="bf16-mixed",
        plans=[["selective:save_matmuls", "selective:megatron", "recompute", *["segment:g3"] * 2]],
    )
    check_model(case)
