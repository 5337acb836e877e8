"""``max_logit``: the largest pre-softmax score per head, against float64 references written here.

The reference of every test computes the logits the softmax sees in float64 from the layer's weights
(``scale · q · kᵀ`` plus the additive mask, bias or score modification), then takes, per head, the
largest of them over valid query rows and valid keys with explicit loops.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attnmonitor import AttentionCapture
from attnmonitor.functional import chunked, evaluation
from attnmonitor.functional.chunked import qk_logit_max
from attnmonitor.functional.statistics import STATISTICS, check_statistics, row_statistics
from attnmonitor.metrics import AttentionMaxLogit, AttentionStatistic, HeadStatisticGrid
from attnmonitor.tensorboard.writer import statistic_scalars
from tests.helpers.models import EagerAttention, SdpaAttention, TinyTransformer, layer_inputs, qk64

B, L, DIM, HEADS = 3, 8, 16, 4


def reference_max(logits: Tensor, key_valid: Tensor | None = None, query_valid: Tensor | None = None) -> Tensor:
    """Float64 ``[H]``: per head, the largest ``logits[b, h, i, j]`` over valid rows ``i`` (``query_valid``
    ``[B, Lq]``) and valid keys ``j`` (``key_valid`` broadcastable to ``logits``); NaN for a head with none."""
    logits = logits.detach()
    b, h, lq, lk = logits.shape
    kv = torch.ones(b, h, lq, lk, dtype=torch.bool) if key_valid is None else key_valid.expand(b, h, lq, lk)
    out = []
    for hi in range(h):
        best = -math.inf
        for bi in range(b):
            for i in range(lq):
                if query_valid is not None and not bool(query_valid[bi, i]):
                    continue
                for j in range(lk):
                    if kv[bi, hi, i, j]:
                        best = max(best, float(logits[bi, hi, i, j]))
        out.append(best if best > -math.inf else math.nan)
    return torch.tensor(out, dtype=torch.float64)


def padded_batch() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(50, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 3:] = 0
    return ids, mask


def logits64(layer: SdpaAttention, x: Tensor, scale: float | None = None) -> Tensor:
    q, k = qk64(layer, x)
    k = k.repeat_interleave(layer.heads // layer.kv_heads, dim=1)
    scale = 1 / math.sqrt(layer.head_dim) if scale is None else scale
    return q @ k.transpose(-1, -2) * scale  # [B, H, L, L]


def model_references(model: TinyTransformer, ids: Tensor, mask: Tensor | None, causal: bool, bias: Tensor | None = None) -> Tensor:
    """``[layers, H]`` references of a TinyTransformer (keys: padding and causal; rows: real tokens)."""
    inputs = layer_inputs(model, list(model.layers), ids, mask)
    key_valid = torch.ones(1, 1, L, L, dtype=torch.bool) if mask is None else mask.bool()[:, None, None, :]
    if causal:
        key_valid = key_valid & torch.ones(L, L, dtype=torch.bool).tril()
    query_valid = None if mask is None else mask.bool()
    out = []
    for layer, x in zip(model.layers, inputs, strict=True):
        logits = logits64(layer, x, layer.scale)
        if bias is not None:
            logits = logits + bias.double()
        out.append(reference_max(logits, key_valid, query_valid))
    return torch.stack(out)


def captured(cap: AttentionCapture) -> Tensor:
    return cap.stats()["max_logit"].double()


def test_max_logit_is_a_default_statistic_reduced_with_max():
    assert "max_logit" in STATISTICS and check_statistics("max_logit") == ("max_logit",)
    with pytest.raises(ValueError, match="need the logits"):
        row_statistics(torch.full((1, 1, 2, 2), 0.5), statistics=["max_logit"])


@pytest.mark.parametrize("layer", [SdpaAttention, EagerAttention])
@pytest.mark.parametrize(
    "options",
    [
        dict(causal=True),
        dict(),
        dict(causal=True, scale=0.7),
        dict(heads=4, kv_heads=2, causal=True),
        dict(heads=4, kv_heads=1, gqa="repeat"),
    ],
    ids=["causal", "padding", "scale", "gqa", "gqa-repeat"],
)
def test_sdpa_and_eager_attention_with_causal_and_padding_masks(layer, options):
    torch.manual_seed(0)
    model = TinyTransformer(layer, **options).eval()
    ids, mask = padded_batch()
    with AttentionCapture(model) as cap, torch.no_grad():
        model(ids, attention_mask=mask)
    expected = model_references(model, ids, mask, options.get("causal", False))
    torch.testing.assert_close(captured(cap), expected, rtol=1e-5, atol=1e-5)
    assert not cap.skipped


class BiasedModel(nn.Module):
    """One attention layer called with an additive float mask: padding (``-inf`` or the dtype's minimum)
    plus a finite positional bias, the way T5 or ALiBi models pass theirs."""

    def __init__(self, layer: type[SdpaAttention], **options) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, DIM)
        self.attn = layer(DIM, heads=HEADS, **options)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        return self.attn(self.embed(ids), mask)


def additive_mask(mask: Tensor, blocked: float) -> tuple[Tensor, Tensor]:
    """``(float mask [B, H, L, L], finite bias [1, H, L, L])``: a relative-position bias, ``blocked`` on padded keys."""
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(1, HEADS, L, L, generator=g) * 3
    pad = torch.zeros(B, 1, 1, L).masked_fill(~mask.bool()[:, None, None, :], blocked)
    return bias + pad, bias


@pytest.mark.parametrize("layer", [SdpaAttention, EagerAttention])
@pytest.mark.parametrize("blocked", [-math.inf, torch.finfo(torch.float32).min], ids=["-inf", "finfo.min"])
@pytest.mark.parametrize("budget_mb", [256.0, 0.0005], ids=["whole", "chunks"])
def test_additive_float_mask_and_positional_bias(layer, blocked, budget_mb):
    torch.manual_seed(1)
    model = BiasedModel(layer, dropout=0.0).eval()
    ids, mask = padded_batch()
    float_mask, bias = additive_mask(mask, blocked)
    with AttentionCapture(model, memory_budget_mb=budget_mb) as cap, torch.no_grad():
        model(ids, float_mask)
    x = model.embed(ids).detach()
    expected = reference_max(logits64(model.attn, x) + bias.double(), mask.bool()[:, None, None, :], mask.bool())
    torch.testing.assert_close(captured(cap)[0], expected, rtol=1e-5, atol=1e-5)
    # the bias matters: without it the maxima differ
    assert not torch.allclose(expected, reference_max(logits64(model.attn, x), mask.bool()[:, None, None, :], mask.bool()), atol=1e-3)


@pytest.mark.parametrize("budget_mb", [256.0, 0.0005], ids=["whole", "chunks"])
def test_bool_mask_on_the_chunked_path_with_a_tiny_budget(budget_mb, monkeypatch):
    torch.manual_seed(2)
    model = TinyTransformer(SdpaAttention, causal=True).eval()
    ids, mask = padded_batch()
    sizes = []
    original = chunked.qk_chunks

    def spy(*args, **kwargs):
        for chunk in original(*args, **kwargs):
            sizes.append(chunk.probs.shape[-2])
            assert chunk.logit_max is not None and chunk.logit_max.shape == chunk.probs.shape[:-1]
            yield chunk

    monkeypatch.setattr(evaluation, "qk_chunks", spy)
    with AttentionCapture(model, memory_budget_mb=budget_mb) as cap, torch.no_grad():
        model(ids, attention_mask=mask)
    assert (max(sizes) < L) == (budget_mb < 1)  # several chunks per call with the tiny budget
    torch.testing.assert_close(captured(cap), model_references(model, ids, mask, causal=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("statistics", [("entropy", "sink_mass", "max_logit"), ("max_logit",)], ids=["fused", "alone"])
@pytest.mark.parametrize("budget_mb", [256.0, 0.0005], ids=["whole", "chunks"])
def test_fused_path_takes_an_extra_pass_of_chunked_maxima(statistics, budget_mb, monkeypatch):
    torch.manual_seed(3)
    model = TinyTransformer(SdpaAttention).eval()  # a padding mask, no causal mask: the fused path applies
    ids, mask = padded_batch()
    fused, passes, softmax_chunks = [], [], []
    original_fused, original_max, original_chunks = evaluation.fused_row_statistics, chunked.qk_logit_max, chunked.qk_chunks

    def spy_fused(*args, **kwargs):
        fused.append(original_fused(*args, **kwargs))
        return fused[-1]

    def spy_max(*args, **kwargs):
        passes.append(original_max(*args, **kwargs))
        return passes[-1]

    def spy_chunks(*args, **kwargs):
        softmax_chunks.append(1)
        return original_chunks(*args, **kwargs)

    monkeypatch.setattr(evaluation, "fused_row_statistics", spy_fused)
    monkeypatch.setattr(evaluation, "qk_logit_max", spy_max)
    monkeypatch.setattr(evaluation, "qk_chunks", spy_chunks)
    with AttentionCapture(model, statistics=statistics, memory_budget_mb=budget_mb) as cap, torch.no_grad():
        model(ids, attention_mask=mask)
    assert len(passes) == 2 and not softmax_chunks  # one max pass per layer, no probabilities
    if len(statistics) > 1:
        assert len(fused) == 2 and all(result is not None for result in fused)  # the fused path was taken
    torch.testing.assert_close(captured(cap), model_references(model, ids, mask, causal=False), rtol=1e-5, atol=1e-5)
    counts = torch.stack(list(cap.valid_rows().values()))
    expected_rows = sum(int(mask[b].sum()) for b in range(B))
    assert bool((counts == expected_rows).all())


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("lq", [9, 5, 13], ids=["square", "fewer-queries", "more-queries"])
def test_qk_logit_max_equals_the_chunked_maxima_and_a_reference(causal, mask_kind, lq):
    g = torch.Generator().manual_seed(4)
    lk = 9
    q, k = torch.randn(2, 4, lq, 8, generator=g), torch.randn(2, 2, lk, 8, generator=g)
    keep = torch.rand(2, 1, lq, lk, generator=g) > 0.3
    keep[0, 0, 2] = False  # a row with no valid key: -inf
    bias = torch.randn(2, 1, lq, lk, generator=g)
    mask = {"none": None, "bool": keep, "float": bias.masked_fill(~keep, -math.inf)}[mask_kind]
    valid = torch.ones(2, 1, lq, lk, dtype=torch.bool) if mask is None else keep
    if causal:
        valid = valid & (torch.arange(lk) <= torch.arange(lq)[:, None])  # top-left, as SDPA
    kk = k.double().repeat_interleave(2, dim=1)
    logits = q.double() @ kk.transpose(-1, -2) * 0.3 + (bias.double() if mask_kind == "float" else 0.0)
    expected = []
    for b in range(2):
        for h in range(4):
            for i in range(lq):
                keys = [float(logits[b, h, i, j]) for j in range(lk) if valid[b, 0, i, j]]
                expected.append(max(keys) if keys else -math.inf)
    expected = torch.tensor(expected, dtype=torch.float64).view(2, 4, lq)
    for budget in (1 << 30, 600, 1):  # one block, a few rows per block, one row per block
        got = qk_logit_max(q, k, mask, causal, scale=0.3, budget_bytes=budget)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
        chunks = chunked.qk_chunks(q, k, mask, causal, scale=0.3, budget_bytes=budget, logit_max=True)
        torch.testing.assert_close(torch.cat([c.logit_max for c in chunks], -1), got, rtol=1e-6, atol=1e-6)


# FlexAttention --------------------------------------------------------------------------------
CAP = 4.0
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])
SCORE_MODS = {
    "softcap": (lambda s, b, h, q, k: CAP * torch.tanh(s / CAP), lambda s, q, k: CAP * torch.tanh(s / CAP)),
    "alibi": (lambda s, b, h, q, k: s + SLOPES[h] * (k - q), lambda s, q, k: s + SLOPES.double()[:, None, None] * (k - q)),
}


class FlexLayer(nn.Module):
    def __init__(self, score_mod, kv_heads: int = HEADS) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.scale = HEADS, kv_heads, 8, None
        self.q, self.k, self.v = nn.Linear(DIM, HEADS * 8), nn.Linear(DIM, kv_heads * 8), nn.Linear(DIM, kv_heads * 8)
        self.score_mod = score_mod

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        q = self.q(x).view(b, L, HEADS, 8).transpose(1, 2)
        k, v = (p(x).view(b, L, self.kv_heads, 8).transpose(1, 2) for p in (self.k, self.v))
        block_mask = create_block_mask(lambda b, h, q, k: q >= k, None, None, L, L, device="cpu")
        return flex_attention(q, k, v, score_mod=self.score_mod, block_mask=block_mask, enable_gqa=self.kv_heads != HEADS)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile:UserWarning")
@pytest.mark.parametrize("score", list(SCORE_MODS))
@pytest.mark.parametrize("kv_heads", [HEADS, 2], ids=["mha", "gqa"])
def test_flex_score_mod_maxima_are_of_the_modified_scores(score, kv_heads):
    torch.manual_seed(5)
    layer = FlexLayer(SCORE_MODS[score][0], kv_heads)
    x = torch.randn(B, L, DIM) * 3  # large logits: soft-capping changes the maximum
    with AttentionCapture(layer) as cap, torch.no_grad():
        layer(x)
    q64, k64 = qk64(layer, x)
    raw = q64 @ k64.repeat_interleave(HEADS // kv_heads, dim=1).transpose(-1, -2) / math.sqrt(8)
    positions = torch.arange(L)
    modified = SCORE_MODS[score][1](raw, positions[:, None], positions[None, :])
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    expected = reference_max(modified, causal)
    torch.testing.assert_close(captured(cap)[0], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, reference_max(raw, causal), atol=1e-3)  # the modification matters
    if score == "softcap":
        assert bool((captured(cap) < CAP).all())


# nn.MultiheadAttention ------------------------------------------------------------------------
def mha_logits(mha: nn.MultiheadAttention, query: Tensor, key: Tensor) -> Tensor:
    """Float64 ``[B, H, Lq, Lk]`` logits of a batch-first ``nn.MultiheadAttention`` from its weights."""
    w, bias = mha.in_proj_weight.double(), mha.in_proj_bias.double()
    e, h = mha.embed_dim, mha.num_heads
    q = query.double() @ w[:e].T + bias[:e]
    k = key.double() @ w[e : 2 * e].T + bias[e : 2 * e]
    b, lq, lk = query.shape[0], query.shape[1], key.shape[1]
    q = q.view(b, lq, h, e // h).transpose(1, 2)
    k = k.view(b, lk, h, e // h).transpose(1, 2)
    return q @ k.transpose(-1, -2) / math.sqrt(e // h)


@pytest.mark.filterwarnings("ignore:attnmonitor. the padding of the queries of cross-attention:RuntimeWarning")
@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_self_and_cross_attention(need_weights):
    torch.manual_seed(6)
    mha = nn.MultiheadAttention(DIM, HEADS, batch_first=True).eval()
    x, memory = torch.randn(B, L, DIM), torch.randn(B, 5, DIM)
    _, mask = padded_batch()
    padding = ~mask.bool()  # MHA: True = blocked
    model = nn.ModuleDict({"self_attn": mha})
    with AttentionCapture(model, targets=["self_attn"]) as cap, torch.no_grad():
        mha(x, x, x, key_padding_mask=padding, need_weights=need_weights)
    expected = reference_max(mha_logits(mha, x, x), mask.bool()[:, None, None, :], mask.bool())
    torch.testing.assert_close(cap.layer_stats()["self_attn"]["max_logit"].double(), expected, rtol=1e-5, atol=1e-5)
    with AttentionCapture(model, targets=["self_attn"]) as cap, torch.no_grad():
        mha(x, memory, memory, need_weights=need_weights)  # cross-attention: max_logit is defined
    assert cap.kinds == {"self_attn": "cross"}
    stats = cap.layer_stats()["self_attn"]
    assert "distance" not in stats
    torch.testing.assert_close(stats["max_logit"].double(), reference_max(mha_logits(mha, x, memory)), rtol=1e-5, atol=1e-5)


# robustness -----------------------------------------------------------------------------------
class NanAttention(EagerAttention):
    """Eager attention whose logits hold a NaN at one valid (row, key) of batch element 0."""

    def forward(self, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        b, seq, c = x.shape
        q, k = self.qk(x)
        att = q @ k.transpose(-2, -1)
        att[0, 0, 1, 0] = float("nan")
        v = self.v(x).view(b, seq, self.heads, self.head_dim).transpose(1, 2)
        return self.o((att.softmax(-1) @ v).transpose(1, 2).reshape(b, seq, c))


def test_non_finite_logits_are_skipped_and_padded_rows_are_not_an_error():
    torch.manual_seed(7)
    layer = NanAttention(DIM, heads=HEADS, dropout=0.0)
    with AttentionCapture(layer, statistics=["max_logit"]) as cap, torch.no_grad(), pytest.warns(RuntimeWarning):
        layer(torch.randn(B, L, DIM))
    assert cap.skipped == {"NanAttention": 1} and not cap.accumulator.counts
    # a sequence of padding only (every logit -inf in its rows) is no error: it counts for nothing
    model = TinyTransformer(EagerAttention, causal=True).eval()
    ids, mask = padded_batch()
    mask[0] = 0
    with AttentionCapture(model) as cap, torch.no_grad():
        model(ids, attention_mask=mask)
    assert not cap.skipped
    values = captured(cap)
    assert bool(torch.isfinite(values).all())
    torch.testing.assert_close(values, model_references(model, ids, mask, causal=True), rtol=1e-5, atol=1e-5)


def test_sample_rows_keeps_eager_maxima_exact():
    torch.manual_seed(8)
    model = TinyTransformer(EagerAttention, causal=True).eval()
    ids, mask = padded_batch()
    with AttentionCapture(model, sample_rows=2) as cap, torch.no_grad():
        model(ids, attention_mask=mask)
    torch.testing.assert_close(captured(cap), model_references(model, ids, mask, causal=True), rtol=1e-5, atol=1e-5)


# state, metric and logging ----------------------------------------------------------------------
def test_state_reduces_maxima_with_max_and_reports_nan_where_nothing_was_seen():
    state = HeadStatisticGrid(["entropy", "max_logit"], num_layers=2, num_heads=2)
    assert state._reductions["maxima"].__name__ == "dim_zero_max"
    state.update(torch.ones(1, 2, 2), torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[[3.0, -1.0], [-math.inf, -math.inf]]]))
    state.update(torch.ones(1, 2, 2), torch.tensor([[1.0, 1.0], [0.0, 0.0]]), torch.tensor([[[2.0, 5.0], [-math.inf, -math.inf]]]))
    values, counts = state.synced()
    torch.testing.assert_close(values["max_logit"][0], torch.tensor([3.0, 5.0]))
    assert bool(values["max_logit"][1].isnan().all())  # no valid row: NaN (not observed), never -inf
    assert list(values) == ["entropy", "max_logit"]


def test_metric_class_takes_logits_and_reduces_with_max():
    metric = AttentionMaxLogit(num_layers=2, num_heads=2)
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 2, 4, 5, generator=g) * 4
    key_valid = torch.rand(3, 1, 4, 5, generator=g) > 0.4
    query_valid = torch.tensor([True, True, False])[:, None, None]
    metric.update(logits, key_valid, query_valid, layer=1)
    metric.update(logits[:1] - 100, layer=1)
    expected = reference_max(logits.double(), key_valid, query_valid.view(3, 1).expand(3, 4))
    torch.testing.assert_close(metric.compute()[1].double(), expected)
    assert metric.compute()[0].tolist() == [0.0, 0.0] and metric.counts[0].sum() == 0  # as the means: check counts
    assert isinstance(metric, AttentionStatistic) and metric._reductions["maxima"].__name__ == "dim_zero_max"


def test_scalars_of_a_max_statistic_are_maxima_over_heads_and_layers():
    values = {
        "max_logit": torch.tensor([[1.0, 7.0], [3.0, float("nan")]]),
        "entropy": torch.tensor([[1.0, 3.0], [2.0, 2.0]]),
    }
    observed = torch.tensor([[True, True], [True, False]])
    scalars = statistic_scalars("train", ["a", "b"], values, observed, per_head=True)
    assert scalars["attn_train/max_logit"] == 7.0 and scalars["attn_train_layers/max_logit/a"] == 7.0
    assert scalars["attn_train_layers/max_logit/b"] == 3.0 and "attn_train_heads/max_logit/b/head_1" not in scalars
    assert scalars["attn_train/entropy"] == 2.0  # the others stay means
