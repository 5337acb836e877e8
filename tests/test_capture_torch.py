"""AttentionCapture on plain PyTorch attention: SDPA, hand-written softmax, nn.MultiheadAttention."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnmonitor import AttentionCapture
from attnmonitor.functional.fused import FUSED_STATISTICS
from attnmonitor.functional.statistics import POSITION_STATISTICS
from tests.helpers.models import EagerAttention, SdpaAttention, TinyTransformer, layer_inputs, qk64
from tests.helpers.reference import assert_stats_close, attention_probs, head_max_logit, head_means


def _padded_batch(vocab: int = 50, b: int = 4, seq: int = 8):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(vocab, (b, seq), generator=g)
    mask = torch.ones(b, seq, dtype=torch.long)
    mask[1, 5:] = 0
    mask[2, 2:] = 0
    mask[3] = 0  # one all-padding sequence
    return ids, mask


def _reference(model: TinyTransformer, ids, mask, causal: bool, scale=None):
    inputs = layer_inputs(model, list(model.layers), ids, mask)
    seq = ids.shape[1]
    key_valid = mask.bool()[:, None, None, :]
    if causal:
        key_valid = key_valid & torch.ones(seq, seq, dtype=torch.bool).tril()
    query_valid = mask.bool()[:, None, :]
    out = []
    for layer, x in zip(model.layers, inputs, strict=True):
        q, k = qk64(layer, x)
        means = head_means(attention_probs(q, k, key_valid, scale), key_valid, query_valid)
        out.append({**means, "max_logit": head_max_logit(q, k, key_valid, query_valid, scale)})
    return out


def _stacked(per_layer):
    return {name: torch.stack([d[name] for d in per_layer]) for name in per_layer[0]}


@pytest.mark.parametrize("layer", [SdpaAttention, EagerAttention])
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(causal=True),
        dict(causal=True, scale=0.2),
        dict(heads=4, kv_heads=2, gqa="enable_gqa"),
        dict(heads=4, kv_heads=1, gqa="repeat", causal=True),
    ],
    ids=["plain", "causal", "scale", "gqa", "gqa-repeat"],
)
def test_statistics_match_float64_reference_with_padding(layer, options):
    torch.manual_seed(0)
    model = TinyTransformer(layer, **options).eval()
    ids, mask = _padded_batch()
    expected = _stacked(_reference(model, ids, mask, options.get("causal", False), options.get("scale")))
    with AttentionCapture(model) as cap:  # query mask from the forward's `attention_mask`
        with torch.no_grad():
            model(ids, attention_mask=mask)
    assert cap.layers == ["layers.0", "layers.1"]
    assert_stats_close(cap.stats(), expected)


def test_additive_float_mask_and_explicit_query_mask():
    torch.manual_seed(1)
    layer = SdpaAttention(causal=False)
    x = torch.randn(2, 6, 16)
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[0, 4:] = False
    additive = torch.zeros(2, 1, 1, 6).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    with AttentionCapture(layer, targets=[""], query_mask=keep) as cap:
        layer.eval()(x, additive)
    q, k = qk64(layer, x)
    key_valid = keep[:, None, None, :]
    expected = head_means(attention_probs(q, k, key_valid), key_valid, keep[:, None, :])
    expected["max_logit"] = head_max_logit(q, k, key_valid, keep[:, None, :])
    assert_stats_close({n: v[0] for n, v in cap.stats().items()}, expected)


def test_accumulates_over_calls_until_reset():
    torch.manual_seed(2)
    model = TinyTransformer(n_layers=1).eval()
    a, b = torch.randint(50, (2, 5)), torch.randint(50, (3, 5))
    with AttentionCapture(model) as cap:
        model(a)
        model(b)
        both = cap.stats()["entropy"]
        counts = cap.valid_rows()["layers.0"]
        cap.reset()
        model(b)
        only_b = cap.stats()["entropy"]
    assert torch.equal(counts, torch.full((4,), 25.0))
    q, k = qk64(model.layers[0], model.embed(torch.cat([a, b])))
    expected = head_means(attention_probs(q, k, torch.ones(1, 1, 1, 5, dtype=torch.bool)))["entropy"]
    torch.testing.assert_close(both[0].double(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(both, only_b)


# nn.MultiheadAttention ---------------------------------------------------------------------------


def _mha_reference(mha: nn.MultiheadAttention, query, key, key_valid, query_valid, batch_first):
    if not batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
    w, bias = mha.in_proj_weight.double(), mha.in_proj_bias.double()
    e, h = mha.embed_dim, mha.num_heads
    q = (query.double() @ w[:e].T + bias[:e]).view(query.shape[0], -1, h, e // h).transpose(1, 2)
    k = (key.double() @ w[e : 2 * e].T + bias[e : 2 * e]).view(key.shape[0], -1, h, e // h).transpose(1, 2)
    means = head_means(attention_probs(q, k, key_valid), key_valid, query_valid)
    return {**means, "max_logit": head_max_logit(q, k, key_valid, query_valid)}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("mask_kind", ["none", "padding", "bool-attn", "float-attn+padding"])
def test_multihead_attention(batch_first, need_weights, average, mask_kind):
    torch.manual_seed(3)
    b, seq, e, h = 3, 6, 16, 4
    mha = nn.MultiheadAttention(e, h, dropout=0.0, batch_first=batch_first).train()
    x = torch.randn(b, seq, e)
    x_in = x if batch_first else x.transpose(0, 1)
    padding = torch.zeros(b, seq, dtype=torch.bool)
    padding[1, 4:] = True  # True = padded, as nn.MultiheadAttention means it
    blocked = torch.rand(seq, seq, generator=torch.Generator().manual_seed(0)) > 0.6
    blocked.fill_diagonal_(False)
    kwargs = {
        "none": {},
        "padding": {"key_padding_mask": padding},
        "bool-attn": {"attn_mask": blocked},
        "float-attn+padding": {
            "attn_mask": torch.zeros(seq, seq).masked_fill(blocked, -math.inf),
            "key_padding_mask": torch.zeros(b, seq).masked_fill(padding, -math.inf),
        },
    }[mask_kind]
    expected_out = mha(x_in, x_in, x_in, need_weights=need_weights, average_attn_weights=average, **kwargs)
    with AttentionCapture(mha) as cap:
        out = mha(x_in, x_in, x_in, need_weights=need_weights, average_attn_weights=average, **kwargs)
    torch.testing.assert_close(out[0], expected_out[0], rtol=0, atol=0)  # the caller gets what it asked for
    assert (out[1] is None) == (expected_out[1] is None)
    if out[1] is not None:
        assert out[1].shape == expected_out[1].shape
    key_valid = torch.ones(b, 1, seq, seq, dtype=torch.bool)
    query_valid = torch.ones(b, 1, seq, dtype=torch.bool)
    if "padding" in kwargs or "key_padding_mask" in kwargs:
        key_valid = key_valid & ~padding[:, None, None, :]
        query_valid = ~padding[:, None, :]
    if "attn_mask" in kwargs:
        key_valid = key_valid & ~blocked
    expected = _mha_reference(mha, x, x, key_valid, query_valid, batch_first=True)
    assert_stats_close({n: v[0] for n, v in cap.stats().items()}, expected)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_transformer_encoder_in_train_and_eval_fast_path(mode):
    torch.manual_seed(4)
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True), num_layers=2)
    encoder.train(mode == "train")
    x = torch.randn(3, 7, 16)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[0, 5:] = True
    attns = [layer.self_attn for layer in encoder.layers]
    torch.backends.mha.set_fastpath_enabled(False)  # the reference needs the attention modules' inputs
    try:
        inputs = layer_inputs(encoder, attns, x, src_key_padding_mask=padding)
    finally:
        torch.backends.mha.set_fastpath_enabled(True)
    with AttentionCapture(encoder) as cap, torch.set_grad_enabled(mode == "train"):
        encoder(x, src_key_padding_mask=padding)
    assert cap.layers == ["layers.0.self_attn", "layers.1.self_attn"]
    key_valid, query_valid = ~padding[:, None, None, :], ~padding[:, None, :]
    expected = [_mha_reference(a, xi, xi, key_valid, query_valid, True) for a, xi in zip(attns, inputs, strict=True)]
    assert_stats_close(cap.stats(), _stacked(expected), rtol=1e-4, atol=1e-5)


def test_transformer_decoder_layer_self_and_cross_attention():
    torch.manual_seed(5)
    layer = nn.TransformerDecoderLayer(16, 4, 32, dropout=0.0, batch_first=True).train()
    tgt, memory = torch.randn(2, 5, 16), torch.randn(2, 7, 16)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    seen = []
    handles = [m.register_forward_pre_hook(lambda mod, a: seen.append(a[:2])) for m in (layer.self_attn, layer.multihead_attn)]
    layer(tgt, memory, tgt_mask=causal)
    for handle in handles:
        handle.remove()
    with AttentionCapture(layer) as cap:
        layer(tgt, memory, tgt_mask=causal)
    assert cap.layers == ["self_attn", "multihead_attn"]
    assert cap.kinds == {"self_attn": "self", "multihead_attn": "cross"}
    tril = torch.ones(5, 5, dtype=torch.bool).tril()
    self_ref = _mha_reference(layer.self_attn, *seen[0], tril, None, True)
    cross_ref = _mha_reference(layer.multihead_attn, *seen[1], torch.ones(1, 1, 1, 7, dtype=torch.bool), None, True)
    for name in POSITION_STATISTICS:  # not defined for cross-attention: absent, NaN in the grid
        del cross_ref[name]
    per_layer = cap.layer_stats()
    assert_stats_close(per_layer["self_attn"], self_ref, rtol=1e-4, atol=1e-5)
    assert_stats_close(per_layer["multihead_attn"], cross_ref, rtol=1e-4, atol=1e-5)
    assert all(bool(cap.stats()[name][1].isnan().all()) for name in POSITION_STATISTICS)


# long sequences ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layer", [SdpaAttention, EagerAttention])
def test_memory_budget_chunks_give_the_materialised_result(layer):
    torch.manual_seed(6)
    model = TinyTransformer(layer, n_layers=1, causal=True, heads=4, kv_heads=2, dim=32).eval()
    ids = torch.randint(50, (2, 384))
    with torch.no_grad():
        with AttentionCapture(model, memory_budget_mb=256) as whole:
            model(ids)
        with AttentionCapture(model, memory_budget_mb=0.05) as chunked:  # ~20 rows a chunk
            model(ids)
    assert 2 * 4 * 384 * 384 * 4 > 0.05 * 2**20 * 4  # the chunked run really did chunk
    for name, value in whole.stats().items():
        torch.testing.assert_close(chunked.stats()[name], value, rtol=1e-4, atol=1e-6)


# lifecycle -------------------------------------------------------------------------------------


def _no_hooks(model: nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in model.modules())


def test_leaving_the_context_restores_the_model_bit_for_bit():
    torch.manual_seed(7)
    model = nn.Sequential(TinyTransformer(EagerAttention, causal=True), nn.Linear(16, 3)).eval()
    encoder = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    ids, x = torch.randint(50, (2, 6)), torch.randn(2, 6, 16)
    with torch.no_grad():
        before = model(ids), encoder(x)
        with AttentionCapture(model), AttentionCapture(encoder):
            model(ids)
            encoder(x)
        after = model(ids), encoder(x)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert _no_hooks(model) and _no_hooks(encoder)
    assert F.softmax is torch.nn.functional.softmax and F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert not torch._C._is_torch_function_mode_enabled()


def test_hooks_and_interception_are_removed_on_exception():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = SdpaAttention()

        def forward(self, x):
            self.attn(x)
            raise KeyError("boom")

    model = Boom()
    with pytest.raises(KeyError):
        with AttentionCapture(model):
            model(torch.randn(1, 3, 16))
    assert _no_hooks(model)
    assert not torch._C._is_torch_function_mode_enabled()


def test_an_exception_inside_an_attention_module_leaves_no_interception_active():
    class FailingAttention(SdpaAttention):
        fail = True

        def forward(self, x, attn_mask=None):
            y = super().forward(x, attn_mask)
            if self.fail:
                raise ValueError("inside attention")
            return y

    model = TinyTransformer(FailingAttention)
    with AttentionCapture(model) as cap:
        with pytest.raises(ValueError):
            model(torch.randint(50, (1, 4)))
        assert not torch._C._is_torch_function_mode_enabled()
        cap.reset()
        FailingAttention.fail = False
        model(torch.randint(50, (1, 4)))
        assert cap.layers == ["layers.0", "layers.1"]


def test_disabled_capture_records_nothing_and_attach_is_idempotent():
    model = TinyTransformer()
    cap = AttentionCapture(model).attach().attach()
    cap.enabled = False
    model(torch.randint(50, (1, 4)))
    assert cap.layers == []
    cap.enabled = True
    model(torch.randint(50, (1, 4)))
    assert cap.layers == ["layers.0", "layers.1"]
    cap.remove()
    cap.remove()
    assert _no_hooks(model)


def test_fused_path_statistics_of_an_sdpa_model_match_the_reference():
    torch.manual_seed(8)
    model = TinyTransformer(SdpaAttention, causal=True, heads=4, kv_heads=2).eval()
    ids = torch.randint(50, (3, 9))
    names = sorted(FUSED_STATISTICS)
    with AttentionCapture(model, statistics=names) as cap, torch.no_grad():
        model(ids)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    inputs = layer_inputs(model, list(model.layers), ids)
    expected = [
        {**head_means(attention_probs(*qk64(layer, x), causal), causal), "max_logit": head_max_logit(*qk64(layer, x), causal)}
        for layer, x in zip(model.layers, inputs, strict=True)
    ]
    assert_stats_close(cap.stats(), {n: torch.stack([e[n] for e in expected]) for n in names}, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("layer", [SdpaAttention, EagerAttention])
def test_bf16_autocast_statistics_are_within_1e_2_of_float32(layer):
    torch.manual_seed(9)
    model = TinyTransformer(layer, causal=True, dim=32, dropout=0.0).eval()
    ids = torch.randint(50, (4, 16))
    with AttentionCapture(model) as full, torch.no_grad():
        model(ids)
    with AttentionCapture(model) as half, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids)
    for name, value in full.stats().items():
        assert half.stats()[name].dtype == torch.float32
        torch.testing.assert_close(half.stats()[name], value, rtol=1e-2, atol=1e-2, msg=name)


def test_sample_rows_bounds_the_rows_evaluated_per_call():
    model = TinyTransformer(EagerAttention, causal=True).eval()
    with AttentionCapture(model, sample_rows=5) as cap, torch.no_grad():
        model(torch.randint(50, (3, 20)))
    assert cap.valid_rows()["layers.0"].tolist() == [15.0] * 4  # 5 rows x 3 sequences, every head
    with pytest.raises(ValueError, match="`sample_rows` must be an int >= 1 or None, got 0"):
        AttentionCapture(model, sample_rows=0)
