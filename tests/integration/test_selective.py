"""Integration tests of the ``selective:<policy>`` and ``offload`` actions on the built-in models.

Oracles:

1. gradients, parameters and buffers bitwise equal (``torch.equal``, CPU float32, dropout on) to
   the same model without a plan, over two optimizer steps, under ``megatron``, ``save_matmuls``,
   ``offload``, a mixed plan of every action, and solver plans that use them;
2. which aten ops ran again in backward: a dispatch mode counting ops while the autograd engine
   runs, and ``FlopCounterMode`` around the backward alone, against the unplanned step's backward
   (which has matmuls of its own, for the gradients: the difference is the recompute);
3. memory: the tracker's measured peak of a step against ``remat.simulate``'s prediction from a
   profile that measured the options; host bytes of ``offload`` counted apart from device bytes;
4. the solver with options against the solver restricted to whole-unit actions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import remat
import remat.apply.selective as selective
from helpers import StorageIds
from memory_oracle import oracle_step_peak
from remat import Plan, apply_, baseline_plan, find_units
from remat.models import BuiltModel, build_builtin
from remat.opnames import OP_FAMILIES, canonical_op
from remat.profiling.step import measure_step, training_step

# ------------------------------------------------------------------------------------ helpers

SMALL: dict[str, dict[str, Any]] = {
    "gpt": {"n_layer": 3, "d_model": 32, "n_head": 2, "seq": 16, "batch": 2, "vocab": 64},
    "mlp": {"batch": 16, "width": 32, "n_blocks": 6, "in_features": 24},
    "cnn": {"batch": 4, "image_size": 8, "channels": (4, 8), "blocks_per_stage": 3},
    "unet": {"batch": 2, "image_size": 16, "base_channels": 4, "depth": 2},
    "moe": {
        "n_layer": 5,
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
BUILD_SEED, STEP_SEED = 0, 1
# A save set of ops each model runs (aten overload packets), for selective:ops.<op>...
OP_SETS = {
    "gpt": "ops.addmm.gelu",
    "mlp": "ops.addmm.gelu",
    "moe": "ops.addmm.gelu",
    "cnn": "ops.convolution.relu",
    "unet": "ops.convolution.silu",
}
MIXED = ["selective:{ops}", "selective:megatron", "offload", "recompute", "keep"]
MATMULS = ("mm", "addmm", "bmm", "baddbmm")
COPIES = {"clone", "detach", "copy_", "_to_copy", "empty", "empty_like", "empty_strided"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """One intra-op thread: on a loaded 2-core machine, torch's thread pool spinning makes this
    file several times slower; results are bitwise the same either way (both sides use it)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@contextlib.contextmanager
def storage_ids(*, reuse: bool | None) -> Iterator[None]:
    """Run the selective engine with :class:`StorageIds` (``reuse=None``: torch's own storage
    identities, as in a real run). Used (``reuse=False``) where a test checks exactly what
    ``megatron`` keeps: with ids that a dead storage hands on it would keep less at random (the
    bug that ``test_megatron_keeps_the_same_whatever_the_ids`` shows)."""
    with pytest.MonkeyPatch.context() as patch:
        if reuse is not None:
            patch.setattr(selective, "_storage_id", StorageIds(reuse=reuse))
        yield


def build(name: str, **extra: Any) -> BuiltModel:
    torch.manual_seed(BUILD_SEED)
    overrides = {**SMALL[name], **extra}
    if name in DROPOUT:
        overrides.setdefault("dropout", DROPOUT[name])
    return build_builtin(name, **overrides)


def mixed_plan(name: str, units: list[str]) -> Plan:
    """Every unit gets the next action of ``MIXED`` in turn (with five units or more, each
    action is used)."""
    actions = [a.format(ops=OP_SETS[name]) for a in MIXED]
    return Plan(actions={u: actions[i % len(actions)] for i, u in enumerate(units)}, units=units)


def make_plan(name: str, strategy: str, units: list[str]) -> Plan:
    if strategy == "mixed":
        return mixed_plan(name, units)
    return baseline_plan(strategy, units)


def step(built: BuiltModel, seed: int, optimizer: Any = None) -> torch.Tensor:
    torch.manual_seed(seed)
    return training_step(
        built.model, built.example_inputs, loss_fn=built.loss_fn, optimizer=optimizer
    )


def snapshot(model: nn.Module) -> dict[str, torch.Tensor | None]:
    """Gradients, parameters and buffers, by name."""
    found: dict[str, torch.Tensor | None] = {}
    for name, p in model.named_parameters():
        found[f"grad:{name}"] = None if p.grad is None else p.grad.detach().clone()
        found[f"param:{name}"] = p.detach().clone()
    for name, b in model.named_buffers():
        found[f"buffer:{name}"] = b.detach().clone()
    return found


def assert_same(got: dict[str, Any], want: dict[str, Any], what: str) -> None:
    assert list(got) == list(want), f"{what}: names differ"
    differ = [
        name
        for name, value in want.items()
        if (value is None) != (got[name] is None)
        or (value is not None and not torch.equal(got[name], value))
    ]
    assert not differ, f"{what} differ from the unplanned model's: {differ[:6]}"


def two_steps_equal(name: str, plan_for: Any, **extra: Any) -> list[str]:
    """Two SGD (momentum) steps with and without the plan: losses, gradients, parameters and
    buffers bitwise equal after each. Returns the planned model's checkpointed units."""
    ref, planned = build(name, **extra), build(name, **extra)
    plan = plan_for(find_units(planned.model))
    ref_opt = torch.optim.SGD(ref.model.parameters(), lr=0.05, momentum=0.9)
    opt = torch.optim.SGD(planned.model.parameters(), lr=0.05, momentum=0.9)
    with apply_(planned.model, plan) as handle:
        for i in range(2):
            loss = step(planned, STEP_SEED + i, opt)
            want = step(ref, STEP_SEED + i, ref_opt)
            assert torch.equal(loss, want), f"step {i}: loss {loss} != {want}"
            assert_same(snapshot(planned.model), snapshot(ref.model), f"{name} step {i}")
        checkpointed = list(handle.checkpointed)
    assert all(p.grad is not None for p in planned.model.parameters())
    return checkpointed


class OpCounter(TorchDispatchMode):
    """Counts aten ops, separately for forward and for backward (the autograd engine running);
    in backward also by (op, output shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.forward: Counter[str] = Counter()
        self.backward: Counter[str] = Counter()
        self.backward_shapes: Counter[tuple[str, tuple[int, ...]]] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket.__name__)
        if torch._C._current_graph_task_id() != -1:
            self.backward[name] += 1
            if isinstance(out, torch.Tensor):
                self.backward_shapes[(name, tuple(out.shape))] += 1
        else:
            self.forward[name] += 1
        return out


def counted_step(name: str, plan_for: Any, **extra: Any) -> tuple[OpCounter, int]:
    """One training step under ``plan_for(units)``: the ops it ran, and the matmul / attention /
    convolution FLOPs of its backward alone (``FlopCounterMode``)."""
    built = build(name, **extra)
    with apply_(built.model, plan_for(find_units(built.model))):
        counter = OpCounter()
        with counter:
            torch.manual_seed(STEP_SEED)
            loss = built.loss_fn(built.model(*built.example_inputs))
            with FlopCounterMode(display=False) as flops:
                loss.backward()
    return counter, flops.get_total_flops()


def every_unit(action: str) -> Any:
    return lambda units: Plan(actions=dict.fromkeys(units, action), units=units)


# ---------------------------------------------------------- 1. gradients are bitwise equal


@pytest.mark.parametrize("strategy", ["megatron", "save_matmuls", "offload", "mixed"])
@pytest.mark.parametrize("name", MODELS)
def test_two_steps_bitwise_equal(name: str, strategy: str) -> None:
    checkpointed = two_steps_equal(name, lambda units: make_plan(name, strategy, units))
    assert checkpointed, "the plan acts on some units"


@pytest.mark.parametrize("name", MODELS)
def test_mixed_plan_uses_every_action(name: str) -> None:
    # The GPT has three blocks in the bitwise test: five in its own test below.
    units = find_units(build(name, **({"n_layer": 5} if name == "gpt" else {})).model)
    kinds = {str(a) for a in mixed_plan(name, units).resolve(units).values()}
    assert kinds == {a.format(ops=OP_SETS[name]) for a in MIXED}


def test_mixed_plan_on_a_five_block_gpt_is_bitwise_equal() -> None:
    two_steps_equal("gpt", lambda units: mixed_plan("gpt", units), n_layer=5)


def test_megatron_with_fused_attention_is_bitwise_equal() -> None:
    # Without dropout, the GPT's attention runs as one fused kernel on the CPU.
    two_steps_equal("gpt", lambda units: baseline_plan("megatron", units), dropout=0.0)


# ---------------------------------------------------------- 2. what runs again in backward

N_LAYER = SMALL["gpt"]["n_layer"]
TOKENS, D_MODEL = SMALL["gpt"]["batch"] * SMALL["gpt"]["seq"], SMALL["gpt"]["d_model"]
COUNTED = ("none", "full", "megatron", "save_matmuls", "offload")


@pytest.fixture(scope="module")
def gpt_counts() -> dict[str, tuple[OpCounter, int]]:
    with storage_ids(reuse=False):
        return {s: counted_step("gpt", lambda u, s=s: baseline_plan(s, u)) for s in COUNTED}


def test_full_reruns_every_forward_matmul(gpt_counts: dict[str, tuple[OpCounter, int]]) -> None:
    (none, none_flops), (full, full_flops) = gpt_counts["none"], gpt_counts["full"]
    assert none.backward["addmm"] == 0  # addmm's backward is mm
    # Every block's four linear layers (qkv, proj, fc, fc2) and two attention bmms run again.
    assert full.backward["addmm"] == 4 * N_LAYER == full.forward["addmm"]
    assert full.backward["bmm"] - none.backward["bmm"] == 2 * N_LAYER
    assert full.backward["mm"] == none.backward["mm"]
    assert full_flops > none_flops


def test_save_matmuls_reruns_no_matmul(gpt_counts: dict[str, tuple[OpCounter, int]]) -> None:
    (none, none_flops), (sm, sm_flops) = gpt_counts["none"], gpt_counts["save_matmuls"]
    for op in MATMULS:
        assert sm.backward[op] == none.backward[op], (op, sm.backward[op], none.backward[op])
    assert sm_flops == none_flops  # no matmul FLOPs beyond the gradients' own
    # ... but it does recompute the rest: norms, GELU, softmax, once per block.
    assert sm.backward["native_layer_norm"] == 2 * N_LAYER
    assert sm.backward["gelu"] == N_LAYER
    assert sm.backward["_safe_softmax"] == N_LAYER
    assert none.backward["gelu"] == none.backward["_safe_softmax"] == 0


def test_megatron_reruns_the_attention_core(gpt_counts: dict[str, tuple[OpCounter, int]]) -> None:
    (none, none_flops), (meg, meg_flops) = gpt_counts["none"], gpt_counts["megatron"]
    # The core (dropout on: the math path): scores Q K^T, softmax, dropout of the probabilities,
    # once per block; not the product with V, whose output is kept.
    assert meg.backward["_safe_softmax"] == N_LAYER
    assert meg.backward["bmm"] - none.backward["bmm"] == N_LAYER
    assert meg.backward["bernoulli_"] >= N_LAYER
    # Not the qkv projection, not the MLP's first layer, not the GELU.
    assert meg.backward_shapes[("addmm", (TOKENS, 3 * D_MODEL))] == 0
    assert meg.backward_shapes[("addmm", (TOKENS, 4 * D_MODEL))] == 0
    assert meg.backward["gelu"] == 0
    # The norms' outputs are kept too, though not always (see
    # test_megatron_live_bytes_after_forward_match_the_retentions): at most one reruns here.
    assert meg.backward["native_layer_norm"] <= 1
    assert none_flops < meg_flops < gpt_counts["full"][1]


def test_megatron_reruns_no_linear_layer(gpt_counts: dict[str, tuple[OpCounter, int]]) -> None:
    (none, none_flops), (meg, meg_flops) = gpt_counts["none"], gpt_counts["megatron"]
    assert meg.backward["addmm"] == none.backward["addmm"] == 0
    # Only Q K^T runs again: B * H * T * T * (D / H) multiply-adds per block.
    cfg = SMALL["gpt"]
    qk_flops = 2 * cfg["batch"] * cfg["seq"] * cfg["seq"] * cfg["d_model"]
    assert meg_flops - none_flops == N_LAYER * qk_flops


def test_megatron_reruns_the_fused_attention_kernel() -> None:
    # Without dropout the GPT's attention is one fused kernel on the CPU: it runs again.
    none, _ = counted_step("gpt", lambda u: baseline_plan("none", u), dropout=0.0)
    with storage_ids(reuse=False):
        meg, _ = counted_step("gpt", lambda u: baseline_plan("megatron", u), dropout=0.0)
    fused = [op for op in meg.forward if op.startswith("_scaled_dot_product")]
    assert len(fused) == 1, meg.forward
    assert meg.forward[fused[0]] == meg.backward[fused[0]] == N_LAYER
    assert none.backward[fused[0]] == 0
    assert meg.backward["gelu"] == 0 and meg.backward["native_layer_norm"] <= 1
    assert meg.backward_shapes[("addmm", (TOKENS, 3 * D_MODEL))] == 0


def test_kept_dropout_masks_are_not_drawn_again() -> None:
    # Keeping the masks' last writer (div_) keeps each dropout's mask whole: the backward draws
    # no random numbers, and what else autograd saved runs again.
    policy = lambda units: Plan(  # noqa: E731
        actions=dict.fromkeys(units, "selective:ops.div_"), units=units
    )
    with storage_ids(reuse=False):
        counts, _ = counted_step("gpt", policy)
    assert counts.forward["bernoulli_"] == 3 * N_LAYER + 1  # embedding dropout outside units
    assert counts.backward["bernoulli_"] == 0
    # The qkv and first MLP layer's outputs are saved and not kept: they run again.
    assert counts.backward_shapes[("addmm", (TOKENS, 3 * D_MODEL))] == N_LAYER
    assert counts.backward_shapes[("addmm", (TOKENS, 4 * D_MODEL))] == N_LAYER
    assert two_steps_equal("gpt", policy)


def test_offload_recomputes_nothing(gpt_counts: dict[str, tuple[OpCounter, int]]) -> None:
    (none, none_flops), (off, off_flops) = gpt_counts["none"], gpt_counts["offload"]
    assert {op: n for op, n in off.backward.items() if op not in COPIES} == {
        op: n for op, n in none.backward.items() if op not in COPIES
    }
    assert off.backward["clone"] > none.backward["clone"]  # the copies back from host
    assert off_flops == none_flops


@pytest.mark.parametrize(("name", "heavy"), [("mlp", "addmm"), ("cnn", "convolution")])
def test_op_sets_on_models_without_attention(name: str, heavy: str) -> None:
    # An op set that keeps the matmul / convolution outputs reruns only the cheap ops after them.
    none, none_flops = counted_step(name, every_unit("keep"))
    chosen, chosen_flops = counted_step(name, every_unit(f"selective:{OP_SETS[name]}"))
    full, full_flops = counted_step(name, every_unit("recompute"))
    assert chosen.backward[heavy] == none.backward[heavy]
    assert chosen_flops == none_flops
    assert full.backward[heavy] > none.backward[heavy] and full_flops > none_flops
    # save_matmuls keeps matmuls and attention outputs only, so convolutions run again.
    saved, _ = counted_step(name, every_unit("selective:save_matmuls"))
    if heavy == "addmm":
        assert saved.backward["addmm"] == 0
    else:
        assert saved.backward["convolution"] == full.backward["convolution"]


def _megatron_kept_bytes(*, reuse: bool | None) -> list[int]:
    built = build("gpt")
    units = find_units(built.model)
    with storage_ids(reuse=reuse), apply_(built.model, baseline_plan("megatron", units)):
        step(built, STEP_SEED)
        regions = [built.model.get_submodule(u).__dict__["forward"].__remat_region__ for u in units]
        return [sum(region.last_kept_bytes.values()) for region in regions]


def test_megatron_keeps_the_same_whatever_the_ids() -> None:
    unique = _megatron_kept_bytes(reuse=False)
    assert len(set(unique)) == 1 and unique[0] > 0  # identical blocks keep the same
    # torch's storage identities: the op log holds a weak reference to every storage it saw
    # made, so no later storage of the step takes a dead one's identity
    assert _megatron_kept_bytes(reuse=None) == unique


# ------------------------------------------------------------------ 3. memory: predictions

PROFILE_GPT = {"n_layer": 4, "d_model": 64, "n_head": 4, "seq": 64, "batch": 4, "vocab": 256}
OPTIONS = ["selective:save_matmuls", "selective:megatron", "offload"]


def _measure(built: BuiltModel, plan: Plan) -> int:
    with storage_ids(reuse=False), apply_(built.model, plan):
        torch.manual_seed(STEP_SEED)
        return measure_step(built.model, built.example_inputs, loss_fn=built.loss_fn).peak_bytes


def _oracle(built: BuiltModel, plan: Plan) -> int:
    """The step's peak by tests/memory_oracle.py, outside remat."""
    with apply_(built.model, plan):
        return oracle_step_peak(built.model, built.example_inputs, loss_fn=built.loss_fn)


@pytest.fixture(scope="module")
def gpt_profile() -> tuple[BuiltModel, remat.Profile]:
    torch.manual_seed(BUILD_SEED)
    built = build_builtin("gpt", **PROFILE_GPT)
    with storage_ids(reuse=False):
        prof = remat.profile(
            built.model,
            built.example_inputs,
            loss_fn=built.loss_fn,
            options=[*OPTIONS, "selective:auto"],
            warmup=0,
            repeats=1,
        )
    return built, prof


def test_profile_measures_each_option_for_each_unit(
    gpt_profile: tuple[BuiltModel, remat.Profile],
) -> None:
    _, prof = gpt_profile
    for unit in prof.units:
        actions = [o.action for o in unit.options]
        for option in OPTIONS:
            assert option in actions, (unit.fqn, actions)
        sm, meg = unit.option("selective:save_matmuls"), unit.option("selective:megatron")
        off = unit.option("offload")
        assert sm is not None and meg is not None and off is not None
        # Each option holds less than keeping the unit and more than recomputing it.
        for option in (sm, meg):
            assert unit.recompute_bytes < option.retain_bytes < unit.keep_bytes, option
            assert option.saved_bytes > 0
        # save_matmuls replays no matmul (no FLOPs), megatron part of the forward's; megatron
        # holds more (the attention core's inputs are not recomputed from the block's input).
        assert sm.cost_flops == 0
        assert 0 < meg.cost_flops < unit.forward_flops
        assert meg.retain_bytes > sm.retain_bytes
        assert off.retain_bytes < unit.keep_bytes and off.saved_bytes > 0
    # The profile round-trips with its options.
    assert remat.Profile.from_json(prof.to_json()) == prof


def test_auto_save_sets_name_ops_by_device_independent_family(
    gpt_profile: tuple[BuiltModel, remat.Profile],
) -> None:
    """``selective:auto`` on the CPU names no CPU kernel: any attention it keeps is ``attention``
    (``_scaled_dot_product_flash_attention_for_cpu`` on the CPU, one of three kernels on CUDA),
    the softmax ``softmax`` and the norms ``layer_norm``, so the plan means the same on CUDA."""
    _, prof = gpt_profile
    auto = {
        o.action for u in prof.units for o in u.options if o.action.startswith("selective:ops.")
    }
    assert len(auto) >= 2, auto
    names = {n for action in auto for n in action.split(":")[1].split(".")[1:]}
    assert {canonical_op(n) for n in names} == names, names
    assert names & set(OP_FAMILIES), names  # softmax here: _safe_softmax on this path
    assert not any("_for_cpu" in n or n.startswith(("native_", "_safe")) for n in names), names


@pytest.mark.parametrize("strategy", ["none", "megatron", "save_matmuls", "offload", "mixed"])
def test_predicted_peak_matches_measured(
    strategy: str, gpt_profile: tuple[BuiltModel, remat.Profile]
) -> None:
    built, prof = gpt_profile
    if strategy == "mixed":
        units = prof.unit_fqns
        actions = ["selective:megatron", "offload", "recompute", "selective:save_matmuls"]
        plan = Plan(actions=dict(zip(units, actions, strict=True)), units=units)
    else:
        plan = baseline_plan(strategy, prof.unit_fqns)
    predicted = remat.simulate(prof, plan).peak_bytes
    measured = _measure(built, plan)
    # to the byte: none, megatron, save_matmuls and offload on every unit are plans the profile
    # measured; mixed is composed from four of them, which the simulator claims exactly too
    assert predicted == measured, f"{strategy}: predicted {predicted:,} measured {measured:,}"
    if strategy not in ("offload", "mixed"):  # the oracle counts host copies: the CPU's memory
        assert _oracle(built, plan) == measured


@pytest.mark.parametrize("budget", ["80%", "60%", "40%"])
def test_solver_plans_with_options_fit_and_match_measurement(
    budget: str, gpt_profile: tuple[BuiltModel, remat.Profile]
) -> None:
    built, prof = gpt_profile
    result = remat.solve(prof, budget)
    assert result.status != "INFEASIBLE"
    measured = _measure(built, result.plan)
    assert result.predicted_peak_bytes == measured, (budget, result.plan.actions)
    # no slack: the solver's plan (no closed loop here) fits its budget when measured, by the
    # oracle where no host copy (offload) is in it, which the oracle would count on the CPU
    offloads = any(a.kind == "offload" for a in result.plan.actions.values())
    assert (measured if offloads else _oracle(built, result.plan)) <= result.budget_bytes


def test_solver_uses_selective_or_offload_somewhere(
    gpt_profile: tuple[BuiltModel, remat.Profile],
) -> None:
    # By FLOPs (what a GPU run of a large model looks like), keeping matmuls and recomputing the
    # rest is cheap. The measured costs of this tiny model are mostly the op log's dispatch, so
    # whether they pay off there depends on the machine: test_solver_weighs_measured_option_costs.
    _, prof = gpt_profile
    by_flops = dataclasses.replace(prof, time_source="flops")
    kinds = {
        a.kind
        for budget in ("80%", "60%", "40%")
        for a in remat.solve(by_flops, budget).plan.actions.values()
    }
    assert kinds & {"selective", "offload"}, kinds


def test_solver_weighs_measured_option_costs(
    gpt_profile: tuple[BuiltModel, remat.Profile],
) -> None:
    # Each selective option's measured cost covers at least the share of the unit's forward that
    # its replay runs, and the solver's cost of a plan is the sum of what it chose.
    _, prof = gpt_profile
    for unit in prof.units:
        for option in unit.options:
            if option.action.startswith("selective:"):
                # each replays some of the unit's ops: it costs time (a cost of 0 would make
                # it free to the solver), and never more FLOPs than the unit's whole forward
                # (save_matmuls replays only ops without counted FLOPs: 0)
                assert option.cost_ms is not None and option.cost_ms > 0.0, (unit.fqn, option)
                assert 0.0 <= option.cost_flops <= unit.forward_flops, (unit.fqn, option)
                if option.action == "selective:megatron":
                    assert option.cost_flops > 0.0, (unit.fqn, option)  # it replays matmuls
    result = remat.solve(prof, "60%")
    recomputed = sum(
        next(o.cost_ms for o in unit.options if o.action == str(result.plan.action_for(fqn)))
        if result.plan.action_for(fqn).kind in ("selective", "offload")
        else 0.0
        for fqn, unit in zip(prof.unit_fqns, prof.units, strict=True)
    )
    assert result.predicted_step_ms >= prof.step_ms + recomputed - 1e-6


def test_solver_plan_with_options_is_bitwise_equal(
    gpt_profile: tuple[BuiltModel, remat.Profile],
) -> None:
    _, prof = gpt_profile
    by_flops = dataclasses.replace(prof, time_source="flops")
    plans = [remat.solve(by_flops, b).plan for b in ("80%", "60%", "40%")]
    chosen = next(
        (p for p in plans if any(a.kind in ("selective", "offload") for a in p.actions.values())),
        None,
    )
    assert chosen is not None, [p.actions for p in plans]
    actions = {fqn: str(chosen.action_for(fqn)) for fqn in prof.unit_fqns}
    two_steps_equal("gpt", lambda units: Plan(actions=actions, units=units), **PROFILE_GPT)


def retained_by(prof: remat.Profile, action: str) -> int:
    """What the profile says every unit under ``action`` leaves alive after its forward."""
    options = [unit.option(action) for unit in prof.units]
    assert all(option is not None for option in options), action
    return sum(option.retain_bytes for option in options if option is not None)


def _retained_by_the_forward(built: BuiltModel, plan: Plan, units: list[str]) -> int:
    """Live bytes when the last unit's forward ends less those when the first unit's starts."""
    first = built.model.get_submodule(units[0])
    last = built.model.get_submodule(units[-1])
    seen: list[int] = []
    with (
        storage_ids(reuse=False),
        apply_(built.model, plan),
        remat.track_memory(built.model, built.example_inputs) as tracker,
    ):
        handles = [
            first.register_forward_pre_hook(lambda *_: seen.append(tracker.current_bytes)),
            last.register_forward_hook(lambda *_: seen.append(tracker.current_bytes)),
        ]
        try:
            torch.manual_seed(STEP_SEED)
            built.loss_fn(built.model(*built.example_inputs)).backward()
        finally:
            for handle in handles:
                handle.remove()
    for param in built.model.parameters():
        param.grad = None
    return seen[1] - seen[0]


def test_live_bytes_after_forward_match_the_retentions(
    gpt_profile: tuple[BuiltModel, remat.Profile],
) -> None:
    # After the forward (before backward), each plan leaves alive what the profile measured for
    # it, unit by unit: exactly.
    built, prof = gpt_profile
    units = prof.unit_fqns
    for option in ("selective:save_matmuls", "offload"):
        plan = baseline_plan(option.removeprefix("selective:"), units)
        assert _retained_by_the_forward(built, plan, units) == retained_by(prof, option), option
    kept = sum(u.keep_bytes for u in prof.units)
    assert _retained_by_the_forward(built, baseline_plan("none", units), units) == kept


def test_megatron_live_bytes_after_forward_match_the_retentions(
    gpt_profile: tuple[BuiltModel, remat.Profile],
) -> None:
    built, prof = gpt_profile
    retained = retained_by(prof, "selective:megatron")
    for _ in range(3):
        plan = baseline_plan("megatron", prof.unit_fqns)
        assert _retained_by_the_forward(built, plan, prof.unit_fqns) == retained


# --------------------------------------------------------------------- 4. offload on the CPU


def test_offload_counts_host_bytes_apart() -> None:
    peaks, hosts, offloaded = {}, {}, {}
    for strategy in ("none", "offload"):
        built = build("gpt", dropout=0.0, seq=64)
        units = find_units(built.model)
        with apply_(built.model, baseline_plan(strategy, units)):
            with remat.track_memory(built.model, built.example_inputs) as tracker:
                step(built, STEP_SEED)
            if strategy == "offload":
                modules = dict(built.model.named_modules())
                offloaded[strategy] = sum(
                    modules[u].__dict__["forward"].__remat_region__.last_offloaded_bytes
                    for u in units
                )
        peaks[strategy], hosts[strategy] = tracker.peak_bytes, tracker.host_peak_bytes
        assert tracker.report().host_peak_bytes == tracker.host_peak_bytes
    assert hosts["none"] == 0
    assert hosts["offload"] > 0
    # Every unit's offloaded tensors are on the host together when the forward ends.
    assert hosts["offload"] == offloaded["offload"]
    assert peaks["offload"] < peaks["none"], peaks


# ------------------------------------------------------------------------------- 5. solver


def test_options_never_make_the_solver_slower(
    gpt_profile: tuple[BuiltModel, remat.Profile],
) -> None:
    """More actions never cost more, under measured times and under FLOPs. That the options pay
    off somewhere is checked in FLOPs only: with one timed round on this small GPT, the op log's
    own work can make every option dearer than recompute (docs/planner.md), and whether one
    round says so is noise."""
    _, measured = gpt_profile
    in_flops = dataclasses.replace(measured, time_source="flops")
    whole_units = ("keep", "recompute", "segment", "nested")
    strictly = 0
    for prof in (measured, in_flops):
        for budget in ("80%", "60%", "40%"):
            with_options = remat.solve(prof, budget)
            without = remat.solve(prof, budget, actions=whole_units)
            assert with_options.status != "INFEASIBLE"
            assert with_options.cost <= without.cost + 1e-9, (
                budget,
                with_options.cost,
                without.cost,
            )
            sim_with = remat.simulate(prof, with_options.plan)
            sim_without = remat.simulate(prof, without.plan)
            assert sim_with.recompute_cost <= sim_without.recompute_cost + 1e-9
            assert sim_with.peak_bytes <= with_options.budget_bytes
            assert all(a.kind in whole_units for a in without.plan.actions.values())
            if prof is in_flops:
                strictly += with_options.cost < without.cost
    assert strictly >= 1, "the options pay off at some budget"


def test_keep_recompute_only_yields_no_options(
    gpt_profile: tuple[BuiltModel, remat.Profile],
) -> None:
    _, prof = gpt_profile
    for budget in ("80%", "60%", "40%", "min"):
        result = remat.solve(prof, budget, actions=("keep", "recompute"))
        kinds = {a.kind for a in result.plan.actions.values()}
        assert kinds <= {"keep", "recompute"}, (budget, kinds)
    only_selective = remat.solve(prof, "40%", actions=("keep", "selective"))
    assert {a.kind for a in only_selective.plan.actions.values()} <= {"keep", "selective"}


def test_simulate_refuses_an_option_the_profile_lacks(
    gpt_profile: tuple[BuiltModel, remat.Profile],
) -> None:
    _, prof = gpt_profile
    plan = Plan(actions={prof.unit_fqns[0]: "selective:ops.gelu"})
    with pytest.raises(ValueError, match="no measurement"):
        remat.simulate(prof, plan)
    bare = remat.profile(
        nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.GELU()) for _ in range(3)]),
        (torch.randn(4, 8),),
        options=(),
        repeats=0,
    )
    assert all(not u.options for u in bare.units)
    with pytest.raises(ValueError, match="offload"):
        remat.simulate(bare, baseline_plan("offload", bare.unit_fqns))
    kinds = {a.kind for a in remat.solve(bare, "min").plan.actions.values()}
    assert not kinds & {"selective", "offload"}


class _ConvBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv1d(16, 16, 3, padding=1), nn.BatchNorm1d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.norm(self.conv(x)))


class _AttentionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.qkv = nn.LayerNorm(16), nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm(x.transpose(1, 2))).chunk(3, dim=-1)
        return x + nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def test_profiling_mixed_blocks_says_nothing_about_save_sets_another_block_runs() -> None:
    # Each save set is measured on every unit, and a conv block runs none of an attention
    # block's ops: each unit's options name only its own ops, and nothing is warned about.
    torch.manual_seed(0)
    model = nn.Sequential(*[_ConvBlock() if i % 2 == 0 else _AttentionBlock() for i in range(4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prof = remat.profile(model, (torch.randn(4, 16, 32),), optimizer="sgd", repeats=0)

    def ops(fqn: str) -> set[str]:
        unit = next(u for u in prof.units if u.fqn == fqn)
        labels = [o.action.removeprefix("selective:ops.") for o in unit.options]
        return {
            op
            for label in labels
            if "." in label or label.isidentifier()
            for op in label.split(".")
        }

    assert "convolution" in ops("0") and "convolution" not in ops("1")
    assert "softmax" in ops("1") and "softmax" not in ops("0")
