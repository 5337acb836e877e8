"""Small attention models written for the tests, and float64 references of their attention."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.functional import scaled_dot_product_attention as sdpa  # bound name: no F. lookup at call time


class SdpaAttention(nn.Module):
    """nanoGPT-style attention through ``scaled_dot_product_attention``, optionally grouped-query."""

    def __init__(
        self,
        dim: int = 16,
        heads: int = 4,
        kv_heads: int | None = None,
        causal: bool = False,
        scale: float | None = None,
        gqa: str = "enable_gqa",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads or heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.v = nn.Linear(dim, self.kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)
        self.causal, self.scale, self.gqa, self.dropout = causal, scale, gqa, dropout

    def qk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, seq, _ = x.shape
        q = self.q(x).view(b, seq, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        k = self.k(x).view(b, seq, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, D]
        return q, k

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, seq, c = x.shape
        q, k = self.qk(x)
        v = self.v(x).view(b, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        extra = {}
        if self.kv_heads != self.heads:
            if self.gqa == "enable_gqa":
                extra["enable_gqa"] = True
            else:  # repeat the key/value heads, as many HF models do
                k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))
        dropout = self.dropout if self.training else 0.0
        causal = self.causal
        if causal and attn_mask is not None:  # torch >= 2.14 refuses a mask with is_causal: fold causality into it
            attn_mask, causal = attn_mask & torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril(), False
        y = sdpa(q, k, v, attn_mask=attn_mask, is_causal=causal, scale=self.scale, dropout_p=dropout, **extra)
        return self.o(y.transpose(1, 2).reshape(b, seq, c))


class EagerAttention(SdpaAttention):
    """The same attention with the softmax written by hand (``Tensor.softmax``)."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, seq, c = x.shape
        q, k = self.qk(x)
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = self.v(x).view(b, seq, self.kv_heads, self.head_dim).transpose(1, 2).repeat_interleave(self.heads // self.kv_heads, dim=1)
        att = q @ k.transpose(-2, -1) * (self.scale or 1 / math.sqrt(self.head_dim))  # [B, H, L, L]
        if self.causal:
            att = att.masked_fill(~torch.ones(seq, seq, dtype=torch.bool).tril(), float("-inf"))
        if attn_mask is not None:
            att = att.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else att + attn_mask
        att = nn.functional.dropout(att.softmax(dim=-1), self.dropout, self.training)
        return self.o((att @ v).transpose(1, 2).reshape(b, seq, c))


class TinyTransformer(nn.Module):
    """Embedding + residual attention layers; ``forward(input_ids, attention_mask=None)``."""

    def __init__(self, layer: type[SdpaAttention] = SdpaAttention, n_layers: int = 2, vocab: int = 50, dim: int = 16, **kwargs) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(layer(dim, **kwargs) for _ in range(n_layers))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = self.embed(input_ids)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # keys only, as BERT
        for layer in self.layers:
            x = x + layer(x, mask)
        return x


def layer_inputs(model: nn.Module, modules: list[nn.Module], *args, **kwargs) -> list[Tensor]:
    """Run ``model`` once and return the first positional input of each module (test-side hooks)."""
    seen: list[Tensor] = []
    handles = [m.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach())) for m in modules]
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def qk64(layer: SdpaAttention, x: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 ``q [B, H, L, D]``, ``k [B, Hkv, L, D]`` of ``layer`` on input ``x``, from its weights."""
    b, seq, _ = x.shape
    x = x.double()
    q = (x @ layer.q.weight.double().T + layer.q.bias.double()).view(b, seq, layer.heads, layer.head_dim).transpose(1, 2)
    k = (x @ layer.k.weight.double().T + layer.k.bias.double()).view(b, seq, layer.kv_heads, layer.head_dim).transpose(1, 2)
    return q, k
