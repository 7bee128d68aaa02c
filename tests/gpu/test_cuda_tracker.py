"""The tracker against the CUDA caching allocator's own count, on the built-in models."""

from __future__ import annotations

import pytest
import torch

import remat
from remat.models import build_builtin
from remat.profiling.step import make_optimizer, measure_step, training_step

SIZES = {
    "gpt": {"n_layer": 4, "d_model": 256, "n_head": 8, "seq": 256, "batch": 8},
    "mlp": {},
    "cnn": {"batch": 32},
    "unet": {"batch": 8},
}


@pytest.mark.parametrize("strategy", ["none", "full"])
@pytest.mark.parametrize("name", sorted(SIZES))
def test_tracker_matches_max_memory_allocated(name: str, strategy: str) -> None:
    torch.manual_seed(0)
    with torch.device("cuda"):
        built = build_builtin(name, **SIZES[name])
    handle = remat.apply_(built.model, remat.baseline_plan(strategy, remat.find_units(built.model)))
    # Warm up once so cuBLAS / cuDNN workspaces exist before either count starts.
    training_step(
        built.model,
        built.example_inputs,
        loss_fn=built.loss_fn,
        optimizer=make_optimizer("sgd", built.model),
    )
    for param in built.model.parameters():
        param.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    report = measure_step(
        built.model, built.example_inputs, loss_fn=built.loss_fn, optimizer="adamw"
    )
    torch.cuda.synchronize()
    allocator_delta = torch.cuda.max_memory_allocated() - start
    tracker_delta = report.peak_bytes - report.static_bytes
    handle.remove()
    assert tracker_delta == pytest.approx(allocator_delta, rel=0.01), (
        f"{name}/{strategy}: tracker {tracker_delta:,} vs allocator {allocator_delta:,}"
    )
