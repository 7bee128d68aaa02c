"""Hugging Face transformers models (remat.integrations.hf, MODEL specs hf:NAME): units, bitwise
gradients under the full plan and a solved plan, use_cache, Hugging Face's own checkpointing, the
ModelOutput loss, errors, and the CLI on hf:llama."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import remat
from memory_oracle import oracle_step_peak
from remat.integrations import hf  # needs the hf extra, which `make test` installs
from remat.models.spec import load_model
from remat.profiling.estimate import estimate_profile
from remat.profiling.step import default_loss, measure_step

# Three layers, width 64, 32 tokens, a 128-token vocabulary (the layers, not the head, make the
# peak, so that a 50% budget needs recompute): a step takes milliseconds.
TINY = {
    "gpt2": {"n_layer": 3, "n_embd": 64, "n_head": 4},
    "llama": {
        "num_hidden_layers": 3,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "bert": {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128},
    "t5": {"num_layers": 3, "d_model": 64, "d_ff": 128, "d_kv": 16},
}
UNITS = {
    "gpt2": [f"transformer.h.{i}" for i in range(3)],
    "llama": [f"model.layers.{i}" for i in range(3)],
    "bert": [f"bert.encoder.layer.{i}" for i in range(3)],
    "t5": [f"{stack}.block.{i}" for stack in ("encoder", "decoder") for i in range(3)],
}


def tiny(name: str, **extra: object) -> remat.models.BuiltModel:
    torch.manual_seed(0)
    overrides = {**TINY[name], "vocab_size": 128, **extra}
    return load_model(f"hf:{name}", batch=2, seq=32, overrides=overrides)


@pytest.mark.parametrize("name", list(hf.HF_MODELS))
def test_units_are_the_layers_and_the_model_returns_its_loss(name: str) -> None:
    built = tiny(name)
    assert remat.find_units(built.model) == UNITS[name]
    assert built.model.training and built.model.config.use_cache is False
    output = built.model(**built.example_inputs)
    assert isinstance(output, dict)  # a ModelOutput
    # default_loss takes the model's own loss, not a mean over logits and the rest
    assert default_loss(output) is output.loss
    assert output.loss.dim() == 0 and output.loss.requires_grad


@pytest.mark.parametrize("name", list(hf.HF_MODELS))
def test_full_and_solved_plans_give_bitwise_equal_gradients(name: str) -> None:
    built = tiny(name)
    model, inputs = built.model, built.example_inputs
    full = remat.baseline_plan("full", remat.find_units(model))
    report = remat.verify(model, full, inputs)
    assert report.ok, report
    assert report.checkpointed == UNITS[name]
    assert report.measured_peak_bytes < report.unplanned_peak_bytes

    handle = remat.auto_(model, inputs, budget="50%", optimizer="sgd")
    result = handle.result
    assert handle.checkpointed  # a 50% budget needs recompute
    assert result.iterations == 1  # the first plan fit when measured
    # the plan as applied, measured outside remat's closed loop
    assert oracle_step_peak(model, inputs, optimizer="sgd") <= result.budget_bytes
    handle.remove()
    report = remat.verify(model, result.plan, inputs)
    assert report.ok, report
    assert report.checkpointed == handle.checkpointed


def test_use_cache_is_turned_off_with_a_warning() -> None:
    with pytest.warns(UserWarning, match="use_cache=True turned off"):
        built = tiny("llama", use_cache=True)
    assert built.model.config.use_cache is False
    # a model the user built with the cache on: apply_ turns it off while the plan is on, as
    # Hugging Face's gradient checkpointing does, says so once, and remove() turns it back on
    built.model.config.use_cache = True
    plan = remat.baseline_plan("full", UNITS["llama"])
    with pytest.warns(UserWarning, match="use_cache=True is turned off") as caught:
        handle = remat.apply_(built.model, plan)
    assert len([w for w in caught if "use_cache" in str(w.message)]) == 1
    assert built.model.config.use_cache is False
    handle.remove()
    assert built.model.config.use_cache is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per model
        with remat.apply_(built.model, plan):
            assert built.model.config.use_cache is False
    assert built.model.config.use_cache is True
    with pytest.warns(UserWarning, match="use_cache=True turned off"):
        hf.prepare_model(built.model)
    assert built.model.config.use_cache is False


def test_t5_cache_is_off_in_every_config() -> None:
    with pytest.warns(UserWarning, match="use_cache=True turned off"):
        built = tiny("t5", use_cache=True)
    configs = [m.config for m in built.model.modules() if hasattr(m, "config")]
    assert len(configs) > 1 and all(c.use_cache is False for c in configs)


def test_hugging_face_checkpointing_is_detected() -> None:
    # transformers 5 renamed gradient_checkpointing_enable to activation_checkpointing_enable
    # (the old name still works, with a FutureWarning); both set gradient_checkpointing=True
    methods = ["gradient_checkpointing_enable", "activation_checkpointing_enable"]
    built = tiny("gpt2")
    model = built.model
    plan = remat.baseline_plan("full", UNITS["gpt2"])
    for method in [m for m in methods if hasattr(model, m)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            getattr(model, method)()
        assert hf.checkpointing_modules(model) == ["transformer", *UNITS["gpt2"]], method
        with pytest.raises(ValueError, match="already checkpoints itself") as info:
            remat.apply_(model, plan)
        assert "gradient_checkpointing_disable" in str(info.value)
        with pytest.raises(ValueError, match="checkpoints itself"):
            remat.auto_(model, built.example_inputs, budget="50%")
        with pytest.raises(ValueError, match="disable_gradient_checkpointing=True"):
            hf.prepare_model(model)
        hf.prepare_model(model, disable_gradient_checkpointing=True)
        assert hf.checkpointing_modules(model) == []
    assert remat.verify(model, plan, built.example_inputs).ok


def test_errors_say_what_was_expected() -> None:
    with pytest.raises(ValueError, match="did you mean hf:llama"):
        load_model("hf:lama")
    with pytest.raises(ValueError, match="unknown config key: got 'num_layer'") as info:
        load_model("hf:llama", overrides={"num_layer": 2})
    assert "did you mean 'num_hidden_layers'" in str(info.value)
    # aliases are accepted: GPT-2's hidden_size is its n_embd
    built = load_model("hf:gpt2", seq=8, overrides={"n_layer": 1, "hidden_size": 32, "n_head": 2})
    assert built.model.config.n_embd == 32
    with pytest.raises(ValueError, match="divisible"):
        load_model("hf:gpt2", overrides={"n_embd": 30, "n_head": 4})
    with pytest.raises(ValueError, match="at most n_positions=512"):
        load_model("hf:gpt2", seq=1000)


@pytest.mark.parametrize("name", list(hf.HF_MODELS))
def test_meta_bytes_equal_cpu_bytes(name: str) -> None:
    """hf: models build on meta (transformers' mask checks answered as for an unpadded batch,
    which the all-ones mask is) and their step's peak there is the CPU's to the byte, as is
    estimate mode's for the cpu target."""
    peaks = []
    for device in ("cpu", "meta"):
        torch.manual_seed(0)
        built = load_model(
            f"hf:{name}",
            device=device,
            batch=2,
            seq=32,
            overrides={**TINY[name], "vocab_size": 128},
        )
        assert built.example_inputs["attention_mask"].device.type == device
        peaks.append(measure_step(built.model, built.example_inputs).peak_bytes)
    assert peaks[0] == peaks[1]
    estimate = estimate_profile(built.model, built.example_inputs, device="cpu", timing=False)
    assert estimate.peak_bytes == peaks[0]


def test_missing_transformers_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ValueError, match=r"pip install 'remat\[hf\]'"):
        load_model("hf:gpt2")


LLAMA_SET = [
    "--set",
    "num_hidden_layers=4",
    "hidden_size=256",
    "intermediate_size=688",
    "num_attention_heads=4",
    "num_key_value_heads=4",
]


def test_cli_plan_and_verify_hf_llama(tmp_path: Path) -> None:
    """The issue's must-show: remat plan hf:llama ... --budget 50%, then remat verify that plan."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    plan_path = tmp_path / "plan.json"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "remat.cli.main", *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )

    planned = cli("plan", "hf:llama", *LLAMA_SET, "--budget", "50%", "--out", str(plan_path))
    assert planned.returncode == 0, planned.stderr
    assert "recompute" in planned.stdout
    plan = remat.Plan.load(plan_path)
    assert plan.units == [f"model.layers.{i}" for i in range(4)]
    verified = cli("verify", "hf:llama", *LLAMA_SET, "--plan", str(plan_path))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "gradients: bitwise equal" in verified.stdout
    assert "applied:   yes" in verified.stdout
