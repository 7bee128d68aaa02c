"""The independent memory oracle (``tests/memory_oracle.py``) against hand counts, and against
remat's tracker where both define the peak the same way.

The oracle is what the "fits the budget" tests measure applied plans with; if it were wrong,
they would be too, so it is pinned here to numbers worked out by hand.
"""

from __future__ import annotations

import pytest
import torch

import remat
from memory_oracle import StorageOracle, oracle_step_peak, step_peak
from remat.models import build_builtin


def test_a_linear_step_is_the_hand_count_with_sgd_and_adamw() -> None:
    # Linear 8->8 without bias, batch 4 x 8, float32. At entry: weight 256 + input 128 = 384.
    # Forward: output 128, loss 4 (512, 516). Backward: the loss's gradient 4, the output's
    # gradient 128 (mean's backward), the weight's gradient 256, with the output still held:
    # 516 + 4 + 128 + 256 = 904. SGD's step is in place.
    model = torch.nn.Linear(8, 8, bias=False)
    batch = (torch.ones(4, 8),)
    assert oracle_step_peak(model, batch, optimizer="sgd") == 904
    # AdamW: two moments (512) and the step counter (4) at entry: 900. Its step (single
    # tensor on the CPU) holds weight, input, moments, counter, gradient 256, output 128 and
    # loss 4, and makes sqrt(exp_avg_sq) 256 then its quotient 256 before freeing the first:
    # 900 + 256 + 128 + 4 + 512 = 1800.
    assert oracle_step_peak(model, batch, optimizer="adamw") == 1800
    # Accumulation: the weight's gradient (256) is alive from the start.
    assert oracle_step_peak(model, batch, optimizer="sgd", grads_alive=True) == 904 + 256


def test_views_and_in_place_ops_are_free_and_dead_storage_is_released() -> None:
    x = torch.ones(64)  # 256 bytes
    with StorageOracle([x]) as oracle:
        view = x.view(8, 8).t()
        x.add_(1)
        view.mul_(2)
        y = x * 2  # 256 more
        del y
        z = x + 1  # reuses what y freed: still 256 more at most
        assert oracle.live_bytes == 512
        del z
        assert oracle.live_bytes == 256
        x.resize_(128)  # grown in place, 512 bytes now
        assert oracle.live_bytes == 512
    assert oracle.entry_bytes == 256
    assert oracle.peak_bytes == 512


def test_a_tensor_captured_outside_the_roots_is_counted_once_read() -> None:
    mask = torch.ones(32)  # 128 bytes, not a root
    x = torch.ones(32)
    with StorageOracle([x]) as oracle:
        y = x * mask
        y = y * mask
    assert oracle.entry_bytes == 128
    assert oracle.peak_bytes == 128 + 128 + 128 + 128  # x, mask, the two products at once


def test_the_oracle_refuses_what_it_cannot_run() -> None:
    with pytest.raises(ValueError, match="precision"):
        oracle_step_peak(torch.nn.Linear(2, 2), (torch.ones(1, 2),), precision="fp16-mixed")


@pytest.mark.parametrize("name", ["cnn", "unet", "gpt"])
def test_the_oracle_and_the_tracker_agree_on_planned_steps(name: str) -> None:
    # Both count every storage alive at entry and every op output until it dies, so they agree
    # to the byte; a tracker that leaked a freed storage, missed an op's output or counted a
    # view would disagree here. (An offloaded activation's host copy is where they differ:
    # the oracle counts it on the CPU, the tracker counts it apart. No plan here offloads.)
    sizes = {
        "cnn": {"batch": 2, "image_size": 16},
        "unet": {"batch": 1, "image_size": 16},
        "gpt": {"n_layer": 3, "d_model": 32, "n_head": 4, "seq": 16, "batch": 2, "vocab": 64},
    }
    torch.manual_seed(0)
    built = build_builtin(name, **sizes[name], **({"dropout": 0.0} if name == "gpt" else {}))
    step = remat.Step(built.model, built.example_inputs, loss_fn=built.loss_fn, optimizer="sgd")
    units = remat.find_units(built.model)
    plans = [None, remat.baseline_plan("full", units), remat.baseline_plan("every_n:2", units)]
    for plan in plans:
        assert step_peak(step, plan) == remat.measure_plan(step, plan), plan


def test_bf16_autocast_steps_agree_with_the_tracker() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    step = remat.Step(model, (torch.randn(4, 16),), optimizer="sgd", precision="bf16-mixed")
    assert step_peak(step) == remat.measure_plan(step) > step_peak(step.replace(precision="32"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's own counter needs CUDA")
def test_the_oracle_is_the_cuda_allocators_peak() -> None:
    # What the step allocates beyond entry, by the oracle (rounded as the caching allocator
    # rounds, to 512 bytes) and by torch.cuda.max_memory_allocated. A warm-up step first, so
    # cuBLAS's workspace exists before either counts.
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 8))
    model = model.cuda()
    batch = torch.randn(64, 256, device="cuda")
    model(batch).mean().backward()
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with StorageOracle([model, batch], round_bytes=512) as oracle:
        output = model(batch)
        loss = output.mean()
        loss.backward()
        del output, loss
    torch.cuda.synchronize()
    assert oracle.peak_bytes - oracle.entry_bytes == torch.cuda.max_memory_allocated() - before
