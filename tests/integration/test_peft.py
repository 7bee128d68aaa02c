"""PEFT (issue 14): a LoRA Llama as people build it (default config, so use_cache on; train mode;
a dict batch with an attention mask and labels) plans, applies, trains with gradients bitwise equal
to the unplanned step's, verifies, and estimates; frozen parameters have no gradient and no
optimizer state."""

from __future__ import annotations

import warnings
from typing import Any

import peft
import pytest
import torch
import transformers
from torch import nn

import remat
from memory_oracle import oracle_step_peak
from remat.profiling.estimate import estimate_profile
from remat.profiling.step import measure_step

LAYERS = [f"base_model.model.model.layers.{i}" for i in range(2)]


def llama() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
    )
    ids = torch.randint(0, 128, (2, 32))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    return transformers.LlamaForCausalLM(config).train(), batch


def lora() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    base, batch = llama()
    adapters = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.1)
    return peft.get_peft_model(base, adapters).train(), batch


def grads_of_a_step(model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    for param in model.parameters():
        param.grad = None
    torch.manual_seed(1)  # the same LoRA dropout masks in both steps
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_lora_plans_at_half_applies_and_trains_bitwise() -> None:
    model, batch = lora()
    assert remat.find_units(model) == LAYERS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = remat.auto_(model, batch, budget="50%", actions=["keep", "recompute"])
    notices = [str(w.message) for w in caught if "use_cache" in str(w.message)]
    assert len(notices) == 1, notices  # the base model's cache, said once
    assert handle.units == LAYERS and handle.checkpointed
    assert handle.result.iterations == 1  # the first plan fit when measured
    assert oracle_step_peak(model, batch) <= handle.result.budget_bytes  # outside remat
    planned = grads_of_a_step(model, batch)
    plan = handle.plan
    handle.remove()
    unplanned = grads_of_a_step(model, batch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert planned.keys() == unplanned.keys() == trainable  # only the adapters have gradients
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(torch.equal(planned[n], unplanned[n]) for n in trainable)
    report = remat.verify(model, plan, batch)
    assert report.outputs_equal and report.grads_equal and report.buffers_equal, report


def test_a_selective_plan_replays_lora_layers_bitwise() -> None:
    """The selective replay is where the KV cache made the replay differ (CheckpointMismatchError
    before this change)."""
    model, batch = lora()
    plan = remat.Plan(actions={"_default": "selective:save_matmuls"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the use_cache notice
        report = remat.verify(model, plan, batch)
    assert report.checkpointed == LAYERS
    assert report.outputs_equal and report.grads_equal and report.buffers_equal, report
    assert model.config.use_cache is True


def test_frozen_parameters_have_no_gradient_or_optimizer_state() -> None:
    model, batch = lora()
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    trainable_bytes = sum(p.numel() * p.element_size() for p in trainable)
    assert 0 < trainable_bytes < sum(p.numel() * p.element_size() for p in params) // 10
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = measure_step(model, batch)
        prof = remat.profile(model, batch, options=[], repeats=0)
    # AdamW's two moments per trainable parameter, and its step counter (a float32 scalar) each
    assert report.peak_by_category["optimizer_state"] == 2 * trainable_bytes + 4 * len(trainable)
    assert report.peak_by_category["gradient"] <= trainable_bytes
    # the profile's static bytes: parameters, buffers, inputs, a gradient and two moments for each
    # trainable parameter only
    storages = {  # labels are the input ids: one tensor
        id(t.untyped_storage()): t.untyped_storage().nbytes()
        for t in [*params, *model.buffers(), *batch.values()]
    }
    held = sum(storages.values())
    assert prof.static_bytes == held + 3 * trainable_bytes


def test_lora_estimates_from_shapes() -> None:
    """On meta for the CPU, the LoRA step is the CPU's to the byte; for an A100 in bfloat16 the
    units are the decoder layers and the attention mask is taken as all ones."""
    model, batch = lora()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = measure_step(model, batch).peak_bytes
        cpu = estimate_profile(model, batch, device="cpu", timing=False)
        a100 = remat.profile(model, batch, mode="estimate", device="a100-80gb", dtype="bfloat16")
    assert cpu.peak_bytes == measured
    assert a100.unit_fqns == LAYERS and a100.peak_bytes < measured
    assert any(k.startswith("attention mask: taken as all ones") for k in a100.kernels)
    assert next(model.parameters()).device.type == "cpu"  # the user's model untouched


@pytest.mark.parametrize("frozen", ["embed_tokens", "self_attn"])
def test_frozen_base_fine_tuning_without_peft(frozen: str) -> None:
    """Fine-tuning with part of the model frozen (requires_grad off), without PEFT."""
    model, batch = llama()
    for name, param in model.named_parameters():
        param.requires_grad = frozen not in name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the use_cache notice
        handle = remat.auto_(model, batch, budget="50%", actions=["keep", "recompute"])
    assert handle.checkpointed
    planned = grads_of_a_step(model, batch)
    handle.remove()
    unplanned = grads_of_a_step(model, batch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert planned.keys() == unplanned.keys() == trainable
    assert all(torch.equal(planned[n], unplanned[n]) for n in trainable)
