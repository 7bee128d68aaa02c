"""Estimate mode is per rank: ``world_size`` and ``fsdp`` shard the static bytes as when measuring
(issue 15, item 6). The oracle is a hand count of the model's parameters: FSDP2 gives each rank
``ceil(dim0 / N)`` rows of every parameter, its gradient and AdamW's two states."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch import nn

import remat
from remat.cli.main import main
from remat.fit import max_size
from remat.models.spec import load_model

WORLD = 4


def _model() -> nn.Module:
    # dim 0 of 30 and 10 rows: not multiples of the world size, so padding shows
    return nn.Sequential(nn.Linear(16, 30), nn.GELU(), nn.Linear(30, 10), nn.GELU())


def _shard_bytes(model: nn.Module, world_size: int, element_bytes: int) -> tuple[int, int]:
    """(full, one rank's shard) bytes of the model's parameters, counted by hand."""
    full = shard = 0
    for param in model.parameters():
        rows = param.shape[0]
        row_bytes = param.numel() // rows * element_bytes
        full += rows * row_bytes
        shard += math.ceil(rows / world_size) * row_bytes
    return full, shard


def _estimate(model: nn.Module, **kwargs: object) -> remat.Profile:
    return remat.profile(
        model,
        (torch.ones(2, 16),),
        mode="estimate",
        device="h100-80gb",
        dtype="bfloat16",
        optimizer="adamw",
        **kwargs,
    )


def test_profile_estimate_shards_static_bytes_under_fsdp() -> None:
    model = _model()
    one = _estimate(model)
    sharded = _estimate(model, world_size=WORLD, fsdp=True)
    full, shard = _shard_bytes(model, WORLD, element_bytes=2)
    # parameters, gradients and two AdamW states: 4 copies, each a shard instead of the whole
    assert (sharded.world_size, sharded.fsdp) == (WORLD, True)
    assert one.static_bytes - sharded.static_bytes == 4 * (full - shard)
    assert any("FSDP2" in note for note in sharded.notes)
    assert sharded.time_source == "roofline" and sharded.device == "h100-80gb"


def test_profile_estimate_adds_ddp_buckets() -> None:
    model = _model()
    one = _estimate(model)
    ddp = _estimate(model, world_size=WORLD)
    full, _ = _shard_bytes(model, WORLD, element_bytes=2)
    assert (ddp.world_size, ddp.fsdp) == (WORLD, False)
    assert ddp.static_bytes - one.static_bytes == full  # the buckets: every gradient once more


@pytest.mark.parametrize("world_size", [0, -2, 1.5, True])
def test_estimate_refuses_a_bad_world_size(world_size: object) -> None:
    with pytest.raises(ValueError, match="world_size: got"):
        _estimate(_model(), world_size=world_size)


def _mlp_shards(overrides: dict, world_size: int) -> tuple[int, int]:
    built = load_model("mlp", device="meta", dtype="bfloat16", batch=1, overrides=overrides)
    return _shard_bytes(built.model, world_size, element_bytes=2)


def test_max_batch_is_per_rank() -> None:
    """A budget that one replica's static bytes alone exceed: nothing fits without FSDP, and
    under FSDP the search runs on one rank's peak, whose static part is shards."""
    overrides = {"n_blocks": 4, "width": 512, "in_features": 64}
    args = {"device": "h100-80gb", "dtype": "bfloat16", "optimizer": "adamw", "limit": 64}
    full, shard = _mlp_shards(overrides, 8)
    assert 4 * full > 8 * 2**20  # parameters, gradients and two states of a replica
    one = max_size("mlp", budget="8MiB", overrides=overrides, **args)
    assert one.status == "NONE_FITS"
    sharded = max_size("mlp", budget="8MiB", overrides=overrides, world_size=8, fsdp=True, **args)
    assert sharded.status in ("FOUND", "AT_LIMIT") and sharded.max_size >= 1
    assert (sharded.world_size, sharded.fsdp) == (8, True)
    assert sharded.to_dict()["world_size"] == 8
    breakdown = sharded.breakdown
    assert breakdown.parameter_bytes == breakdown.gradient_bytes == shard
    assert breakdown.optimizer_state_bytes == 2 * shard
    assert breakdown.peak_bytes <= 8 * 2**20


def test_cli_estimate_world_size_and_fsdp(capsys: pytest.CaptureFixture[str]) -> None:
    overrides = {"n_blocks": 2, "width": 64, "in_features": 64}
    common = [
        "plan", "mlp", "--device", "h100-80gb", "--dtype", "bfloat16", "--batch", "2",
        "--set", *(f"{k}={v}" for k, v in overrides.items()), "--json",
    ]  # fmt: skip
    assert main(common) == 0
    one = json.loads(capsys.readouterr().out)
    assert main([*common, "--world-size", "4", "--fsdp"]) == 0
    sharded = json.loads(capsys.readouterr().out)
    full, shard = _mlp_shards(overrides, 4)
    assert (one["world_size"], one["fsdp"]) == (1, False)
    assert (sharded["world_size"], sharded["fsdp"]) == (4, True)
    b1, b4 = one["breakdown"], sharded["breakdown"]
    assert (b1["parameter_bytes"], b4["parameter_bytes"]) == (full, shard)
    assert b1["static_bytes"] - b4["static_bytes"] == 4 * (full - shard)
    with pytest.raises(SystemExit) as exit_info:  # a usage error, as when measuring
        main([*common, "--world-size", "0"])
    assert exit_info.value.code == 2
    assert "--world-size: got 0" in capsys.readouterr().err


LLAMA_3_8B = [
    "num_hidden_layers=32",
    "hidden_size=4096",
    "num_attention_heads=32",
    "num_key_value_heads=8",
    "intermediate_size=14336",
    "vocab_size=128256",
    "max_position_embeddings=131072",
]


@pytest.mark.slow
def test_llama_3_8b_on_8_h100_with_fsdp_max_seq(capsys: pytest.CaptureFixture[str]) -> None:
    """The question people ask most: the largest sequence that fits one rank of eight under FSDP2
    (bf16, AdamW). One rank's parameters, gradients and states are an eighth of a replica's."""
    pytest.importorskip("transformers")
    began = time.perf_counter()
    code = main(
        ["plan", "hf:llama", "--set", *LLAMA_3_8B, "--batch", "1", "--device", "h100-80gb",
         "--dtype", "bfloat16", "--world-size", "8", "--fsdp", "--max-seq", "--json"]
    )  # fmt: skip
    seconds = time.perf_counter() - began
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    params = 8_030_261_248  # Llama-3-8B's parameter count (untied embeddings), bf16
    breakdown = out["breakdown"]
    # one rank: (parameters + gradients + 2 AdamW states) / 8, each 2 bytes, shards padded
    assert breakdown["static_bytes"] == pytest.approx(4 * 2 * params / 8, rel=0.001)
    assert out["status"] == "FOUND" and out["max_seq"] > 4096
    assert out["predicted_peak_bytes"] <= out["budget_bytes"]
    fits = {p["size"]: p["fits"] for p in out["table"]}
    assert fits[out["max_seq"]] and not fits[out["max_seq"] + 1]
    # A few probes (doubling and bisecting took 33, about 10 minutes): under 60 s on a 2-core
    # CPU, asserted loosely for a loaded machine.
    assert len(out["table"]) <= 8, sorted(fits)
    assert seconds < 120, seconds
    print(f"llama-3-8b max_seq {out['max_seq']} in {seconds:.0f} s, {len(fits)} sizes probed")
