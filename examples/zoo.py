"""Models no one here wrote, built the way their users build them, as remat MODEL factories.

    PYTHONPATH=examples remat plan zoo:llama --budget 50%
    PYTHONPATH=examples remat verify zoo:lora --budget 50%

Each factory returns ``(model, batch)`` or ``(model, batch, loss_fn)`` for ``remat``'s
``package.module:factory`` form: a transformers, diffusers or PEFT model built from its library's
config class with that library's defaults (``use_cache``, dropout, attention implementation), only the
sizes made small enough for a CPU, in train mode, with a dict batch (attention mask and labels where
the model takes them). Nothing is downloaded: weights are random, data synthetic.

``gpt2_124m`` and ``llama_shaped`` are the full-width shapes of GPT-2 small and of a Llama (smaller
depth and vocabulary for the Llama), for checks that take minutes rather than seconds.

Needs transformers (remat's ``hf`` extra); ``unet2d`` needs diffusers and ``lora`` needs peft.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

__all__ = ["ZOO"]

ZOO = ("gpt2", "llama", "qwen2", "bert", "t5", "vit", "convnext", "swin", "unet2d", "lora")
"""The factories the third-party model tests run (``tests/integration/test_zoo.py``)."""


def _tokens(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, vocab, (batch, seq))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def _train(model: nn.Module) -> nn.Module:
    return model.train()  # from_pretrained returns eval mode; training is train mode


def _causal(model_class: str, config_class: str, batch: int, seq: int, **sizes: Any) -> Any:
    import transformers

    config = getattr(transformers, config_class)(**sizes)
    model = _train(getattr(transformers, model_class)(config))
    batch_dict = _tokens(config.vocab_size, batch, seq)
    return model, {**batch_dict, "labels": batch_dict["input_ids"]}


def gpt2(batch: int = 4, seq: int = 128, n_layer: int = 2, n_embd: int = 64) -> Any:
    """GPT2LMHeadModel, default GPT2Config (use_cache on, dropout 0.1) at a small width."""
    return _causal(
        "GPT2LMHeadModel",
        "GPT2Config",
        batch,
        seq,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=4,
        vocab_size=256,
        bos_token_id=0,
        eos_token_id=0,
    )


def gpt2_124m(batch: int = 1, seq: int = 256) -> Any:
    """GPT-2 small as released: 12 layers, width 768, 12 heads, 50,257 tokens (124M parameters)."""
    return _causal("GPT2LMHeadModel", "GPT2Config", batch, seq)


def llama(batch: int = 4, seq: int = 128, num_hidden_layers: int = 2, hidden_size: int = 64) -> Any:
    """LlamaForCausalLM, default LlamaConfig (use_cache on, SDPA, RoPE) with grouped KV heads."""
    return _causal(
        "LlamaForCausalLM",
        "LlamaConfig",
        batch,
        seq,
        num_hidden_layers=num_hidden_layers,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )


def llama_shaped(batch: int = 1, seq: int = 256) -> Any:
    """A Llama of width 1024 (GQA 16/4 heads, SwiGLU 2816), 4 layers, a 32,000-token vocabulary."""
    return _causal(
        "LlamaForCausalLM",
        "LlamaConfig",
        batch,
        seq,
        num_hidden_layers=4,
        hidden_size=1024,
        intermediate_size=2816,
        num_attention_heads=16,
        num_key_value_heads=4,
    )


def qwen2(batch: int = 4, seq: int = 128) -> Any:
    """Qwen2ForCausalLM, default Qwen2Config at a small width."""
    return _causal(
        "Qwen2ForCausalLM",
        "Qwen2Config",
        batch,
        seq,
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    )


def bert(batch: int = 4, seq: int = 128) -> Any:
    """BertForMaskedLM with an attention mask and labels at every position."""
    import transformers

    config = transformers.BertConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        vocab_size=256,
    )
    model = _train(transformers.BertForMaskedLM(config))
    batch_dict = _tokens(config.vocab_size, batch, seq)
    return model, {**batch_dict, "labels": torch.randint(0, config.vocab_size, (batch, seq))}


def t5(batch: int = 4, seq: int = 128) -> Any:
    """T5ForConditionalGeneration: encoder inputs with a mask, labels (decoder inputs shifted)."""
    import transformers

    config = transformers.T5Config(
        num_layers=2, d_model=64, d_ff=128, num_heads=4, d_kv=16, vocab_size=256
    )
    config.decoder_start_token_id = config.pad_token_id  # as the released checkpoints set it
    model = _train(transformers.T5ForConditionalGeneration(config))
    batch_dict = _tokens(config.vocab_size, batch, seq)
    return model, {**batch_dict, "labels": torch.randint(1, config.vocab_size, (batch, seq))}


def _image_batch(batch: int, size: int, labels: int) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.randn(batch, 3, size, size),
        "labels": torch.randint(0, labels, (batch,)),
    }


def vit(batch: int = 4, image_size: int = 64) -> Any:
    """ViTForImageClassification (patch 4, 10 classes) on an image batch with labels."""
    import transformers

    config = transformers.ViTConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=4,
        num_labels=10,
    )
    return _train(transformers.ViTForImageClassification(config)), _image_batch(
        batch, image_size, 10
    )


def convnext(batch: int = 4, image_size: int = 128) -> Any:
    """ConvNextForImageClassification: four stages of two ConvNeXt layers each."""
    import transformers

    config = transformers.ConvNextConfig(
        depths=[2, 2, 2, 2], hidden_sizes=[16, 32, 48, 64], image_size=image_size, num_labels=10
    )
    return _train(transformers.ConvNextForImageClassification(config)), _image_batch(
        batch, image_size, 10
    )


def swin(batch: int = 4, image_size: int = 64) -> Any:
    """SwinForImageClassification: two stages of two shifted-window blocks."""
    import transformers

    config = transformers.SwinConfig(
        depths=[2, 2],
        num_heads=[2, 4],
        embed_dim=16,
        image_size=image_size,
        window_size=4,
        num_labels=10,
    )
    return _train(transformers.SwinForImageClassification(config)), _image_batch(
        batch, image_size, 10
    )


def _denoising_loss(output: Any) -> torch.Tensor:
    return output.sample.float().pow(2).mean()


def unet2d(batch: int = 2, size: int = 16) -> Any:
    """diffusers UNet2DConditionModel with cross-attention to text states, a denoising loss."""
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        sample_size=size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    inputs = {
        "sample": torch.randn(batch, 4, size, size),
        "timestep": torch.tensor(10),
        "encoder_hidden_states": torch.randn(batch, 8, 32),
    }
    return _train(model), inputs, _denoising_loss


def lora(batch: int = 4, seq: int = 128, r: int = 4) -> Any:
    """A PEFT LoRA adapter (q_proj and v_proj, dropout 0.1) on the small Llama; the base frozen."""
    from peft import LoraConfig, get_peft_model

    base, inputs = llama(batch=batch, seq=seq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes about the random base weights
        model = get_peft_model(
            base,
            LoraConfig(r=r, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.1),
        )
    return _train(model), inputs
