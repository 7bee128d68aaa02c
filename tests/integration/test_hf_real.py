"""Transformers models as people have them (issue 14): built from their config classes with the
defaults (``use_cache`` on), in train mode, with dict batches (attention masks, labels, pixel values),
through ``remat.auto_``; eval mode; ``hf:`` and user transformers models on ``meta`` and in estimate
mode for every device of the table; value reads on ``meta`` named.

Plans here use keep and recompute (``QUICK``) so that each test takes seconds; test_hf.py solves
with every action.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

import remat
from memory_oracle import oracle_step_peak
from remat.cli.main import main
from remat.devices import DEVICES
from remat.integrations import hf
from remat.models.spec import load_model
from remat.profiling.estimate import NotEstimableError, estimate_profile
from remat.profiling.step import measure_step

QUICK = ["keep", "recompute"]


def gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def llama() -> nn.Module:
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    return transformers.LlamaForCausalLM(config)


def tokens(mask: bool = False) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (2, 32))
    batch = {"input_ids": ids, "labels": ids}
    return {**batch, "attention_mask": torch.ones_like(ids)} if mask else batch


def said(caught: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in caught if text in str(w.message)]


def grads_of_a_step(model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    for param in model.parameters():
        param.grad = None
    torch.manual_seed(1)  # the same dropout masks in both steps
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_bitwise(planned: dict[str, torch.Tensor], unplanned: dict[str, torch.Tensor]) -> None:
    assert planned.keys() == unplanned.keys()
    differing = [n for n in planned if not torch.equal(planned[n], unplanned[n])]
    assert not differing, differing


@pytest.mark.parametrize(
    ("factory", "units"),
    [
        (gpt2, ["transformer.h.0", "transformer.h.1"]),
        (llama, ["model.layers.0", "model.layers.1"]),
    ],
    ids=["gpt2", "llama"],
)
def test_default_config_plans_with_the_cache_off_said_once_and_restored(
    factory: Callable[[], nn.Module], units: list[str]
) -> None:
    """use_cache at its default (True) in train mode: auto_ plans at 50% (before this change the
    cache kept every layer's keys and values alive, so recompute freed nothing and the plan kept
    every layer; with selective actions the replay raised CheckpointMismatchError), the plan fits
    when measured, the KV cache notice comes once, and remove() turns the cache back on."""
    torch.manual_seed(0)
    model = factory().train()
    batch = tokens()
    assert model.config.use_cache is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = remat.auto_(model, batch, budget="50%", actions=QUICK)
    notices = said(caught, "use_cache")
    assert len(notices) == 1, notices
    assert "gradient checkpointing" in notices[0] and "Handle.remove()" in notices[0]
    assert handle.units == units and handle.checkpointed
    assert model.config.use_cache is False  # while the plan is on
    assert oracle_step_peak(model, batch) <= handle.result.budget_bytes  # outside remat
    planned = grads_of_a_step(model, batch)
    handle.remove()
    assert model.config.use_cache is True
    assert_bitwise(planned, grads_of_a_step(model, batch))


def test_the_unplanned_step_is_measured_with_the_cache_off() -> None:
    """The 100% point: measuring a model whose config has the cache on measures the step that
    trains under a plan (cache off); GPT-2 kept 32 KiB more with the cache (2,091,528 bytes
    against 2,058,760) before this change."""
    torch.manual_seed(0)
    model = gpt2().train()
    batch = tokens()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        on = measure_step(model, batch).peak_bytes
        prof = remat.profile(model, batch, options=[], repeats=0)
    assert model.config.use_cache is True  # measuring turned it off only for the step
    model.config.use_cache = False
    off = measure_step(model, batch).peak_bytes
    assert on == off == prof.peak_bytes


def test_use_cache_passed_in_the_batch_is_turned_off_too() -> None:
    """transformers takes use_cache from the call before the config: a batch with use_cache=True
    trains without the cache under a plan too."""
    torch.manual_seed(0)
    model = llama().train()
    model.config.use_cache = False
    batch = {**tokens(), "use_cache": True}
    plan = remat.baseline_plan("full", remat.find_units(model))
    with pytest.warns(UserWarning, match="use_cache=True passed to the model"):
        with remat.apply_(model, plan):
            assert model(**batch).past_key_values is None
            planned = grads_of_a_step(model, batch)
    assert model(**batch).past_key_values is not None  # the hook went with the plan
    assert_bitwise(planned, grads_of_a_step(model, batch))


@pytest.mark.parametrize("name", ["bert", "t5"])
def test_encoder_and_seq2seq_models_with_masked_dict_batches(name: str) -> None:
    torch.manual_seed(0)
    if name == "bert":
        config = transformers.BertConfig(
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            vocab_size=128,
        )
        model = transformers.BertForMaskedLM(config)
        units = ["bert.encoder.layer.0", "bert.encoder.layer.1"]
    else:
        config = transformers.T5Config(
            num_layers=2, d_model=64, d_ff=128, d_kv=16, vocab_size=128, decoder_start_token_id=0
        )
        model = transformers.T5ForConditionalGeneration(config)
        units = [f"{s}.block.{i}" for s in ("encoder", "decoder") for i in range(2)]
    model.train()
    cached = config.use_cache  # True for both, as the config classes default it
    batch = tokens(mask=True)
    batch["attention_mask"][1, 24:] = 0  # padding: the mask is read, as in training
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = remat.auto_(model, batch, budget="50%", actions=QUICK)
    assert cached is True and len(said(caught, "use_cache")) == 1
    assert handle.units == units and handle.checkpointed
    assert handle.result.iterations == 1  # the first plan fit when measured
    assert oracle_step_peak(model, batch) <= handle.result.budget_bytes  # outside remat
    planned = grads_of_a_step(model, batch)
    handle.remove()
    assert_bitwise(planned, grads_of_a_step(model, batch))


VISION: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "vit": (
        lambda: transformers.ViTForImageClassification(
            transformers.ViTConfig(
                image_size=32,
                patch_size=8,
                hidden_size=32,
                num_hidden_layers=3,
                num_attention_heads=2,
                intermediate_size=64,
                num_labels=4,
            )
        ),
        ["vit.layers.0", "vit.layers.1", "vit.layers.2"],
    ),
    "convnext": (
        lambda: transformers.ConvNextForImageClassification(
            transformers.ConvNextConfig(
                hidden_sizes=[16, 32], depths=[2, 2], num_stages=2, num_labels=4
            )
        ),
        [f"convnext.encoder.stages.{s}.layers.{i}" for s in range(2) for i in range(2)],
    ),
    "swin": (
        lambda: transformers.SwinForImageClassification(
            transformers.SwinConfig(
                image_size=32,
                patch_size=4,
                embed_dim=16,
                depths=[2, 2],
                num_heads=[2, 2],
                window_size=4,
                num_labels=4,
            )
        ),
        [f"swin.encoder.layers.{s}.blocks.{i}" for s in range(2) for i in range(2)],
    ),
    "resnet": (
        lambda: transformers.ResNetForImageClassification(
            transformers.ResNetConfig(
                embedding_size=16,
                hidden_sizes=[16, 32],
                depths=[1, 1],
                layer_type="basic",
                num_labels=4,
            )
        ),
        ["resnet.encoder.stages.0.layers.0", "resnet.encoder.stages.1.layers.0"],
    ),
}


@pytest.mark.parametrize("name", list(VISION))
def test_vision_classifiers_with_pixel_values_and_labels(name: str) -> None:
    factory, units = VISION[name]
    torch.manual_seed(0)
    model = factory().train()
    batch = {"pixel_values": torch.randn(4, 3, 32, 32), "labels": torch.randint(0, 4, (4,))}
    # estimate mode for the cpu target is the CPU's step to the byte (ViT and Swin estimated
    # 820,008 and 1,481,140 bytes against 793,896 and 1,472,948 before the CPU's attention kernel
    # and layouts were modelled)
    measured = measure_step(model, batch).peak_bytes
    assert estimate_profile(model, batch, device="cpu", timing=False).peak_bytes == measured
    handle = remat.auto_(model, batch, budget="50%", actions=QUICK)
    assert handle.units == units and handle.checkpointed
    assert handle.result.iterations == 1  # the first plan fit when measured
    assert oracle_step_peak(model, batch) <= handle.result.budget_bytes  # outside remat
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    planned = grads_of_a_step(model, batch)
    moved = {n: b.clone() for n, b in model.named_buffers()}
    handle.remove()
    with torch.no_grad():
        for key, buffer in model.named_buffers():
            buffer.copy_(buffers[key])
    assert_bitwise(planned, grads_of_a_step(model, batch))
    # BatchNorm's running statistics moved once in the planned step, not again on recompute
    assert all(torch.equal(b, moved[n]) for n, b in model.named_buffers())


def test_an_eval_mode_model_is_warned_about_once() -> None:
    """from_pretrained returns models in eval mode: dropout off, not the training step."""
    torch.manual_seed(0)
    model = gpt2().eval()
    batch = tokens()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        remat.profile(model, batch, options=[], repeats=0)
        remat.auto_(model, batch, budget="50%", actions=QUICK).remove()
    notices = said(caught, "eval mode")
    assert len(notices) == 1, notices
    assert "model.train()" in notices[0] and "dropout" in notices[0]
    model.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        remat.profile(gpt2().train(), batch, options=[], repeats=0)
    assert not said(caught, "eval mode")


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_profile_hf_llama_meta_equals_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's must-show: remat profile hf:llama --device meta --json has the CPU's peak, to
    the byte (before this change --device meta was refused for hf: models)."""
    meta = cli_json(capsys, "profile", "hf:llama", "--device", "meta", "--json")
    cpu = cli_json(capsys, "profile", "hf:llama", "--device", "cpu", "--json")
    assert meta["peak_bytes"] == cpu["peak_bytes"]
    assert meta["peak_by_category"] == cpu["peak_by_category"]
    assert [u["saved_bytes"] for u in meta["units"]] == [u["saved_bytes"] for u in cpu["units"]]


@pytest.mark.slow
def test_cli_plan_hf_llama_max_batch_on_h100(capsys: pytest.CaptureFixture[str]) -> None:
    """The must-show remat plan hf:llama --device h100-80gb --budget device --max-batch --json
    (two layers and 512 tokens here, to keep the search to seconds)."""
    payload = cli_json(
        capsys,
        *("plan", "hf:llama", "--device", "h100-80gb", "--budget", "device", "--max-batch"),
        *("--json", "--seq", "512", "--set", "num_hidden_layers=2"),
    )
    assert payload["status"] == "FOUND" and payload["device"] == "h100-80gb"
    assert payload["max_batch"] > 1
    assert 0 < payload["predicted_peak_bytes"] <= payload["budget_bytes"]
    assert list(payload["plan"]["actions"]) == ["model.layers.0", "model.layers.1"]
    assert any(k.startswith("attention mask: taken as all ones") for k in payload["kernels"])


@pytest.mark.slow
def test_estimate_hf_llama_for_every_device_of_the_table() -> None:
    torch.manual_seed(0)
    overrides = {"num_hidden_layers": 2, "hidden_size": 64, "num_key_value_heads": 2}
    cpu = load_model("hf:llama", batch=2, seq=32, overrides=overrides)
    measured = measure_step(cpu.model, cpu.example_inputs).peak_bytes
    meta = load_model("hf:llama", device="meta", batch=2, seq=32, overrides=overrides)
    for device in [*DEVICES, "cpu"]:
        prof = estimate_profile(
            meta.model, meta.example_inputs, device=device, dtype="bfloat16", timing=False
        )
        assert prof.device == device and prof.unit_fqns == ["model.layers.0", "model.layers.1"]
        assert any(k.startswith("attention mask: taken as all ones") for k in prof.kernels)
    # the cpu target in float32 is the CPU's step, to the byte
    prof = estimate_profile(cpu.model, cpu.example_inputs, device="cpu", timing=False)
    assert prof.peak_bytes == measured


def test_a_user_factory_with_an_attention_mask_runs_on_meta(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "hf_user_models.py").write_text(  # a name no other test imports
        "import torch, transformers\n"
        "def llama(batch=2, seq=32):\n"
        "    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64,\n"
        "        intermediate_size=128, num_attention_heads=4, vocab_size=128)\n"
        "    ids = torch.randint(0, 128, (batch, seq))\n"
        "    batch = {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': ids}\n"
        "    return transformers.LlamaForCausalLM(config), batch\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    peaks = []
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        built = load_model("hf_user_models:llama", device=device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the config's use_cache notice
            peaks.append(measure_step(built.model, built.example_inputs).peak_bytes)
    assert peaks[0] == peaks[1]


class _ReadsAValue(transformers.PreTrainedModel):
    config_class = transformers.PretrainedConfig
    base_model_prefix = "reads"

    def __init__(self, config: transformers.PretrainedConfig) -> None:
        super().__init__(config)
        self.proj = nn.Linear(4, 4)
        self.post_init()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj(x)
        if y.sum() > 0:  # a value read: no shape-only form
            y = y * 2
        return y.sum()


def test_value_reads_on_meta_name_the_module_the_op_and_the_fix() -> None:
    with torch.device("meta"):
        reads = _ReadsAValue(transformers.PretrainedConfig())
        x = torch.randn(2, 4)
    hf.prepare_meta(reads)
    with pytest.raises(NotEstimableError, match=r"reads a tensor's value \(bool\(\)") as info:
        measure_step(reads, (x,))
    assert "--device cpu" in str(info.value)

    config = transformers.MixtralConfig(
        num_hidden_layers=1,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        experts_implementation="eager",  # the loop over experts indexes by nonzero
    )
    with torch.device("meta"):
        model = transformers.MixtralForCausalLM(config)
        ids = torch.randint(0, 64, (2, 8))
    hf.prepare_meta(model)
    with pytest.raises(NotEstimableError, match=r"'model\.layers\.0\.mlp\.experts' runs nonzero"):
        measure_step(model, {"input_ids": ids, "labels": ids})
