"""Offload with pinned memory and a side stream, selective recompute and bf16 autocast on CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

import remat
from remat.apply.units import call_model
from remat.models import build_builtin
from remat.profiling.step import default_loss, measure_step

GPT = {"n_layer": 4, "d_model": 256, "n_head": 8, "seq": 256, "batch": 8}


def _gpt() -> remat.models.BuiltModel:
    torch.manual_seed(0)
    with torch.device("cuda"):
        return build_builtin("gpt", **GPT)


def _grads_after_step(model: torch.nn.Module, inputs: object, autocast: bool = False) -> list:
    torch.manual_seed(1)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        loss = default_loss(call_model(model, inputs))
    loss.backward()
    torch.cuda.synchronize()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("strategy", ["offload", "megatron", "save_matmuls", "full"])
def test_gradients_equal_on_cuda(strategy: str) -> None:
    built = _gpt()
    reference = copy.deepcopy(built.model)
    expected = _grads_after_step(reference, built.example_inputs)
    handle = remat.apply_(built.model, remat.baseline_plan(strategy, remat.find_units(built.model)))
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
        torch.cuda.reset_peak_memory_stats()
        measured = measure_step(built.model, built.example_inputs).peak_bytes
    assert measured < none_peak
    predicted = remat.simulate(prof, plan).peak_bytes
    assert abs(predicted - measured) <= 0.02 * measured


@pytest.mark.parametrize("strategy", ["full", "megatron", "offload"])
def test_bf16_autocast_gradients_equal(strategy: str) -> None:
    built = _gpt()
    reference = copy.deepcopy(built.model)
    expected = _grads_after_step(reference, built.example_inputs, autocast=True)
    handle = remat.apply_(built.model, remat.baseline_plan(strategy, remat.find_units(built.model)))
    got = _grads_after_step(built.model, built.example_inputs, autocast=True)
    handle.remove()
    for a, b in zip(expected, got, strict=True):
        assert torch.equal(a, b)
