"""Integration tests of ``remat.apply_``: a plan installed on a model changes memory, never results.

Every comparison is bitwise (``torch.equal`` on CPU float32) against the same model without a plan,
built and stepped from the same seeds: the built-in zoo under every baseline strategy, toy modules
with unusual signatures and data flow, grad-free modes, autocast, the error paths, and plan files.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import remat
from remat import Plan, apply_, baseline_plan, find_units
from remat.models import BuiltModel, build_builtin
from remat.profiling.step import training_step

# ------------------------------------------------------------------------------------ helpers

SMALL: dict[str, dict[str, Any]] = {
    "gpt": {"n_layer": 4, "d_model": 64, "n_head": 4, "seq": 32, "batch": 2, "vocab": 128},
    "mlp": {"batch": 16, "width": 32, "n_blocks": 6, "in_features": 24},
    "cnn": {"batch": 4, "image_size": 8, "channels": (4, 8), "blocks_per_stage": 2},
    "unet": {"batch": 2, "image_size": 16, "base_channels": 4, "depth": 2},
    "moe": {
        "n_layer": 3,
        "d_model": 32,
        "n_head": 4,
        "seq": 16,
        "batch": 2,
        "vocab": 64,
        "n_experts": 4,
        "top_k": 2,
    },
}
DROPOUT = {"gpt": 0.1, "moe": 0.1}  # the built-ins that have dropout: on
MODELS = list(SMALL)
STRATEGIES = ["none", "full", "every_n:2", "every_n:3", "sqrt_n", "segment_all"]
BUILD_SEED, STEP_SEED = 0, 1


def build(name: str, **extra: Any) -> BuiltModel:
    torch.manual_seed(BUILD_SEED)
    overrides = {**SMALL[name], **extra}
    if name in DROPOUT:
        overrides.setdefault("dropout", DROPOUT[name])
    return build_builtin(name, **overrides)


def make_plan(strategy: str, units: list[str]) -> Plan:
    """A baseline plan, or one segment over every unit (``segment_all``)."""
    if strategy == "segment_all":
        return Plan(actions={"_default": "segment:all"}, units=units, strategy="custom")
    return baseline_plan(strategy, units)


def step(built: BuiltModel, seed: int = STEP_SEED, optimizer: Any = None) -> torch.Tensor:
    torch.manual_seed(seed)
    return training_step(
        built.model, built.example_inputs, loss_fn=built.loss_fn, optimizer=optimizer
    )


def grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {
        name: None if p.grad is None else p.grad.detach().clone()
        for name, p in model.named_parameters()
    }


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def assert_same(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    assert list(got) == list(want), f"{what}: names differ"
    differ = []
    for name, value in want.items():
        other = got[name]
        if value is None or other is None:
            if value is not other:
                differ.append(name)
        elif not torch.equal(other, value):
            differ.append(name)
    assert not differ, f"{what} differ from the unplanned model's: {differ}"


def no_instance_forwards(model: nn.Module) -> bool:
    return all("forward" not in m.__dict__ for m in model.modules())


def run_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs)


class OpCounter(TorchDispatchMode):
    """Counts aten ops, separately for forward and for backward (the autograd engine running)."""

    def __init__(self) -> None:
        super().__init__()
        self.forward: Counter[str] = Counter()
        self.backward: Counter[str] = Counter()
        self.sequence: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket.__name__)
        in_backward = torch._C._current_graph_task_id() != -1
        (self.backward if in_backward else self.forward)[name] += 1
        self.sequence.append(name)
        return func(*args, **(kwargs or {}))


# The toys note every run of their forward that happens inside backward (a replay).
REPLAYS: list[str] = []


def _note(module: nn.Module) -> None:
    if torch._C._current_graph_task_id() != -1:
        REPLAYS.append(type(module).__name__)


@pytest.fixture(autouse=True)
def _reset_replays() -> None:
    REPLAYS.clear()


# --------------------------------------------------------------- 1. the zoo, every strategy


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", MODELS)
def test_zoo_step_is_bitwise_equal(name: str, strategy: str) -> None:
    ref = build(name)
    planned = build(name)
    units = find_units(planned.model)
    keys_before = list(planned.model.state_dict())
    names_before = [n for n, _ in planned.model.named_parameters()]
    ref_loss = step(ref)

    handle = apply_(planned.model, make_plan(strategy, units))
    assert list(planned.model.state_dict()) == keys_before
    assert [n for n, _ in planned.model.named_parameters()] == names_before
    expected_checkpointed = [
        u for u in units if make_plan(strategy, units).action_for(u).checkpoints
    ]
    assert handle.checkpointed == expected_checkpointed
    if strategy in ("full", "segment_all"):
        assert handle.checkpointed == units
    if strategy == "none":
        assert handle.checkpointed == []
    assert handle.active == bool(handle.checkpointed)  # a "none" plan installs nothing

    loss = step(planned)
    assert torch.equal(loss, ref_loss)
    assert_same(grads(planned.model), grads(ref.model), f"{name}/{strategy} gradients")
    assert_same(buffers(planned.model), buffers(ref.model), f"{name}/{strategy} buffers")
    assert all(g is not None for g in grads(planned.model).values())

    handle.remove()
    assert not handle.active
    assert no_instance_forwards(planned.model)
    assert list(planned.model.state_dict()) == keys_before
    torch.manual_seed(7)
    out = run_model(planned.model, planned.example_inputs)
    torch.manual_seed(7)
    want = run_model(ref.model, ref.example_inputs)
    assert torch.equal(out, want)
    assert_same(
        buffers(planned.model), buffers(ref.model), f"{name}/{strategy} buffers after remove"
    )


@pytest.mark.parametrize("strategy", ["full", "sqrt_n", "segment_all"])
@pytest.mark.parametrize("name", ["cnn", "gpt"])
def test_three_sgd_steps_are_bitwise_equal(name: str, strategy: str) -> None:
    ref, planned = build(name), build(name)
    ref_opt = torch.optim.SGD(ref.model.parameters(), lr=0.1, momentum=0.9)
    opt = torch.optim.SGD(planned.model.parameters(), lr=0.1, momentum=0.9)
    with apply_(planned.model, make_plan(strategy, find_units(planned.model))):
        for i in range(3):
            assert torch.equal(step(planned, 10 + i, opt), step(ref, 10 + i, ref_opt))
    assert_same(params(planned.model), params(ref.model), "parameters after 3 steps")
    assert_same(buffers(planned.model), buffers(ref.model), "buffers after 3 steps")
    if name == "cnn":
        tracked = [b for n, b in planned.model.named_buffers() if n.endswith("num_batches_tracked")]
        assert tracked and all(int(b) == 3 for b in tracked)  # not bumped again by the replays


# ----------------------------------------------------------- 2. the plan really takes effect


def _backward_ops(strategy: str) -> tuple[Counter[str], Counter[str]]:
    built = build("gpt")
    with apply_(built.model, make_plan(strategy, find_units(built.model))):
        counter = OpCounter()
        with counter:
            step(built)
    return counter.forward, counter.backward


def test_full_replays_forward_ops_in_backward_and_none_does_not() -> None:
    n_layer = SMALL["gpt"]["n_layer"]
    fw_none, bw_none = _backward_ops("none")
    fw_full, bw_full = _backward_ops("full")
    _, bw_every2 = _backward_ops("every_n:2")
    forward_ops = ("addmm", "native_layer_norm", "gelu")
    assert all(bw_none[op] == 0 for op in forward_ops), bw_none
    assert all(bw_full[op] > 0 for op in forward_ops), bw_full
    # Exactly one replay per checkpointed block: two LayerNorms each; ln_f is never replayed.
    assert bw_full["native_layer_norm"] == 2 * n_layer
    assert bw_every2["native_layer_norm"] == 2 * (n_layer // 2)
    assert bw_full["gelu"] == n_layer
    # The forward itself does the same work (recording RNG states may add a detach or so).
    assert {op: n for op, n in fw_full.items() if op != "detach"} == {
        op: n for op, n in fw_none.items() if op != "detach"
    }


def test_full_lowers_the_peak_memory_of_a_step() -> None:
    peaks = {}
    for strategy in ("none", "full", "sqrt_n"):
        built = build("gpt", dropout=0.0, seq=64, d_model=64)
        with apply_(built.model, make_plan(strategy, find_units(built.model))):
            with remat.track_memory(built.model, built.example_inputs) as tracker:
                step(built)
        peaks[strategy] = tracker.peak_bytes
    assert peaks["full"] < peaks["none"], peaks
    assert peaks["sqrt_n"] < peaks["none"], peaks


def test_a_segment_stores_only_its_first_input() -> None:
    after_forward = {}
    for strategy in ("none", "full", "segment_all"):
        built = build("gpt", dropout=0.0)
        with apply_(built.model, make_plan(strategy, find_units(built.model))):
            with remat.track_memory(built.model, built.example_inputs) as tracker:
                torch.manual_seed(STEP_SEED)
                loss = built.loss_fn(run_model(built.model, built.example_inputs))
                after_forward[strategy] = tracker.current_bytes
                loss.backward()
    cfg = SMALL["gpt"]
    block_input_bytes = cfg["batch"] * cfg["seq"] * cfg["d_model"] * 4
    assert after_forward["full"] < after_forward["none"]
    # full keeps every block's input; one segment keeps blocks.0's and links the other three.
    assert after_forward["full"] - after_forward["segment_all"] == 3 * block_input_bytes


@pytest.mark.parametrize("strategy", ["full", "segment_all"])
def test_backward_twice_with_retain_graph(strategy: str) -> None:
    ref, planned = build("gpt"), build("gpt")
    with apply_(planned.model, make_plan(strategy, find_units(planned.model))):
        for built in (ref, planned):
            torch.manual_seed(STEP_SEED)
            loss = built.loss_fn(run_model(built.model, built.example_inputs))
            loss.backward(retain_graph=True)
            loss.backward()
    assert_same(grads(planned.model), grads(ref.model), "gradients after two backwards")


# ------------------------------------------------------------------------- 3. toy modules

D = 8


class Block(nn.Module):
    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _note(self)
        return F.dropout(torch.tanh(self.fc(x)), self.p, self.training)


class Stack(nn.Module):
    def __init__(self, n: int = 4, p: float = 0.0) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(p) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class KwBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, *, x: torch.Tensor, scale: Any) -> torch.Tensor:
        _note(self)
        return torch.tanh(self.fc(x)) * scale


class KwNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(KwBlock() for _ in range(3))
        self.register_buffer("scale", torch.linspace(0.5, 1.5, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks[0](x=x, scale=0.75)
        x = self.blocks[1](scale=self.scale, x=x)
        return self.blocks[2](x=x, scale=2)


class TupleBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, h: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _note(self)
        return torch.tanh(self.fc1(h)) * g, torch.sigmoid(self.fc2(h))


class TupleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TupleBlock() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, g = x, torch.sigmoid(x)
        for block in self.blocks:
            h, g = block(h, g)
        return h + g


class DictBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        _note(self)
        h = torch.tanh(self.fc(state["h"]))
        return {"h": h * state["gate"], "gate": torch.sigmoid(h), "step": state["step"] + 1}


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DictBlock() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = {"h": x, "gate": torch.ones_like(x), "step": torch.zeros((), dtype=torch.long)}
        for block in self.blocks:
            state = block(state)
        assert int(state["step"]) == 3
        return state["h"] + state["gate"]


class Pair(NamedTuple):
    h: torch.Tensor
    g: torch.Tensor


class PairBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, pair: Pair) -> Pair:
        _note(self)
        h = torch.tanh(self.fc(pair.h) + pair.g)
        return Pair(h=h, g=h * pair.g)


class PairNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(PairBlock() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pair = Pair(x, x.cos())
        for block in self.blocks:
            pair = block(pair)
            assert type(pair) is Pair
        return pair.h * pair.g


@dataclass
class Out:  # deliberately not registered with pytree
    h: torch.Tensor
    note: str


class DataBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> Out:
        _note(self)
        return Out(h=torch.tanh(self.fc(x)), note=f"{type(self).__name__}")


class DataNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DataBlock() for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            out = block(x)
            assert type(out) is Out and out.note == "DataBlock"
            x = out.h
        return x


class SharedNet(nn.Module):
    """``shared`` runs twice in one forward, around ``other``."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = Block(p=0.2)
        self.other = Block(p=0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(self.other(self.shared(x)))


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        self.blocks[2].fc.weight = self.blocks[0].fc.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Merge(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        _note(self)
        return torch.tanh(self.fc(x)) * skip


class SkipNet(nn.Module):
    """U-Net-like: the output of b1 is used again by b4."""

    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2, self.b3 = Block(), Block(), Block()
        self.b4 = Merge()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = self.b1(x)
        return self.b4(self.b3(self.b2(h1)), h1)


class Other(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _note(self)
        return F.gelu(self.fc(self.norm(x)))


class Last(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.scale = nn.Parameter(torch.full((D,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _note(self)
        return torch.sigmoid(self.fc(x)) * self.scale


def mixed_sequential() -> nn.Sequential:
    return nn.Sequential(Block(0.1), Other(), Block(0.1), Other(), Last())


class MixedNet(nn.Module):
    """A Sequential of mixed block classes held by a parent, between a stem and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(D, D)
        self.body = mixed_sequential()
        self.head = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.stem(x)))


class BetweenNet(nn.Module):
    """Code and dropout between the units of one segment."""

    def __init__(self) -> None:
        super().__init__()
        self.b1, self.b2, self.b3 = Block(0.2), Block(0.2), Block(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.b1(x) * 2 + 1
        x = self.b2(x)
        x = F.dropout(x, 0.3, self.training)
        return self.b3(x)


def toy_loss(out: Any) -> torch.Tensor:
    return (out.float() ** 2).sum()


def check_toy(
    factory: Callable[[], nn.Module],
    plan: Plan,
    *,
    units: Any = None,
    x_requires_grad: bool = True,
    freeze: Callable[[nn.Module], None] | None = None,
    expect_replay: bool = True,
) -> nn.Module:
    """Run one forward and backward with and without ``plan``; everything must be bitwise equal."""
    torch.manual_seed(BUILD_SEED)
    ref = factory()
    torch.manual_seed(BUILD_SEED)
    model = factory()
    if freeze is not None:
        freeze(ref)
        freeze(model)
    torch.manual_seed(3)
    x_ref = torch.randn(4, D, requires_grad=x_requires_grad)
    x = x_ref.detach().clone().requires_grad_(x_requires_grad)

    torch.manual_seed(STEP_SEED)
    out_ref = ref(x_ref)
    toy_loss(out_ref).backward()

    names = [n for n, _ in model.named_parameters()]
    with apply_(model, plan, units=units) as handle:
        assert handle.checkpointed
        assert [n for n, _ in model.named_parameters()] == names
        REPLAYS.clear()
        torch.manual_seed(STEP_SEED)
        out = model(x)
        assert not REPLAYS
        assert torch.equal(out, out_ref)
        toy_loss(out).backward()
        assert bool(REPLAYS) == expect_replay, REPLAYS
    assert no_instance_forwards(model)
    assert_same(grads(model), grads(ref), "gradients")
    assert_same(buffers(model), buffers(ref), "buffers")
    if x_requires_grad:
        assert x.grad is not None and torch.equal(x.grad, x_ref.grad)
    return model


FULL = Plan(actions={"_default": "recompute"})
ONE_SEGMENT = Plan(actions={"_default": "segment:s"})
TOYS = {
    "kwargs_only": KwNet,
    "tuple_outputs": TupleNet,
    "dict_outputs": DictNet,
    "namedtuple_outputs": PairNet,
    "dataclass_outputs": DataNet,
    "tied_weights": TiedNet,
    "dropout_inside": lambda: Stack(4, p=0.3),
}


@pytest.mark.parametrize("plan", [FULL, ONE_SEGMENT], ids=["full", "segment"])
@pytest.mark.parametrize("toy", list(TOYS))
def test_toy_models_are_bitwise_equal(toy: str, plan: Plan) -> None:
    model = check_toy(TOYS[toy], plan)
    assert find_units(model) == ["blocks.0", "blocks.1", "blocks.2"] + (
        ["blocks.3"] if toy == "dropout_inside" else []
    )


def test_dataclass_output_passes_through_unchanged() -> None:
    torch.manual_seed(0)
    model = DataNet()
    x = torch.randn(2, D, requires_grad=True)
    with apply_(model, ONE_SEGMENT):
        out = model.blocks[0](x)
        assert type(out) is Out and out.note == "DataBlock" and out.h.requires_grad
        with torch.no_grad():
            assert type(model.blocks[1](x)) is Out


@pytest.mark.parametrize(
    "plan",
    [
        Plan(actions={"shared": "recompute", "other": "recompute"}),
        Plan(actions={"shared": "segment:s", "other": "segment:s"}, units=["shared", "other"]),
        Plan(actions={"other": "recompute"}),
    ],
    ids=["both_recompute", "segment", "other_only"],
)
def test_module_called_twice_in_one_forward(plan: Plan) -> None:
    check_toy(SharedNet, plan, units=["shared", "other"])


def test_tied_weights_share_one_gradient() -> None:
    model = check_toy(TiedNet, FULL)
    assert "blocks.2.fc.weight" not in dict(model.named_parameters())
    assert model.blocks[2].fc.weight is model.blocks[0].fc.weight


def _freeze_first_two(model: nn.Module) -> None:
    for block in list(model.blocks)[:2]:
        block.requires_grad_(False)


@pytest.mark.parametrize(
    "plan",
    [FULL, ONE_SEGMENT, Plan(actions={"blocks.1": "segment:a", "blocks.2": "segment:a"})],
    ids=["full", "segment", "segment_across_frozen"],
)
def test_frozen_parameters_and_inputs_without_grad(plan: Plan) -> None:
    model = check_toy(
        lambda: Stack(4, p=0.1), plan, x_requires_grad=False, freeze=_freeze_first_two
    )
    got = grads(model)
    assert got["blocks.0.fc.weight"] is None and got["blocks.1.fc.bias"] is None
    assert got["blocks.2.fc.weight"] is not None and got["blocks.3.fc.weight"] is not None


@pytest.mark.parametrize("plan", [FULL, ONE_SEGMENT], ids=["full", "segment"])
def test_nothing_requires_grad(plan: Plan) -> None:
    torch.manual_seed(0)
    model = Stack(3, p=0.2).requires_grad_(False)
    ref = copy.deepcopy(model)
    x = torch.randn(4, D)
    torch.manual_seed(5)
    want = ref(x)
    with apply_(model, plan):
        torch.manual_seed(5)
        got = model(x)
    assert not got.requires_grad
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "plan",
    [FULL, ONE_SEGMENT, Plan(actions={"b2": "segment:m", "b3": "segment:m", "b4": "segment:m"})],
    ids=["full", "segment", "segment_without_b1"],
)
def test_skip_connection_across_units(plan: Plan) -> None:
    check_toy(SkipNet, plan, units=["b1", "b2", "b3", "b4"])


@pytest.mark.parametrize("strategy", ["full", "every_n:2", "sqrt_n", "segment_all"])
def test_sequential_of_mixed_block_classes(strategy: str) -> None:
    torch.manual_seed(0)
    units = find_units(MixedNet())
    assert units == [f"body.{i}" for i in range(5)]
    check_toy(MixedNet, make_plan(strategy, units))


@pytest.mark.parametrize("strategy", ["full", "sqrt_n"])
def test_root_sequential_of_mixed_block_classes_explicit_units(strategy: str) -> None:
    units = ["0", "1", "2", "3", "4"]
    check_toy(mixed_sequential, make_plan(strategy, units), units=units)


def test_root_sequential_of_mixed_block_classes_default_units() -> None:
    assert find_units(mixed_sequential()) == ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize(
    "plan",
    [
        ONE_SEGMENT,
        FULL,
        Plan(actions={"b1": "segment:x", "b2": "segment:x", "b3": "recompute"}),
    ],
    ids=["one_segment", "full", "segment_and_recompute"],
)
def test_code_and_dropout_between_units_of_a_segment(plan: Plan) -> None:
    check_toy(BetweenNet, plan, units=["b1", "b2", "b3"])


# ------------------------------------------------------------------- 4. grad-free bypass


@pytest.mark.parametrize(
    "mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference"]
)
def test_grad_free_modes_bypass_the_engine(mode: Callable[[], Any]) -> None:
    ref, planned = build("gpt"), build("gpt")
    with apply_(planned.model, baseline_plan("full", find_units(planned.model))) as handle:
        ref_counter, counter = OpCounter(), OpCounter()
        with mode():
            torch.manual_seed(4)
            with ref_counter:
                want = run_model(ref.model, ref.example_inputs)
            torch.manual_seed(4)
            with counter:
                got = run_model(planned.model, planned.example_inputs)
        assert torch.equal(got, want)
        assert counter.sequence == ref_counter.sequence  # no extra work, no replay
        assert not counter.backward
        regions = {
            m.__dict__["forward"].__remat_region__
            for m in planned.model.modules()
            if "forward" in m.__dict__
        }
        assert len(regions) == len(handle.checkpointed)
        assert regions and all(region._open is None for region in regions)
        # A training step afterwards is still exact.
        assert torch.equal(step(planned), step(ref))
        assert_same(grads(planned.model), grads(ref.model), "gradients")


# ---------------------------------------------------------------------------- 5. autocast


@pytest.mark.parametrize("strategy", ["full", "sqrt_n"])
@pytest.mark.parametrize("name", ["gpt", "mlp"])
def test_autocast_bfloat16_is_bitwise_equal(name: str, strategy: str) -> None:
    ref, planned = build(name), build(name)

    def autocast_step(built: BuiltModel) -> torch.Tensor:
        torch.manual_seed(STEP_SEED)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = run_model(built.model, built.example_inputs)
            assert out.dtype == torch.bfloat16
            loss = built.loss_fn(out)
        loss.backward()
        return loss.detach()

    want = autocast_step(ref)
    with apply_(planned.model, make_plan(strategy, find_units(planned.model))):
        counter = OpCounter()
        with counter:
            got = autocast_step(planned)
        assert counter.backward["addmm"] + counter.backward["mm"] > 0
    assert torch.equal(got, want)
    assert_same(grads(planned.model), grads(ref.model), "gradients under autocast")
    assert all(g is not None and g.dtype == torch.float32 for g in grads(planned.model).values())


# ------------------------------------------------------------------- 6. strictness, errors


def test_unknown_selector_suggests_the_closest_name() -> None:
    model = build("gpt").model
    with pytest.raises(ValueError, match=r"blocks\.1O") as info:
        apply_(model, Plan(actions={"blocks.1O": "recompute"}))
    assert "'blocks.1'" in str(info.value)
    assert no_instance_forwards(model)


def test_regex_selector_that_matches_no_unit() -> None:
    model = build("gpt").model
    with pytest.raises(ValueError, match="matches no unit"):
        apply_(model, Plan(actions={r"re:layers\.[0-9]+": "recompute"}))
    assert no_instance_forwards(model)


def test_segment_of_non_consecutive_units() -> None:
    model = build("gpt").model
    plan = Plan(actions={"blocks.0": "segment:a", "blocks.2": "segment:a"})
    with pytest.raises(ValueError, match="not consecutive"):
        apply_(model, plan)
    assert no_instance_forwards(model)


def test_nested_planned_modules_are_refused() -> None:
    model = build("gpt").model
    with pytest.raises(ValueError, match="nest"):
        apply_(model, Plan(actions={"blocks.0": "recompute", "blocks.0.attn": "recompute"}))
    assert no_instance_forwards(model)


def test_apply_twice_remove_twice_and_context_manager() -> None:
    built = build("gpt")
    model = built.model
    plan = baseline_plan("full", find_units(model))
    handle = apply_(model, plan)
    with pytest.raises(ValueError, match="already carries"):
        apply_(model, plan)
    assert handle.active and not no_instance_forwards(model)
    handle.remove()
    handle.remove()
    assert no_instance_forwards(model)
    with apply_(model, plan) as second:
        assert second.active and not no_instance_forwards(model)
    assert not second.active and no_instance_forwards(model)
    with pytest.raises(KeyError), apply_(model, plan):
        raise KeyError("boom")
    assert no_instance_forwards(model)
    apply_(model, plan).remove()  # reapplying after remove is fine


def test_instance_forward_set_by_the_user_is_restored() -> None:
    torch.manual_seed(0)
    model = Stack(3)
    original = model.blocks[1].forward

    def custom(x: torch.Tensor) -> torch.Tensor:
        return original(x) * 3

    model.blocks[1].forward = custom
    with apply_(model, FULL):
        assert model.blocks[1].__dict__["forward"] is not custom
        model(torch.randn(2, D, requires_grad=True)).sum().backward()
    assert model.blocks[1].__dict__["forward"] is custom
    assert "forward" not in model.blocks[0].__dict__


def test_fingerprinted_plan_on_another_model() -> None:
    model_a = build("gpt").model
    model_b = build("gpt", d_model=32).model
    plan = Plan(actions={"_default": "recompute"}, fingerprint=remat.fingerprint(model_a))
    apply_(model_a, plan).remove()
    with pytest.raises(ValueError, match="another model") as info:
        apply_(model_b, plan)
    assert "wte.weight" in str(info.value)
    assert no_instance_forwards(model_b)
    apply_(model_b, plan, check_fingerprint=False).remove()


class InplaceAfter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(D, D)
        self.u = Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0 = self.pre(x)
        y = self.u(x0)
        x0.add_(1)  # the unit's stored input changes after the unit ran
        return y + x0


def test_in_place_change_of_a_stored_input_is_caught_at_backward() -> None:
    torch.manual_seed(0)
    model = InplaceAfter()
    with apply_(model, Plan(actions={"u": "recompute"})):
        out = model(torch.randn(2, D))
        with pytest.raises(RuntimeError, match="in place"):
            out.sum().backward()


# ------------------------------------------------------------------- 7. plan files


@pytest.mark.parametrize("strategy", ["sqrt_n", "every_n:2"])
def test_plan_json_round_trip_then_apply(strategy: str, tmp_path: Any) -> None:
    ref, planned = build("gpt"), build("gpt")
    units = find_units(planned.model)
    plan = baseline_plan(strategy, units)
    plan.fingerprint = remat.fingerprint(planned.model, units)
    plan.metadata = {"note": "round trip"}
    path = plan.save(tmp_path / "plans" / "gpt.json")
    loaded = Plan.load(path)
    assert loaded == plan
    assert loaded.units == units
    with apply_(planned.model, loaded) as handle:
        assert handle.checkpointed == [u for u in units if plan.action_for(u).checkpoints]
        assert torch.equal(step(planned), step(ref))
    assert_same(grads(planned.model), grads(ref.model), "gradients with a loaded plan")


# ----------------------------------------------------------------------- bugs found here


class InplaceBetween(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b1 = nn.Linear(D, D)
        self.b2 = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b1(x)
        h.add_(1.0)  # legal without a plan: nothing saved h before this
        return torch.tanh(self.b2(h))


def test_in_place_change_between_units_of_a_segment() -> None:
    torch.manual_seed(0)
    ref = InplaceBetween()
    model = copy.deepcopy(ref)
    x = torch.randn(3, D)
    ref(x).sum().backward()
    # Documented (docs/reliability.md): a segment links b2's input to b1's output only while
    # that output is unchanged, so the changed h is recomputed, and the gradients are exact;
    # not a refusal (which this test once accepted as well).
    with apply_(model, Plan(actions={"b1": "segment:s", "b2": "segment:s"}, units=["b1", "b2"])):
        model(x).sum().backward()
    assert_same(grads(model), grads(ref), "gradients")


class RunningCenter(nn.Module):
    """Updates a running mean buffer, then uses the updated value (as input normalisers do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.register_buffer("mean", torch.zeros(D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        with torch.no_grad():
            self.mean.mul_(0.5).add_(0.5 * h.mean(0))
        return torch.tanh(h - self.mean)


def test_unit_reading_a_buffer_it_updates() -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(RunningCenter(), RunningCenter())
    model = copy.deepcopy(ref)
    x = torch.randn(4, D)
    ref(x).sum().backward()
    with apply_(model, FULL) as handle:
        assert handle.checkpointed == ["0", "1"]
        model(x).sum().backward()
    assert_same(buffers(model), buffers(ref), "buffers")
    assert_same(grads(model), grads(ref), "gradients")


def test_a_plan_naming_modules_needs_no_repeated_block() -> None:
    """Where no block repeats there are no default units: a plan of exact FQNs applies to the
    modules it names, and a plan of ``_default`` or ``re:`` selectors is refused naming the cause."""
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 8), nn.GELU()))
    with remat.apply_(model, remat.Plan(actions={"1": "recompute"})) as handle:
        assert handle.checkpointed == ["1"]
    with pytest.raises(remat.NoUnitsError, match="units"):
        remat.apply_(model, remat.Plan(actions={"_default": "recompute"}))
