"""Discovery by behaviour: attention modules whatever their names, softmaxes that are not attention,
modules shared across layers, and the query rows of cross-attention."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnmonitor import AttentionCapture
from tests.helpers.models import layer_inputs
from tests.helpers.reference import assert_stats_close, attention_probs, head_max_logit, head_means


class GQA(nn.Module):
    """Grouped-query attention through SDPA, in a class whose name says nothing about attention."""

    def __init__(self, dim: int = 16, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq, self.wk = nn.Linear(dim, dim), nn.Linear(dim, kv_heads * self.head_dim)
        self.wv, self.wo = nn.Linear(dim, kv_heads * self.head_dim), nn.Linear(dim, dim)

    def qk(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, seq, _ = x.shape
        q = self.wq(x).view(b, seq, self.heads, self.head_dim).transpose(1, 2)  # [B, H, L, D]
        k = self.wk(x).view(b, seq, self.kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, L, D]
        return q, k

    def forward(self, x: Tensor) -> Tensor:
        b, seq, c = x.shape
        q, k = self.qk(x)
        v = self.wv(x).view(b, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(b, seq, c))


class MHSA(GQA):
    """Multi-head self-attention with the softmax over ``q·kᵀ`` written by hand."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__(dim, heads, heads)

    def forward(self, x: Tensor) -> Tensor:
        b, seq, c = x.shape
        q, k = self.qk(x)
        v = self.wv(x).view(b, seq, self.heads, self.head_dim).transpose(1, 2)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # [B, H, L, L]
        return self.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, seq, c))


class Router(nn.Module):
    """Mixture-of-experts: a softmax over experts of a linear layer's logits ``[B, L, E]`` (not attention)."""

    def __init__(self, dim: int = 16, experts: int = 4) -> None:
        super().__init__()
        self.gate, self.experts = nn.Linear(dim, experts), nn.ModuleList(nn.Linear(dim, dim) for _ in range(experts))

    def forward(self, x: Tensor) -> Tensor:
        weights = self.gate(x).softmax(-1)  # [B, L, E]
        return sum(weights[..., e : e + 1] * expert(x) for e, expert in enumerate(self.experts))


class Head(nn.Module):
    """Classifier: class probabilities ``[B, L, C]`` from a softmax (not attention)."""

    def __init__(self, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        return F.softmax(self.proj(x), dim=-1)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([GQA(), MHSA()])
        self.router, self.head = Router(), Head()

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = x + block(x)
        return self.head(self.router(x))


def _reference(layer: GQA, x: Tensor, causal: bool) -> dict[str, Tensor]:
    """Float64 statistics of ``layer`` on its input ``x`` (weights read directly)."""
    b, seq, _ = x.shape
    q = (x.double() @ layer.wq.weight.double().T + layer.wq.bias.double()).view(b, seq, layer.heads, -1).transpose(1, 2)
    k = (x.double() @ layer.wk.weight.double().T + layer.wk.bias.double()).view(b, seq, layer.kv_heads, -1).transpose(1, 2)
    valid = torch.ones(seq, seq, dtype=torch.bool)
    if causal:
        valid = valid.tril()
    means = head_means(attention_probs(q, k, valid[None, None]), valid[None, None])
    return {**means, "max_logit": head_max_logit(q, k, valid[None, None])}


def test_attention_modules_are_found_by_what_they_compute_not_by_their_names():
    torch.manual_seed(0)
    model, x = Net(), torch.randn(3, 6, 16)
    inputs = layer_inputs(model, list(model.blocks), x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the router and the classifier are not reported as silent attention
        with AttentionCapture(model) as cap, torch.no_grad():
            model(x)
    assert cap.layers == ["blocks.0", "blocks.1"]  # not the router's, not the classifier's softmax
    assert cap.kinds == {"blocks.0": "self", "blocks.1": "self"}
    per_layer = cap.layer_stats()
    assert_stats_close(per_layer["blocks.0"], _reference(model.blocks[0], inputs[0], causal=True))
    assert_stats_close(per_layer["blocks.1"], _reference(model.blocks[1], inputs[1], causal=False))


class Recurrent(nn.Module):
    """One attention module applied at three depths (ALBERT-style sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = MHSA()

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(3):
            x = x + self.attn(x)
        return x


def test_a_shared_module_is_reported_per_call_position_or_pooled_on_request():
    torch.manual_seed(1)
    model, x = Recurrent(), torch.randn(2, 5, 16)
    inputs = layer_inputs(model, [model.attn], x)
    expected = [_reference(model.attn, xi, causal=False) for xi in inputs]
    with AttentionCapture(model) as cap, torch.no_grad():
        model(x)
        model(x)  # a second forward adds to the same three positions
    assert cap.layers == ["attn#0", "attn#1", "attn#2"]
    for layer, reference in zip(cap.layers, expected, strict=True):
        assert_stats_close(cap.layer_stats()[layer], reference)
    assert cap.valid_rows()["attn#1"].tolist() == [20.0] * 4  # 2 forwards x 2 sequences x 5 rows

    with AttentionCapture(model, pool_shared=True) as pooled, torch.no_grad():
        model(x)
    assert pooled.layers == ["attn"]
    mean = {name: sum(r[name] for r in expected) / 3 for name in expected[0]}  # equal rows per call
    mean["max_logit"] = torch.stack([r["max_logit"] for r in expected]).amax(0)  # a maximum, not a mean
    assert_stats_close(pooled.layer_stats()["attn"], mean)


def test_cross_attention_rows_take_the_decoder_padding_and_have_no_position_statistics():
    torch.manual_seed(2)
    layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    tgt, memory = torch.randn(2, 5, 16), torch.randn(2, 5, 16)  # equal lengths: no shape can tell them apart
    tgt_padding = torch.tensor([[False] * 5, [False, False, True, True, True]])  # 5 + 2 real target tokens
    memory_padding = torch.tensor([[False] * 5, [False] * 4 + [True]])
    with AttentionCapture(layer) as cap, torch.no_grad():
        layer(tgt, memory, tgt_key_padding_mask=tgt_padding, memory_key_padding_mask=memory_padding)
    assert cap.kinds == {"self_attn": "self", "multihead_attn": "cross"}
    assert cap.valid_rows()["self_attn"].tolist() == [7.0] * 4
    assert cap.valid_rows()["multihead_attn"].tolist() == [7.0] * 4
    assert "distance" in cap.layer_stats()["self_attn"]
    assert not {"distance", "self_weight", "prev_token_weight", "next_token_weight"} & set(cap.layer_stats()["multihead_attn"])


def test_cross_attention_whose_queries_are_unknown_counts_every_row_and_says_so():
    layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
    tgt, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    with AttentionCapture(layer, targets="multihead_attn") as cap, torch.no_grad():
        with pytest.warns(RuntimeWarning, match="queries of cross-attention layer 'multihead_attn' is unknown"):
            layer(tgt, memory, tgt_key_padding_mask=torch.tensor([[False] * 5, [False] * 2 + [True] * 3]))
    assert cap.valid_rows()["multihead_attn"].tolist() == [10.0] * 4


def test_a_model_without_attention_names_what_to_do():
    with pytest.raises(ValueError, match="has no attention module"):
        AttentionCapture(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))


@pytest.mark.parametrize("wrap", ["checkpoint", "compile", "both"])
def test_layers_keep_their_unwrapped_names_under_wrappers(wrap):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from tests.helpers.models import SdpaAttention, TinyTransformer

    torch.manual_seed(3)
    model = TinyTransformer(SdpaAttention, causal=True, dropout=0.0).eval()
    ids = torch.randint(50, (2, 8))
    with AttentionCapture(model) as plain, torch.no_grad():
        model(ids)
    wrapped = model
    if wrap in ("checkpoint", "both"):
        for i, layer in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(layer)  # the attention module under `_checkpoint_wrapped_module`
    if wrap in ("compile", "both"):
        wrapped = torch.compile(model, backend="eager")  # the model under `_orig_mod`
    assert any(part in n for n, _ in wrapped.named_modules() for part in ("_checkpoint_wrapped_module", "_orig_mod"))
    with AttentionCapture(wrapped) as cap, torch.no_grad():
        wrapped(ids)
    assert cap.layers == plain.layers and cap.target_names == plain.target_names
    for name, value in plain.stats().items():
        torch.testing.assert_close(cap.stats()[name], value, rtol=1e-5, atol=1e-6)
    with AttentionCapture(wrapped, targets=[r"layers\.\d+"]) as named, torch.no_grad():  # regexes name the unwrapped model
        wrapped(ids)
    assert named.layers == plain.layers
