"""FlexAttention: statistics from q, k, score_mod and mask_mod against explicit float64 references."""

import math

import pytest
import torch
import torch.nn.attention.flex_attention as fa
from torch import Tensor, nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attnmonitor import AttentionCapture
from attnmonitor.functional import evaluation
from attnmonitor.functional.fused import fused_row_statistics
from tests.helpers.hf_families import RefLayer, means, statistic_sums

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")

B, L, DIM, HEADS, WINDOW, PREFIX, CAP = 2, 12, 32, 4, 4, (5, 3), 5.0
DOCUMENTS = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 2, 2]])
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])
RELATIVE = torch.randn(HEADS, 2 * L - 1, generator=torch.Generator().manual_seed(5))  # bias[h, q - k + L - 1]

SCORE_MODS = {
    "none": None,
    "alibi": lambda s, b, h, q, k: s + SLOPES[h] * (k - q),
    "softcap": lambda s, b, h, q, k: CAP * torch.tanh(s / CAP),
    "relative_bias": lambda s, b, h, q, k: s + RELATIVE[h, q - k + L - 1],
}
MASK_MODS = {
    "none": None,
    "causal": lambda b, h, q, k: q >= k,
    "sliding_window": lambda b, h, q, k: (q >= k) & (q - k < WINDOW),
    "document": lambda b, h, q, k: (DOCUMENTS[b, q] == DOCUMENTS[b, k]) & (q >= k),
    "prefix_lm": lambda b, h, q, k: (k < torch.tensor(PREFIX)[b]) | (q >= k),
}


def reference_scores(s: Tensor, kind: str) -> Tensor:
    """Float64 modified logits ``[B, H, L, L]``, written out by hand."""
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    if kind == "alibi":
        return s + SLOPES.double()[:, None, None] * (k - q)
    if kind == "softcap":
        return CAP * torch.tanh(s / CAP)
    if kind == "relative_bias":
        return s + RELATIVE.double()[:, q - k + L - 1]
    return s


def reference_masks(kind: str) -> tuple[Tensor, Tensor]:
    """``key_valid [B, L, L]`` and ``sink [B, L]`` (first key of each row's own sequence or document)."""
    q, k = torch.arange(L)[:, None], torch.arange(L)[None, :]
    causal = (k <= q).expand(B, L, L)
    sink = torch.zeros(B, L, dtype=torch.long)
    if kind == "none":
        return torch.ones(B, L, L, dtype=torch.bool), sink
    if kind == "causal":
        return causal, sink
    if kind == "sliding_window":
        return causal & (q - k < WINDOW), sink  # rows past the window see no sink: their sink mass is 0
    if kind == "document":
        same = DOCUMENTS[:, :, None] == DOCUMENTS[:, None, :]
        starts = torch.stack([torch.tensor([int((row == d).nonzero()[0]) for d in row]) for row in DOCUMENTS])
        return causal & same, starts
    return causal | (k < torch.tensor(PREFIX)[:, None, None]), sink


class FlexSelfAttention(nn.Module):
    """Self-attention through ``flex_attention``, called as the given ``flex`` (eager, compiled, module attribute)."""

    def __init__(self, score_mod=None, mask_mod=None, kv_heads: int = HEADS, flex=None) -> None:
        super().__init__()
        self.kv_heads, self.head_dim = kv_heads, DIM // HEADS
        self.q = nn.Linear(DIM, DIM)
        self.k = nn.Linear(DIM, kv_heads * self.head_dim)
        self.v = nn.Linear(DIM, kv_heads * self.head_dim)
        self.score_mod, self.mask_mod, self.flex = score_mod, mask_mod, flex

    def qk(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, length, _ = x.shape
        q = self.q(x).view(b, length, HEADS, self.head_dim).transpose(1, 2)
        k, v = (p(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2) for p in (self.k, self.v))
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qk(x)
        block_mask = None if self.mask_mod is None else create_block_mask(self.mask_mod, x.shape[0], None, L, L, device="cpu")
        call = self.flex or flex_attention
        out = call(q, k, v, score_mod=self.score_mod, block_mask=block_mask, enable_gqa=self.kv_heads != HEADS)
        return out.transpose(1, 2).flatten(2)


@torch.no_grad()
def reference(layer: FlexSelfAttention, x: Tensor, score: str, mask: str) -> dict[str, Tensor]:
    q, k, _ = (t.double() for t in layer.qk(x))
    k = k.repeat_interleave(HEADS // layer.kv_heads, dim=1)
    logits = reference_scores(q @ k.transpose(-1, -2) / math.sqrt(layer.head_dim), score)
    key_valid, sink = reference_masks(mask)
    probs = logits.masked_fill(~key_valid[:, None], -math.inf).softmax(-1)
    expected = means(*statistic_sums(RefLayer("flex", "self", probs, key_valid, key_valid.any(-1), sink)))
    expected["max_logit"] = logits.masked_fill(~key_valid[:, None], -math.inf).amax(dim=(0, 2, 3))  # of the modified scores
    return expected


def assert_matches(cap: AttentionCapture, expected: dict[str, Tensor], layer: str = "FlexSelfAttention") -> None:
    assert cap.layers == [layer]
    got = cap.layer_stats()[layer]
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("mask", list(MASK_MODS))
@pytest.mark.parametrize("score", list(SCORE_MODS))
def test_statistics_follow_score_mod_and_mask_mod(score, mask):
    torch.manual_seed(0)
    layer = FlexSelfAttention(SCORE_MODS[score], MASK_MODS[mask])
    x = torch.randn(B, L, DIM)
    with AttentionCapture(layer) as cap, torch.no_grad():
        out = layer(x)
    assert_matches(cap, reference(layer, x, score, mask))
    with torch.no_grad():
        torch.testing.assert_close(out, layer(x))  # the model's output is flex's own


@pytest.mark.parametrize("budget_mb", [256.0, 0.002])  # whole call / a few query rows per chunk
def test_grouped_query_attention_in_chunks(budget_mb):
    torch.manual_seed(1)
    layer = FlexSelfAttention(SCORE_MODS["alibi"], MASK_MODS["document"], kv_heads=2)
    x = torch.randn(B, L, DIM)
    with AttentionCapture(layer, memory_budget_mb=budget_mb) as cap, torch.no_grad():
        layer(x)
    assert_matches(cap, reference(layer, x, "alibi", "document"))


@pytest.mark.parametrize("how", ["module_attribute", "compiled_function", "compiled_model"])
def test_every_call_site_is_intercepted(how):
    torch.manual_seed(2)
    flex = {"module_attribute": lambda *a, **k: fa.flex_attention(*a, **k)}.get(how)
    if how == "compiled_function":
        flex = torch.compile(flex_attention, backend="eager")
    layer = FlexSelfAttention(SCORE_MODS["softcap"], MASK_MODS["sliding_window"], flex=flex)
    model = nn.Sequential(layer)
    if how == "compiled_model":
        model.compile(backend="eager")
    x = torch.randn(B, L, DIM)
    with torch.no_grad():
        model(x)  # compiled (when it is) before the capture
    with AttentionCapture(model) as cap, torch.no_grad():
        model(x)
    assert_matches(cap, reference(layer, x, "softcap", "sliding_window"), layer="0")
    assert fa.flex_attention.__name__ == "flex_attention" and fa.flex_attention.__module__ == fa.__name__  # restored
    torch._dynamo.reset()


def test_statistics_without_score_mod_take_the_fused_path_and_agree(monkeypatch):
    torch.manual_seed(3)
    layer = FlexSelfAttention(None, MASK_MODS["causal"])
    x = torch.randn(B, L, DIM)
    fused = ("entropy", "normalized_entropy", "sink_mass", "self_weight", "distance")
    results = []

    def spy(*args, **kwargs):
        results.append(fused_row_statistics(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(evaluation, "fused_row_statistics", spy)
    with AttentionCapture(layer, statistics=fused) as cap, torch.no_grad():
        layer(x)
    assert len(results) == 1 and results[0] is not None
    expected = reference(layer, x, "none", "causal")
    assert_matches(cap, {name: expected[name] for name in fused})
