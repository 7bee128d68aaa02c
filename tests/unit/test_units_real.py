"""Default units (remat.find_units) of transformers models as their users build them, from tiny
configs: the blocks, never the stages that hold them nor the attention and MLP inside them."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

from remat import find_units

transformers = pytest.importorskip("transformers")


def _layers(prefix: str, count: int) -> list[str]:
    return [f"{prefix}.{i}" for i in range(count)]


def _staged(prefix: str, inner: str, depths: list[int]) -> list[str]:
    return [f"{prefix}.{s}.{inner}.{i}" for s, depth in enumerate(depths) for i in range(depth)]


T = transformers
TEXT = {"vocab_size": 128}
LLAMA = {
    "num_hidden_layers": 3,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    **TEXT,
}
CASES: dict[str, tuple[Callable[[], nn.Module], list[str]]] = {
    "gpt2": (
        lambda: T.GPT2LMHeadModel(T.GPT2Config(n_layer=3, n_embd=64, n_head=2, **TEXT)),
        _layers("transformer.h", 3),
    ),
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**LLAMA)), _layers("model.layers", 3)),
    "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**LLAMA)), _layers("model.layers", 3)),
    "bert": (
        lambda: T.BertForMaskedLM(
            T.BertConfig(
                num_hidden_layers=3,
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                **TEXT,
            )
        ),
        _layers("bert.encoder.layer", 3),
    ),
    # T5Stack (encoder, decoder) is a stage; T5Block's ModuleList holds distinct sub-layers
    "t5": (
        lambda: T.T5ForConditionalGeneration(
            T.T5Config(
                num_layers=2,
                num_decoder_layers=3,
                d_model=64,
                d_ff=128,
                num_heads=2,
                d_kv=32,
                **TEXT,
            )
        ),
        _layers("encoder.block", 2) + _layers("decoder.block", 3),
    ),
    # transformers 5 names ViT's stack vit.layers (no encoder)
    "vit": (
        lambda: T.ViTForImageClassification(
            T.ViTConfig(
                num_hidden_layers=3,
                hidden_size=64,
                intermediate_size=128,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            )
        ),
        _layers("vit.layers", 3),
    ),
    "convnext": (
        lambda: T.ConvNextForImageClassification(
            T.ConvNextConfig(depths=[2, 2, 2, 2], hidden_sizes=[16, 32, 48, 64], image_size=64)
        ),
        _staged("convnext.encoder.stages", "layers", [2, 2, 2, 2]),
    ),
    "convnext-t": (  # ConvNeXt-T's depths: 18 blocks
        lambda: T.ConvNextForImageClassification(
            T.ConvNextConfig(depths=[3, 3, 9, 3], hidden_sizes=[8, 16, 24, 32], image_size=64)
        ),
        _staged("convnext.encoder.stages", "layers", [3, 3, 9, 3]),
    ),
    "swin": (
        lambda: T.SwinForImageClassification(
            T.SwinConfig(
                depths=[2, 2], num_heads=[2, 4], embed_dim=16, image_size=64, window_size=4
            )
        ),
        _staged("swin.encoder.layers", "blocks", [2, 2]),
    ),
    "swin-t": (  # Swin-T's depths: 12 blocks; the PatchMerging downsamples are layers
        lambda: T.SwinForImageClassification(
            T.SwinConfig(
                depths=[2, 2, 6, 2],
                num_heads=[1, 1, 1, 1],
                embed_dim=8,
                image_size=64,
                window_size=2,
            )
        ),
        _staged("swin.encoder.layers", "blocks", [2, 2, 6, 2]),
    ),
    # the stem's ResNetConvLayer repeats inside the bottlenecks but is a layer; stages of one
    # bottleneck are looked into; a bottleneck's Sequential of ResNetConvLayers is not
    "resnet": (
        lambda: T.ResNetForImageClassification(
            T.ResNetConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 48, 64], embedding_size=16)
        ),
        _staged("resnet.encoder.stages", "layers", [1, 1, 1, 1]),
    ),
    "resnet-basic": (
        lambda: T.ResNetForImageClassification(
            T.ResNetConfig(
                depths=[2, 3], hidden_sizes=[16, 32], embedding_size=16, layer_type="basic"
            )
        ),
        _staged("resnet.encoder.stages", "layers", [2, 3]),
    ),
    "resnet-50": (
        lambda: T.ResNetForImageClassification(
            T.ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[16, 32, 48, 64], embedding_size=8)
        ),
        _staged("resnet.encoder.stages", "layers", [3, 4, 6, 3]),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_units_are_the_blocks(name: str) -> None:
    build, want = CASES[name]
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        model = build()
    assert find_units(model) == want
