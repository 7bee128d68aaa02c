"""torch.compile per block on a planned model: the gradients of the unplanned model.

remat's recomputed units are compiled inside remat's wrapper (``remat.compile_units_``), so the
forward and its replay in backward run one compiled graph; ``module.compile()`` on a recomputed unit
is refused at replay (CheckpointMismatchError), which this file shows too.
"""

from __future__ import annotations

import copy

import pytest
import torch

import remat
from remat.apply.checkpoint import CheckpointMismatchError
from remat.apply.compile import compile_units_
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


def test_module_compile_after_apply_is_refused_at_replay(built: object) -> None:
    # Why compile_units_ exists: dynamo compiles the original forward as a nested frame with its
    # own saved tensors, while the replay in backward runs eagerly; remat notices, never hides it.
    model = copy.deepcopy(built.model)
    remat.apply_(model, remat.Plan(actions={"blocks.0": "recompute"}))
    model.blocks[0].compile(backend="aot_eager")
    loss = built.loss_fn(model(*built.example_inputs))
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.0"):
        loss.backward()


def test_compile_units_refuses_a_unit_already_compiled(built: object) -> None:
    model = copy.deepcopy(built.model)
    handle = remat.apply_(model, remat.Plan(actions={"blocks.0": "recompute"}))
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
    grads = planned_and_compiled(built, remat.Plan(actions=PLANS["recompute"]), "inductor")
    reference = compiled_reference(built, "inductor")
    eager = grads_of(copy.deepcopy(built.model), built)
    for name, grad in reference.items():
        # Same kernels with and without the plan; inductor's fused kernels reorder float sums
        # against eager, hence a tolerance there.
        assert torch.equal(grads[name], grad), name
        torch.testing.assert_close(grads[name], eager[name], rtol=1e-4, atol=1e-6)
