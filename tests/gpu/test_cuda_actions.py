"""Offload with pinned memory and a side stream, selective recompute with CUDA's fused attention
kernels, and bf16 autocast, on CUDA.

Gradients are compared bit for bit under deterministic kernels (the ``deterministic`` fixture of
conftest.py): without it the fused attention backward accumulates with atomics and two runs of the
same model differ, remat or not.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import remat
from remat._compat import TorchDispatchMode
from remat.apply.units import call_model
from remat.models import build_builtin
from remat.profiling.step import default_loss, measure_step
from remat.solve.baselines import STRATEGIES

GPT = {"n_layer": 4, "d_model": 256, "n_head": 8, "seq": 256, "batch": 8}
CUDA_ATTENTION = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)
"""The fused attention kernels ``F.scaled_dot_product_attention`` runs on CUDA (forward)."""


def _gpt(dtype: torch.dtype = torch.float32) -> remat.models.BuiltModel:
    torch.manual_seed(0)
    with torch.device("cuda"):
        built = build_builtin("gpt", **GPT)
    built.model.to(dtype)
    return built


def _grads_after_step(model: torch.nn.Module, inputs: object, autocast: bool = False) -> list:
    torch.manual_seed(1)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = default_loss(call_model(model, inputs))
    loss.backward()
    torch.cuda.synchronize()
    return [p.grad.clone() for p in model.parameters()]


def _plan(action: str, model: torch.nn.Module) -> remat.Plan:
    units = remat.find_units(model)
    if action in STRATEGIES:
        return remat.baseline_plan(action, units)
    return remat.Plan(actions=dict.fromkeys(units, action), units=units)


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("strategy", ["offload", "megatron", "save_matmuls", "full"])
def test_gradients_equal_on_cuda(strategy: str) -> None:
    built = _gpt()
    reference = copy.deepcopy(built.model)
    expected = _grads_after_step(reference, built.example_inputs)
    handle = remat.apply_(built.model, _plan(strategy, built.model))
    got = _grads_after_step(built.model, built.example_inputs)
    handle.remove()
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


def test_offload_uses_pinned_memory_and_a_side_stream() -> None:
    from remat.apply.selective import Offloader

    x = torch.randn(1024, 1024, device="cuda", requires_grad=True)
    off = Offloader()
    with torch.autograd.graph.saved_tensors_hooks(off.pack, off.unpack):
        y = (x * 2).exp()
    host = [entry[0] for entry in off.entries if entry[0] is not None]
    assert host and all(t.is_pinned() and t.device.type == "cpu" for t in host)
    assert off._stream is not None and off._stream != torch.cuda.current_stream()
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * y.detach())


def test_offload_lowers_the_cuda_peak_and_the_profile_predicts_it() -> None:
    built = _gpt()
    units = remat.find_units(built.model)
    prof = remat.profile(built.model, built.example_inputs, options=["offload"], repeats=1)
    none_peak = measure_step(built.model, built.example_inputs).peak_bytes
    plan = remat.baseline_plan("offload", units)
    with remat.apply_(built.model, plan):
        measured = measure_step(built.model, built.example_inputs).peak_bytes
    assert measured < none_peak
    predicted = remat.simulate(prof, plan).peak_bytes
    assert abs(predicted - measured) <= 0.02 * measured, (predicted, measured)


class _KernelCount(TorchDispatchMode):
    """Counts the forward attention kernels that run (the oracle: the dispatcher, not remat)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name.startswith("_scaled_dot_product") and not name.endswith("_backward"):
            self.calls[name] = self.calls.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("action", "runs_per_layer"),
    [("keep", 1), ("recompute", 2), ("selective:megatron", 2), ("selective:ops.attention", 1)],
)
def test_selective_keeps_or_replays_the_cuda_attention_kernel(
    action: str, runs_per_layer: int, dtype: torch.dtype
) -> None:
    """A save set naming ``attention`` keeps the output of whichever fused kernel CUDA runs
    (flash in bf16, memory-efficient in fp32; cuDNN's has no deterministic mode), so the replay
    does not run it again; Megatron's policy recomputes the attention core, so it runs twice.
    Gradients stay equal."""
    built = _gpt(dtype)
    reference = copy.deepcopy(built.model)
    expected = _grads_after_step(reference, built.example_inputs)
    handle = remat.apply_(built.model, _plan(action, built.model))
    counter = _KernelCount()
    with counter:
        got = _grads_after_step(built.model, built.example_inputs)
    handle.remove()
    kernels = set(counter.calls)
    assert kernels and kernels <= set(CUDA_ATTENTION), counter.calls
    assert sum(counter.calls.values()) == runs_per_layer * GPT["n_layer"], counter.calls
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)


@pytest.mark.usefixtures("deterministic")
@pytest.mark.parametrize("strategy", ["full", "megatron", "offload"])
def test_bf16_autocast_gradients_equal(strategy: str) -> None:
    built = _gpt()
    reference = copy.deepcopy(built.model)
    expected = _grads_after_step(reference, built.example_inputs, autocast=True)
    handle = remat.apply_(built.model, _plan(strategy, built.model))
    got = _grads_after_step(built.model, built.example_inputs, autocast=True)
    handle.remove()
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
