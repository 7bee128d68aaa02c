"""torch.compile on a planned model: the gradients of the unplanned model compiled the same way.

Per block (``remat.compile_units_``, each unit ``module.compile()``-d), over the whole model
(``torch.compile(model)``, ``model.compile()``, as HF Trainer and accelerate do) or over one planned
unit (``module.compile()``), dynamo traces remat's wrapper, which then runs each planned unit as
``torch.utils.checkpoint`` (a save set as torch's selective checkpoint policy): the compiled
backward recomputes it, and saves less; remat's eager engine does not run.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch.utils.checkpoint import checkpoint

import remat
from remat.apply.compile import compile_units_
from remat.models import build_builtin
from remat.models.gpt import build

SIZES = {"batch": 2, "seq": 8, "n_layer": 3, "d_model": 16, "n_head": 2, "vocab": 32}


@pytest.fixture
def built() -> object:
    torch._dynamo.reset()  # compiled graphs are cached per code object: start clean
    torch.manual_seed(0)
    return build(dropout=0.0, **SIZES)


def grads_of(model: torch.nn.Module, built: object) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    built.loss_fn(model(*built.example_inputs)).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def planned_and_compiled(built: object, plan: remat.Plan, backend: str) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(built.model)
    handle = remat.apply_(model, plan)
    inside = compile_units_(model, handle, backend=backend)
    assert inside == handle.checkpointed
    grads = grads_of(model, built)
    again = grads_of(model, built)  # a second step reuses the compiled graphs
    for name in grads:
        assert torch.equal(grads[name], again[name]), name
    return grads


def compiled_reference(built: object, backend: str) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(built.model)
    compile_units_(model, remat.find_units(model), backend=backend)
    return grads_of(model, built)


PLANS = {
    "recompute": {"blocks.0": "recompute", "blocks.2": "recompute"},
    "segment": {"blocks.0": "segment:a", "blocks.1": "segment:a"},
}


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_aot_eager_per_block_gradients_equal_unplanned(built: object, plan: str) -> None:
    grads = planned_and_compiled(built, remat.Plan(actions=PLANS[plan]), "aot_eager")
    reference = compiled_reference(built, "aot_eager")
    eager = grads_of(copy.deepcopy(built.model), built)
    for name, grad in reference.items():
        # The same compiled graphs with and without the plan: bitwise.
        assert torch.equal(grads[name], grad), name
        # aot_eager runs the same aten ops as eager, but its backward is a traced graph whose
        # accumulation order may differ: tight tolerance against eager.
        torch.testing.assert_close(grads[name], eager[name], rtol=1e-5, atol=1e-7)


def test_module_compile_of_a_planned_unit_gives_unplanned_gradients(built: object) -> None:
    # module.compile() over remat's wrapper: dynamo traces the wrapper, which runs the unit as
    # torch.utils.checkpoint inside the compiled graph (remat's own replay would run eagerly).
    model = copy.deepcopy(built.model)
    remat.apply_(model, remat.Plan(actions={"blocks.0": "recompute"}))
    model.blocks[0].compile(backend="aot_eager")
    reference = copy.deepcopy(built.model)
    reference.blocks[0].compile(backend="aot_eager")
    grads, expected = grads_of(model, built), grads_of(reference, built)
    for name, grad in expected.items():
        assert torch.equal(grads[name], grad), name


def test_compile_units_refuses_an_offload_unit_already_compiled(built: object) -> None:
    # An offload unit is compiled inside remat's wrapper: compiling one already module.compile()-d
    # would nest two compiles. A recomputed unit is module.compile()-d again, harmlessly.
    model = copy.deepcopy(built.model)
    plan = remat.Plan(actions={"blocks.0": "offload", "blocks.1": "recompute"})
    handle = remat.apply_(model, plan)
    model.blocks[1].compile(backend="eager")
    model.blocks[0].compile(backend="eager")
    with pytest.raises(ValueError, match="compile_units_"):
        compile_units_(model, handle, backend="eager")


def test_remove_restores_the_uncompiled_forward(built: object) -> None:
    model = copy.deepcopy(built.model)
    handle = remat.apply_(model, remat.Plan(actions={"blocks.1": "recompute"}))
    compile_units_(model, handle, backend="eager")
    handle.remove()
    assert "forward" not in model.blocks[1].__dict__


@pytest.mark.slow
def test_inductor_per_block_gradients_equal_unplanned(built: object) -> None:
    # The one per-unit inductor test: a recomputed and a selective unit (a save set the solver
    # would write) beside a kept one.
    plan = remat.Plan(actions={"blocks.0": "recompute", "blocks.2": "selective:ops.addmm.add"})
    grads = planned_and_compiled(built, plan, "inductor")
    reference = compiled_reference(built, "inductor")
    eager = grads_of(copy.deepcopy(built.model), built)
    for name, grad in reference.items():
        # Bitwise against the unplanned units compiled alike (as on torch 2.13, CPU); inductor's
        # fused kernels reorder float sums against eager, hence a tolerance there.
        assert torch.equal(grads[name], grad), name
        torch.testing.assert_close(grads[name], eager[name], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- whole-model compile
# The built-in GPT with its default dropout (0.1): the compiled recompute must draw what the
# forward drew. Steps are seeded, so the planned and unplanned models draw the same masks.
WHOLE = {"n_layer": 2, "d_model": 32, "n_head": 2, "seq": 16, "batch": 2}
WHOLE_PLANS = {
    "full": lambda units: remat.baseline_plan("full", units),
    "selective": lambda units: remat.baseline_plan("save_matmuls", units),
    "segment": lambda units: remat.Plan(actions=dict.fromkeys(units, "segment:a"), units=units),
}


@pytest.fixture(scope="module")
def gpt() -> object:
    torch.manual_seed(0)
    return build_builtin("gpt", **WHOLE)


def compiled_step(
    model: torch.nn.Module, call: torch.nn.Module, gpt: object, seed: int
) -> tuple[dict[str, torch.Tensor], int]:
    """One seeded step of ``call`` (the compiled model): gradients, and the bytes of the distinct
    storages autograd saved for backward, parameters aside."""
    parameters = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in parameters:
            storage = tensor.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = gpt.loss_fn(call(*gpt.example_inputs))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}, sum(saved.values())


def whole_compiled(model: torch.nn.Module, how: str) -> torch.nn.Module:
    if how == "torch.compile":
        return torch.compile(model, backend="aot_eager")
    model.compile(backend="aot_eager")
    return model


@pytest.fixture(scope="module")
def unplanned(gpt: object) -> list[tuple[dict[str, torch.Tensor], int]]:
    """Two steps of the unplanned GPT under torch.compile (aot_eager)."""
    torch._dynamo.reset()
    model = copy.deepcopy(gpt.model)
    call = whole_compiled(model, "torch.compile")
    return [compiled_step(model, call, gpt, seed) for seed in (1, 2)]


def assert_bitwise(grads: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert grads.keys() == expected.keys()
    for name, grad in expected.items():
        assert torch.equal(grads[name], grad), name


@pytest.mark.parametrize("how", ["torch.compile", "model.compile"])
@pytest.mark.parametrize("plan", sorted(WHOLE_PLANS))
def test_whole_model_compile_gradients_equal_compiled_unplanned(
    gpt: object, unplanned: list[tuple[dict[str, torch.Tensor], int]], plan: str, how: str
) -> None:
    torch._dynamo.reset()
    model = copy.deepcopy(gpt.model)
    handle = remat.apply_(model, WHOLE_PLANS[plan](remat.find_units(model)))
    assert handle.checkpointed == ["blocks.0", "blocks.1"]
    call = whole_compiled(model, how)
    for seed, (expected, unplanned_bytes) in zip((1, 2), unplanned, strict=True):
        grads, saved_bytes = compiled_step(model, call, gpt, seed)
        assert_bitwise(grads, expected)  # a second step reuses the compiled graph
        assert saved_bytes < unplanned_bytes, (saved_bytes, unplanned_bytes)


def test_whole_model_compile_saves_what_torch_checkpoint_saves(gpt: object) -> None:
    # The full plan under torch.compile is each block in torch.utils.checkpoint: same graph, so the
    # same saved bytes and gradients as the blocks checkpointed by hand.
    torch._dynamo.reset()
    by_hand = copy.deepcopy(gpt.model)
    for block in by_hand.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    expected = compiled_step(by_hand, whole_compiled(by_hand, "torch.compile"), gpt, seed=1)
    torch._dynamo.reset()
    model = copy.deepcopy(gpt.model)
    remat.apply_(model, remat.baseline_plan("full", remat.find_units(model)))
    grads, saved_bytes = compiled_step(model, whole_compiled(model, "torch.compile"), gpt, seed=1)
    assert_bitwise(grads, expected[0])
    assert saved_bytes == expected[1]


def test_apply_to_a_compiled_model_plans_the_model_inside(
    gpt: object, unplanned: list[tuple[dict[str, torch.Tensor], int]]
) -> None:
    # accelerate and HF Trainer may hand remat the OptimizedModule, after it has run: apply_ plans
    # its _orig_mod (unit names without the "_orig_mod." prefix), dynamo traces again, and
    # remove() goes back to the unplanned graph.
    torch._dynamo.reset()
    model = copy.deepcopy(gpt.model)
    call = whole_compiled(model, "torch.compile")
    (expected, unplanned_bytes), (expected_2, _) = unplanned
    assert_bitwise(compiled_step(model, call, gpt, seed=1)[0], expected)
    handle = remat.apply_(call, remat.baseline_plan("full", remat.find_units(model)))
    assert handle.checkpointed == ["blocks.0", "blocks.1"]
    grads, saved_bytes = compiled_step(model, call, gpt, seed=2)
    assert_bitwise(grads, expected_2)
    assert saved_bytes < unplanned_bytes
    handle.remove()
    grads, saved_bytes = compiled_step(model, call, gpt, seed=1)
    assert_bitwise(grads, expected)
    assert saved_bytes == unplanned_bytes


@pytest.mark.slow
def test_inductor_whole_model_gradients_equal_compiled_unplanned(gpt: object) -> None:
    steps = {}
    for planned in (False, True):
        torch._dynamo.reset()
        model = copy.deepcopy(gpt.model)
        if planned:
            remat.apply_(model, remat.baseline_plan("full", remat.find_units(model)))
        call = torch.compile(model, backend="inductor")
        steps[planned] = compiled_step(model, call, gpt, seed=1)
    # Inductor regenerates dropout's masks from the forward's seeds when it recomputes.
    assert_bitwise(steps[True][0], steps[False][0])
    assert steps[True][1] < steps[False][1]


# ------------------------------------------------------- per-unit compile: the compiler applies it
# The built-in GPT with dropout and the CNN (batch norm), each unit compiled with compile_units_:
# the plan runs as torch.utils.checkpoint inside each unit's compiled graph, remat's engine not at
# all, and the gradients are the compiled unplanned model's bit for bit (aot_eager).
TINY = {
    "gpt": {"n_layer": 2, "d_model": 32, "n_head": 2, "seq": 16, "batch": 2},
    "cnn": {"batch": 2, "image_size": 8, "channels": (4, 8), "blocks_per_stage": 1},
}
UNIT_PLANS = [
    ("gpt", "selective:ops.addmm.add.div_"),
    ("gpt", "nested:a"),
    ("cnn", "selective:ops.convolution"),
]


@pytest.fixture(scope="module")
def tiny() -> dict[str, object]:
    torch.manual_seed(0)
    return {name: build_builtin(name, **sizes) for name, sizes in TINY.items()}


@pytest.fixture(scope="module")
def unplanned_per_unit(tiny: dict[str, object]) -> dict[str, tuple[dict[str, torch.Tensor], int]]:
    """Each tiny model with every unit compiled (aot_eager), no plan: one seeded step."""
    steps = {}
    for name, built_model in tiny.items():
        torch._dynamo.reset()
        model = copy.deepcopy(built_model.model)
        compile_units_(model, remat.find_units(model), backend="aot_eager")
        steps[name] = compiled_step(model, model, built_model, seed=1)
    return steps


def _engine_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """remat's eager engine (op log, checkpoint frames) raises if anything runs it."""
    from remat.apply import checkpoint as engine

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("remat's eager engine ran under compile_units_")

    monkeypatch.setattr(engine, "OpLog", refuse)
    monkeypatch.setattr(engine.Region, "_frame_for", refuse)


@pytest.mark.parametrize(("name", "action"), UNIT_PLANS)
def test_compile_units_applies_the_plan_in_the_compiled_graph(
    tiny: dict[str, object],
    unplanned_per_unit: dict[str, tuple[dict[str, torch.Tensor], int]],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    action: str,
) -> None:
    torch._dynamo.reset()
    built_model = tiny[name]
    model = copy.deepcopy(built_model.model)
    units = remat.find_units(model)
    handle = remat.apply_(model, remat.Plan(actions=dict.fromkeys(units, action), units=units))
    assert compile_units_(model, handle, backend="aot_eager") == units
    _engine_forbidden(monkeypatch)
    expected, unplanned_bytes = unplanned_per_unit[name]
    for _ in range(2):  # the second step reuses the compiled graphs
        grads, saved_bytes = compiled_step(model, model, built_model, seed=1)
        assert_bitwise(grads, expected)
        assert saved_bytes < unplanned_bytes, (saved_bytes, unplanned_bytes)


def _checkpointed(forward: object, context_fn: object) -> object:
    # A function, as remat's wrapper is: with functools.partial of the bound forward instead,
    # this torch showed the policy the eager dropout's ops (bernoulli_, div_), not the traced
    # native_dropout.
    def checkpointed(*args: object) -> object:
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn)

    return checkpointed


def test_compiled_save_set_saves_what_a_hand_written_policy_saves(
    tiny: dict[str, object],
    unplanned_per_unit: dict[str, tuple[dict[str, torch.Tensor], int]],
) -> None:
    # The oracle: each GPT block in torch.utils.checkpoint with a policy written by hand that
    # saves addmm, add and native_dropout (what ops.addmm.add.div_ names on the CPU, where the
    # eager dropout's mask is div_'s output) and recomputes the rest.
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    kept = {aten.addmm.default, aten.add.Tensor, aten.native_dropout.default}

    def policy(_ctx: object, func: object, *_args: object, **_kwargs: object) -> object:
        if func in kept:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    built_model = tiny["gpt"]
    torch._dynamo.reset()
    by_hand = copy.deepcopy(built_model.model)
    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)
    for block in by_hand.blocks:
        block.forward = _checkpointed(block.forward, context_fn)
        block.compile(backend="aot_eager")
    expected = compiled_step(by_hand, by_hand, built_model, seed=1)
    torch._dynamo.reset()
    model = copy.deepcopy(built_model.model)
    units = remat.find_units(model)
    plan = remat.Plan(actions=dict.fromkeys(units, "selective:ops.addmm.add.div_"), units=units)
    compile_units_(model, remat.apply_(model, plan), backend="aot_eager")
    grads, saved_bytes = compiled_step(model, model, built_model, seed=1)
    assert_bitwise(grads, expected[0])
    assert saved_bytes == expected[1]
    assert saved_bytes < unplanned_per_unit["gpt"][1]


def test_compiled_trace_names_ops_as_the_eager_engine(
    tiny: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every op a compiled GPT block runs (dropout on) is named as the eager engine named one of
    # the block's ops on this machine, or is an alias of such ops: a save set written from an
    # eager profile reaches the compiled graph.
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    from remat._compat import TorchDispatchMode
    from remat.apply import checkpoint as engine
    from remat.apply.compile import COMPILED_ALIASES, selective_contexts
    from remat.apply.selective import op_name

    block = copy.deepcopy(tiny["gpt"].model.blocks[0])
    x = torch.randn(2, 16, 32, requires_grad=True)
    eager: set[str] = set()

    class Names(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            eager.add(op_name(func))
            return func(*args, **(kwargs or {}))

    with Names():
        block(x)
    compiled: set[str] = set()

    def spy(policy: str) -> object:
        decide = selective_contexts(policy).args[0]

        def seen(ctx: object, func: object, *args: object, **kwargs: object) -> object:
            compiled.add(op_name(func))
            return decide(ctx, func, *args, **kwargs)

        return functools.partial(create_selective_checkpoint_contexts, seen)

    torch._dynamo.reset()
    monkeypatch.setattr(engine, "selective_contexts", spy)
    holder = torch.nn.Sequential(block)
    remat.apply_(holder, remat.Plan(actions={"0": "selective:ops.addmm"}, units=["0"]))
    compile_units_(holder, ["0"], backend="aot_eager")
    holder(x).sum().backward()
    unnamed = {n for n in compiled - eager if not set(COMPILED_ALIASES.get(n, ())) & eager}
    assert compiled and not unnamed, (sorted(compiled), sorted(eager))
