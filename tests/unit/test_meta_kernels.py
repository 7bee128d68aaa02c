"""Shape-only steps mirror the CPU's kernels: the meta peak of a step equals its CPU peak to the byte
for attention (flash on the CPU, with grouped KV heads, a causal mask, a mask that needs a gradient)
and for layer norm over a non-contiguous input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from remat.profiling.meta_kernels import CpuKernelsOnMeta, cpu_attention_kernel
from remat.profiling.tracker import track_memory


class Attention(nn.Module):
    def __init__(self, kv_heads: int = 4, masked: str = "none", dropout: float = 0.0) -> None:
        super().__init__()
        self.q = nn.Linear(32, 32)
        self.kv = nn.Linear(32, 2 * 8 * kv_heads)
        self.kv_heads, self.masked, self.dropout = kv_heads, masked, dropout
        self.bias = nn.Parameter(torch.zeros(1, 4, 16, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, 4, 8).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, 8).permute(2, 0, 3, 1, 4)
        mask = self.bias if self.masked == "grad" else None
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout,
            is_causal=self.masked == "causal",
            enable_gqa=self.kv_heads != 4,
        )
        return out.transpose(1, 2).reshape(b, t, 32)


class NormBeforeTranspose(nn.Module):
    """Layer norm whose output is used transposed: its output gradient is not contiguous. The CPU
    kernel returns a contiguous input gradient anyway; meta's copies the output gradient's
    strides, so the ``view`` behind the norm copies the gradient on meta only."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4 * 32 * 64))
        self.norm = nn.LayerNorm(64)
        self.proj = nn.Parameter(torch.randn(32, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.norm((x * self.scale).view(4, 32, 64))
        return hidden.transpose(1, 2) @ self.proj


def _report(factory, shape: tuple[int, ...], device: str) -> dict:
    """The step's memory report: peak, static bytes, allocation count, per-module peaks."""
    torch.manual_seed(0)
    with torch.device(device):
        model, x = factory(), torch.randn(*shape)
    with track_memory(model, x) as tracker:
        model(x).float().pow(2).mean().backward()
    return tracker.report().to_dict()


CASES = {
    "flash": (lambda: Attention(), (2, 16, 32)),
    "grouped_kv": (lambda: Attention(kv_heads=2), (2, 16, 32)),
    "causal": (lambda: Attention(masked="causal"), (2, 16, 32)),
    "mask_needs_grad": (lambda: Attention(masked="grad"), (2, 16, 32)),
    "dropout": (lambda: Attention(dropout=0.1), (2, 16, 32)),
    "layer_norm_used_transposed": (NormBeforeTranspose, (4 * 32 * 64,)),
}


@pytest.mark.parametrize("case", CASES)
def test_meta_step_equals_cpu_step(case: str) -> None:
    factory, shape = CASES[case]
    assert _report(factory, shape, "meta") == _report(factory, shape, "cpu")


def test_plain_meta_would_keep_the_score_matrix() -> None:
    """What the mode corrects: without it, meta's math path keeps the scores for backward."""
    q = torch.empty(2, 4, 64, 16, device="meta", requires_grad=True)
    with track_memory() as plain:
        kept = F.scaled_dot_product_attention(q, q, q)  # its graph holds what backward needs
    with CpuKernelsOnMeta(), track_memory() as mirrored:
        kept = F.scaled_dot_product_attention(q, q, q)
    assert kept.grad_fn.name() == "ScaledDotProductFlashAttentionForCpuBackward0"
    scores_bytes = 2 * 4 * 64 * 64 * 4
    assert plain.current_bytes - mirrored.current_bytes >= scores_bytes


def test_the_choice_follows_the_cpu() -> None:
    cpu = torch.randn(2, 4, 8, 16, requires_grad=True)
    meta = cpu.to("meta")
    for kwargs in ({}, {"dropout_p": 0.2, "attn_mask": torch.ones(8, 8, dtype=torch.bool)}):
        expected = torch.nn.attention.SDPBackend(
            torch._fused_sdp_choice(
                cpu,
                cpu,
                cpu,
                kwargs.get("attn_mask"),
                kwargs.get("dropout_p", 0.0),
                False,
            )
        ).name.lower()
        arguments = {
            "query": meta,
            "key": meta,
            "value": meta,
            "attn_mask": None,
            "dropout_p": 0.0,
            "is_causal": False,
            "scale": None,
            "enable_gqa": False,
            **kwargs,
        }
        assert cpu_attention_kernel(arguments) == expected
