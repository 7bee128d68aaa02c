"""The tracker against the CUDA caching allocator's own count, on the built-in models and a
transformers Llama.

Both counts start from the same moment: the model, its inputs and the optimizer (its state made)
exist, gradients do not, and a warm-up step has made cuBLAS's workspaces. The allocator's rise
above that moment (``max_memory_allocated() - memory_allocated()``) is the oracle; the tracker's is
its peak less its static base (what existed when it was entered). Anything the allocator hands out
that is no tensor (a cuDNN convolution's workspace) is in the first and not the second.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import remat
from remat.models.spec import load_model
from remat.profiling.step import make_optimizer, training_step
from remat.profiling.tracker import track_memory

SIZES: dict[str, dict[str, Any]] = {
    "gpt": {"n_layer": 4, "d_model": 256, "n_head": 8, "seq": 256, "batch": 8},
    "mlp": {},
    "cnn": {"batch": 32},
    "unet": {"batch": 8},
    "hf:llama": {
        "batch": 4,
        "seq": 256,
        "num_hidden_layers": 4,
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
}


def _build(name: str) -> Any:
    torch.manual_seed(0)
    sizes = dict(SIZES[name])
    batch, seq = sizes.pop("batch", None), sizes.pop("seq", None)
    return load_model(name, device="cuda", batch=batch, seq=seq, overrides=sizes)


@pytest.mark.parametrize("strategy", ["none", "full"])
@pytest.mark.parametrize("name", sorted(SIZES))
def test_tracker_matches_max_memory_allocated(name: str, strategy: str) -> None:
    if name.startswith("hf:"):
        pytest.importorskip("transformers")
    built = _build(name)
    model, inputs = built.model, built.example_inputs
    handle = remat.apply_(model, remat.baseline_plan(strategy, remat.find_units(model)))
    optimizer = make_optimizer("adamw", model)
    # Warm up once so cuBLAS / cuDNN workspaces exist before either count starts.
    training_step(model, inputs, loss_fn=built.loss_fn, optimizer=optimizer)
    for param in model.parameters():
        param.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with track_memory(model, inputs, optimizer, device="cuda") as tracker:
        training_step(model, inputs, loss_fn=built.loss_fn, optimizer=optimizer)
    torch.cuda.synchronize()
    allocator_delta = torch.cuda.max_memory_allocated() - start
    report = tracker.report()
    tracker_delta = report.peak_bytes - report.static_bytes
    handle.remove()
    assert allocator_delta > 0
    assert tracker_delta == pytest.approx(allocator_delta, rel=0.01), (
        f"{name}/{strategy}: tracker {tracker_delta:,} vs allocator {allocator_delta:,}"
        f" ({(tracker_delta - allocator_delta) / allocator_delta:+.2%})"
    )
