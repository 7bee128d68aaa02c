"""GPT-2 style decoder-only transformer, the main demo model of remat.

The shape follows GPT-2 (Radford et al., 2019) as written in Karpathy's nanoGPT: token plus
learned position embeddings, a stack of pre-LayerNorm blocks (causal self-attention, then a
4x-wide GELU MLP, each added to the residual stream), a final LayerNorm and a language-model head
tied to the token embedding. Initialisation is GPT-2's: N(0, 0.02) weights, zero biases, and the
residual output projections scaled by 1/sqrt(2 * n_layer).

The defaults (8 blocks, d_model 256, batch 8, seq 256) are the demo GPT; ``n_layer=48,
d_model=2048, seq=2048`` built under ``torch.device("meta")`` is a multi-billion parameter model
that costs no memory to profile symbolically.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from remat.models.base import BuiltModel, _check_divisible, _check_dropout, _check_int

__all__ = ["GPT", "Block", "CausalSelfAttention", "FeedForward", "build"]


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with a fused qkv projection.

    Uses ``F.scaled_dot_product_attention(is_causal=True)``; ``attn_dropout`` applies to the
    attention weights (in training only), ``resid_dropout`` to the output projection.

    Example:
        >>> import torch
        >>> attn = CausalSelfAttention(d_model=16, n_head=4)
        >>> attn(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0) -> None:
        super().__init__()
        _check_divisible("d_model", d_model, "n_head", n_head)
        self.n_head = n_head
        self.d_model = d_model
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over ``x`` of shape (batch, seq, d_model); returns the same shape."""
        batch, seq, _ = x.shape
        q, k, v = self.qkv(x).split(self.d_model, dim=2)
        head_dim = self.d_model // self.n_head
        q = q.view(batch, seq, self.n_head, head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.n_head, head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.n_head, head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(batch, seq, self.d_model)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """The transformer MLP: Linear, GELU, Linear, dropout.

    Example:
        >>> import torch
        >>> FeedForward(d_model=16, hidden=64)(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP to the last dimension of ``x``."""
        return self.dropout(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``.

    Example:
        >>> import torch
        >>> Block(d_model=16, n_head=4)(torch.randn(2, 5, 16)).shape
        torch.Size([2, 5, 16])
    """

    def __init__(self, d_model: int, n_head: int, dropout: float = 0.0, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, mlp_ratio * d_model, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape (batch, seq, d_model)."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2 style decoder: embeddings, ``blocks`` (a ModuleList of :class:`Block`), ``ln_f``,
    ``lm_head``. Maps token ids (batch, seq) to logits (batch, seq, vocab).

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = GPT(vocab=32, max_seq=8, n_layer=2, d_model=16, n_head=2)
        >>> model(torch.randint(32, (2, 8))).shape
        torch.Size([2, 8, 32])
        >>> model.lm_head.weight is model.wte.weight
        True
    """

    def __init__(
        self,
        *,
        vocab: int,
        max_seq: int,
        n_layer: int,
        d_model: int,
        n_head: int,
        dropout: float = 0.0,
        mlp_ratio: int = 4,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        self.max_seq = max_seq
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(max_seq, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, n_head, dropout, mlp_ratio) for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        self.apply(self._init_weights)
        residual_std = 0.02 / math.sqrt(2 * n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.mlp.proj.weight, mean=0.0, std=residual_std)
        if tie_weights:
            self.lm_head.weight = self.wte.weight

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (batch, seq, vocab) for token ids ``idx`` of shape (batch, seq)."""
        seq = idx.shape[1]
        if seq > self.max_seq:
            raise ValueError(
                f"sequence length: got {seq}; expected at most max_seq={self.max_seq}; "
                "fix: build the model with a larger seq or pass shorter inputs"
            )
        pos = torch.arange(seq, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def build(
    *,
    batch: int = 8,
    seq: int = 256,
    n_layer: int = 8,
    d_model: int = 256,
    n_head: int = 8,
    vocab: int = 2048,
    dropout: float = 0.1,
    mlp_ratio: int = 4,
    tie_weights: bool = True,
) -> BuiltModel:
    """The built-in ``gpt``: a :class:`GPT` with random token ids (batch, seq) as input.

    The loss is next-token cross-entropy against random target ids drawn at build time.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> built = build(batch=2, seq=8, n_layer=2, d_model=16, n_head=2, vocab=32)
        >>> logits = built.model(*built.example_inputs)
        >>> logits.shape
        torch.Size([2, 8, 32])
        >>> bool(torch.isfinite(built.loss_fn(logits)))
        True
    """
    for key, value in (
        ("batch", batch),
        ("seq", seq),
        ("n_layer", n_layer),
        ("d_model", d_model),
        ("n_head", n_head),
        ("vocab", vocab),
        ("mlp_ratio", mlp_ratio),
    ):
        _check_int(key, value)
    dropout = _check_dropout(dropout)
    _check_divisible("d_model", d_model, "n_head", n_head)
    model = GPT(
        vocab=vocab,
        max_seq=seq,
        n_layer=n_layer,
        d_model=d_model,
        n_head=n_head,
        dropout=dropout,
        mlp_ratio=mlp_ratio,
        tie_weights=bool(tie_weights),
    )
    idx = torch.randint(vocab, (batch, seq))
    targets = torch.randint(vocab, (batch, seq))

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.to(logits.device).reshape(-1)
        )

    return BuiltModel(model=model, example_inputs=(idx,), loss_fn=loss_fn, name="gpt")
