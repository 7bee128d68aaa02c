"""Small decoder-only transformer with top-k mixture-of-experts MLPs.

The shape follows the sparse MoE decoders (Switch Transformer, Mixtral): GPT-style pre-LayerNorm
blocks whose dense MLP is replaced by a :class:`MoELayer`: a router Linear scores every token
against every expert, the softmax's ``top_k`` largest weights (renormalised to sum to one) choose
the experts, tokens are gathered per expert by index, run through that expert's GELU MLP and
scattered back as a weighted sum. The attention is :class:`remat.models.gpt.CausalSelfAttention`.

The dispatch is data-dependent (``nonzero`` on the routing mask), so this model runs on real
tensors only, not on the ``meta`` device: the zoo's model for "the shapes inside a block depend
on the data, so replay must reproduce the routing".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from remat.models.base import BuiltModel, _check_divisible, _check_dropout, _check_int, _value_error
from remat.models.gpt import CausalSelfAttention, FeedForward

__all__ = ["MoEBlock", "MoEDecoder", "MoELayer", "build"]


class MoELayer(nn.Module):
    """Top-k routed mixture of ``n_experts`` MLPs, applied token by token.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> layer = MoELayer(d_model=8, n_experts=4, top_k=2, hidden=16)
        >>> layer(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(
        self, *, d_model: int, n_experts: int, top_k: int, hidden: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(
            FeedForward(d_model, hidden, dropout) for _ in range(n_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route each token of ``x`` (..., d_model) to its top-k experts; same shape out."""
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])
        probs = F.softmax(self.router(tokens), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            # Data-dependent: which tokens chose this expert, and in which of their k slots.
            # An expert no token chose still runs (on zero rows), so every parameter gets a grad.
            token_idx, slot = (chosen == index).nonzero(as_tuple=True)
            routed = expert(tokens.index_select(0, token_idx))
            out = out.index_add(0, token_idx, routed * weights[token_idx, slot].unsqueeze(-1))
        return out.reshape(shape)


class MoEBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(ln_1(x))``, then ``x + moe(ln_2(x))``.

    Example:
        >>> import torch
        >>> block = MoEBlock(d_model=8, n_head=2, n_experts=4, top_k=2)
        >>> block(torch.randn(2, 5, 8)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(
        self,
        *,
        d_model: int,
        n_head: int,
        n_experts: int,
        top_k: int,
        dropout: float = 0.0,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln_2 = nn.LayerNorm(d_model)
        self.moe = MoELayer(
            d_model=d_model,
            n_experts=n_experts,
            top_k=top_k,
            hidden=mlp_ratio * d_model,
            dropout=dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x`` of shape (batch, seq, d_model)."""
        x = x + self.attn(self.ln_1(x))
        return x + self.moe(self.ln_2(x))


class MoEDecoder(nn.Module):
    """Embeddings, ``blocks`` (a ModuleList of :class:`MoEBlock`), ``ln_f``, ``lm_head``.

    Maps token ids (batch, seq) to logits (batch, seq, vocab); the head is tied to ``wte``.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = MoEDecoder(vocab=32, max_seq=8, n_layer=2, d_model=8, n_head=2,
        ...                    n_experts=4, top_k=2)
        >>> model(torch.randint(32, (2, 8))).shape
        torch.Size([2, 8, 32])
    """

    def __init__(
        self,
        *,
        vocab: int,
        max_seq: int,
        n_layer: int,
        d_model: int,
        n_head: int,
        n_experts: int,
        top_k: int,
        dropout: float = 0.0,
        mlp_ratio: int = 4,
    ) -> None:
        super().__init__()
        self.max_seq = max_seq
        self.wte = nn.Embedding(vocab, d_model)
        self.wpe = nn.Embedding(max_seq, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            MoEBlock(
                d_model=d_model,
                n_head=n_head,
                n_experts=n_experts,
                top_k=top_k,
                dropout=dropout,
                mlp_ratio=mlp_ratio,
            )
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab, bias=False)
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)
        nn.init.normal_(self.wpe.weight, mean=0.0, std=0.02)
        self.lm_head.weight = self.wte.weight

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
    batch: int = 4,
    seq: int = 64,
    n_layer: int = 4,
    d_model: int = 128,
    n_head: int = 4,
    n_experts: int = 4,
    top_k: int = 2,
    vocab: int = 512,
    dropout: float = 0.0,
    mlp_ratio: int = 4,
) -> BuiltModel:
    """The built-in ``moe``: a :class:`MoEDecoder` with random token ids (batch, seq) as input.

    The loss is next-token cross-entropy against random target ids drawn at build time.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> built = build(batch=2, seq=8, n_layer=1, d_model=8, n_head=2, vocab=32)
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
        ("n_experts", n_experts),
        ("top_k", top_k),
        ("vocab", vocab),
        ("mlp_ratio", mlp_ratio),
    ):
        _check_int(key, value)
    dropout = _check_dropout(dropout)
    _check_divisible("d_model", d_model, "n_head", n_head)
    if top_k > n_experts:
        raise _value_error(
            "top_k", top_k, f"at most n_experts={n_experts}", f"pass top_k<={n_experts}"
        )
    model = MoEDecoder(
        vocab=vocab,
        max_seq=seq,
        n_layer=n_layer,
        d_model=d_model,
        n_head=n_head,
        n_experts=n_experts,
        top_k=top_k,
        dropout=dropout,
        mlp_ratio=mlp_ratio,
    )
    idx = torch.randint(vocab, (batch, seq))
    targets = torch.randint(vocab, (batch, seq))

    def loss_fn(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.to(logits.device).reshape(-1)
        )

    return BuiltModel(model=model, example_inputs=(idx,), loss_fn=loss_fn, name="moe")
