import math

import pytest
import torch

from attnmonitor.functional import (
    ROW_STATISTICS,
    STATISTICS,
    attention_statistics,
    check_statistics,
    chunked_head_sums,
    probability_chunks,
    qk_chunks,
    row_statistics,
)
from attnmonitor.functional.fused import FUSED_STATISTICS, fused_row_statistics
from attnmonitor.functional.masks import diagonal_valid, sink_keys
from attnmonitor.functional.statistics import head_sums
from tests.helpers.reference import NAMES, assert_stats_close, attention_probs, head_means


def _masked_case(seed: int = 0):
    """Random probabilities with causal + padding masks, a one-hot row and a fully masked sequence."""
    g = torch.Generator().manual_seed(seed)
    b, h, seq = 3, 4, 7
    q, k = torch.randn(b, h, seq, 8, generator=g), torch.randn(b, h, seq, 8, generator=g)
    token = torch.ones(b, seq, dtype=torch.bool)
    token[1, 5:] = False  # padding
    token[2] = False  # an all-padding sequence
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    key_valid = causal & token[:, None, None, :]  # [B, 1, L, L]
    probs = attention_probs(q, k, key_valid).float()
    probs[0, 0, 3] = 0.0
    probs[0, 0, 3, 2] = 1.0  # one-hot row
    return probs, key_valid, token[:, None, :]


def test_names_match_reference():
    assert ROW_STATISTICS == NAMES  # max_logit, from the logits, is tested in test_max_logit.py
    assert STATISTICS == (*NAMES, "max_logit")


def test_every_statistic_matches_float64_reference_under_masks():
    probs, key_valid, query_valid = _masked_case()
    actual = attention_statistics(probs, key_valid, query_valid, sink_tokens=2, sparsity_eps=0.3)
    assert_stats_close(actual, head_means(probs, key_valid, query_valid, sink=2, eps=0.3))


def test_uniform_attention_has_maximal_normalized_entropy_per_row():
    # causal uniform attention: row i has n_i = i + 1 keys, each row's normalised entropy is 1 (row 0: 0)
    seq = 6
    valid = torch.ones(seq, seq, dtype=torch.bool).tril()
    probs = (valid / valid.sum(-1, keepdim=True)).expand(1, 1, seq, seq)
    values, _ = row_statistics(probs, valid, statistics=["normalized_entropy", "effective_support"])
    torch.testing.assert_close(values["normalized_entropy"][0, 0], torch.tensor([0.0] + [1.0] * (seq - 1)))
    torch.testing.assert_close(values["effective_support"][0, 0], torch.arange(1, seq + 1).float())


def test_low_precision_inputs_accumulate_in_float32():
    probs, key_valid, query_valid = _masked_case(1)
    actual = attention_statistics(probs.bfloat16(), key_valid, query_valid)
    assert all(v.dtype == torch.float32 for v in actual.values())
    assert_stats_close(actual, head_means(probs.bfloat16().float(), key_valid, query_valid), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("inputs", ["probabilities", "q/k"])
def test_statistics_under_bf16_autocast_are_float32_exact_on_their_inputs(inputs, monkeypatch):
    """Autocast must not turn the statistics' own products (logits, the distance GEMV) into bf16."""
    import attnmonitor.functional.row_kernel as row_kernel
    from attnmonitor.functional.evaluation import AttentionCall, call_head_sums

    monkeypatch.setattr(row_kernel, "_failed", True)  # the chunked path; the compiled kernels have their own test
    generator = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, 48, 16, generator=generator).bfloat16() for _ in range(2))
    causal = torch.ones(48, 48, dtype=torch.bool).tril()
    probs = attention_probs(q, k, causal)
    call = AttentionCall(q=q, k=k, is_causal=True) if inputs == "q/k" else AttentionCall(probs=probs.bfloat16(), key_valid=causal)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        result = call_head_sums(call, statistics=NAMES, budget_bytes=1 << 24)
    expected = head_means(probs if inputs == "q/k" else probs.bfloat16().double(), causal)
    assert_stats_close({name: total / result.count for name, total in result.sums.items()}, expected, rtol=1e-4, atol=1e-5)


def test_values_and_gradients_are_finite_for_masked_one_hot_and_empty_rows():
    probs, key_valid, query_valid = _masked_case(2)
    probs = probs.clone().requires_grad_(True)
    values, valid = row_statistics(probs, key_valid, query_valid)
    assert not valid[2].any(), "the all-padding sequence must not count"
    total = sum(v.sum() for v in values.values())
    total.backward()
    assert torch.isfinite(total)
    assert torch.isfinite(probs.grad).all()


def test_chunked_probabilities_equal_materialised():
    probs, key_valid, query_valid = _masked_case(3)
    full = chunked_head_sums(probability_chunks(probs, key_valid, query_valid, budget_bytes=1 << 30))
    small = chunked_head_sums(probability_chunks(probs, key_valid, query_valid, budget_bytes=1))  # 1 row a chunk
    for name in ROW_STATISTICS:
        torch.testing.assert_close(small[0][name], full[0][name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(small[1], full[1])


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal"])
def test_qk_chunks_match_reference(mask_kind):
    g = torch.Generator().manual_seed(4)
    b, h, hkv, lq, lk, d = 2, 4, 2, 9, 9, 16
    q, k = torch.randn(b, h, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g)
    keep = torch.rand(b, 1, lq, lk, generator=g) > 0.3
    keep[..., 0] = True
    mask = {"none": None, "bool": keep, "float": torch.zeros(b, 1, lq, lk).masked_fill(~keep, -math.inf), "causal": None}[mask_kind]
    causal = mask_kind == "causal"
    if causal:
        key_valid = torch.ones(lq, lk, dtype=torch.bool).tril()
    else:
        key_valid = keep if mask is not None else torch.ones(1, 1, 1, lk, dtype=torch.bool)
    expected = head_means(attention_probs(q, k, key_valid, scale=0.3), key_valid)
    for budget in (1 << 30, 1):
        sums, count = chunked_head_sums(qk_chunks(q, k, mask, causal, 0.3, budget_bytes=budget))
        assert_stats_close({n: s / count for n, s in sums.items()}, expected)


def test_check_statistics_names_the_option_and_accepted_values():
    with pytest.raises(ValueError, match=r"`statistics`.*'entropyy'.*accepted names"):
        check_statistics(["entropyy"])
    assert check_statistics("entropy") == ("entropy",)  # one name is accepted
    with pytest.raises(ValueError, match="`statistics` is empty"):
        check_statistics([])


def test_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"\[B, H, Lq, Lk\]"):
        row_statistics(torch.rand(3, 3))


# the fused path ---------------------------------------------------------------------------------

FUSED = sorted(FUSED_STATISTICS - {"max_logit"})  # max_logit: a pass of chunked logit maxima (test_max_logit.py)


@pytest.mark.parametrize(
    "case",
    ["causal", "causal-gqa", "causal-rectangular", "none", "bool", "float", "padding"],
)
def test_fused_path_equals_the_chunked_path(case):
    g = torch.Generator().manual_seed(7)
    b, h, lq, lk, d = 2, 4, 9, 9, 16
    if case == "causal-rectangular":
        lq = 5
    hkv = 2 if case == "causal-gqa" else h
    q, k = torch.randn(b, h, lq, d, generator=g), torch.randn(b, hkv, lk, d, generator=g)
    causal = case.startswith("causal")
    keep = torch.rand(b, 1, lq, lk, generator=g) > 0.3
    keep[..., 0] = True
    keep[1, 0, 2] = False  # a fully masked row
    mask = {"bool": keep, "float": torch.zeros(b, 1, lq, lk).masked_fill(~keep, -math.inf)}.get(case)
    query_valid = torch.tensor([[True] * 6 + [False] * 3, [True] * 9])[:, None, :] if case == "padding" else None
    names = FUSED if causal else [n for n in FUSED if n != "distance"]
    fused = fused_row_statistics(q, k, mask, causal, 0.3, query_valid, statistics=names, sink_tokens=2, budget_bytes=1 << 30)
    assert fused is not None
    sums, count = head_sums(*fused)
    reference = chunked_head_sums(qk_chunks(q, k, mask, causal, 0.3, query_valid), statistics=names, sink_tokens=2)
    torch.testing.assert_close(count, reference[1])
    for name in names:
        torch.testing.assert_close(sums[name], reference[0][name], rtol=1e-4, atol=1e-4, msg=name)


def test_fused_path_declines_what_it_cannot_compute():
    q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    bias = torch.randn(1, 1, 4, 4)
    kwargs = dict(budget_bytes=1 << 30)
    assert fused_row_statistics(q, k, statistics=["max_weight"], **kwargs) is None
    assert fused_row_statistics(q, k, statistics=["distance"], **kwargs) is None  # not causal
    assert fused_row_statistics(q, k, bias, statistics=["entropy"], **kwargs) is None  # a positional bias
    assert fused_row_statistics(q.requires_grad_(), k, statistics=["entropy"], **kwargs) is None


def test_sampled_rows_equal_the_full_evaluation_restricted_to_those_rows():
    g = torch.Generator().manual_seed(11)
    q, k = torch.randn(2, 3, 12, 8, generator=g), torch.randn(2, 3, 12, 8, generator=g)
    rows = torch.tensor([1, 4, 5, 11])
    only = torch.zeros(12, dtype=torch.bool)
    only[rows] = True
    sampled = chunked_head_sums(qk_chunks(q, k, None, True, None, budget_bytes=1, rows=rows))
    restricted = chunked_head_sums(qk_chunks(q, k, None, True, None, only.view(1, 1, 12)))
    probs = attention_probs(q, k, torch.ones(12, 12, dtype=torch.bool).tril()).float()
    from_probs = chunked_head_sums(probability_chunks(probs, torch.ones(12, 12, dtype=torch.bool).tril(), rows=rows))
    for name in ROW_STATISTICS:
        torch.testing.assert_close(sampled[0][name], restricted[0][name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(from_probs[0][name], restricted[0][name], rtol=1e-5, atol=1e-5)
    assert sampled[1].tolist() == [8.0, 8.0, 8.0]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 2, 3])
def test_sink_keys_are_the_first_tokens_of_each_document_under_padding_windows_and_packing(causal, window):
    # per batch row: (left pads, document lengths) -> a block-diagonal mask, causal or not, windowed or not
    layouts = [(0, [5, 3, 4]), (3, [9]), (2, [1, 6, 3])]
    length = 12
    masks, expected_sinks, expected_valid = [], [], []
    for pads, docs in layouts:
        doc_of = [-1] * pads + [d for d, n in enumerate(docs) for _ in range(n)]
        doc_of += [-1] * (length - len(doc_of))  # right padding
        starts = {d: doc_of.index(d) for d in range(len(docs))}
        mask = torch.zeros(length, length, dtype=torch.bool)
        for i in range(length):
            for j in range(length):
                same = doc_of[i] >= 0 and doc_of[i] == doc_of[j]
                visible = (j <= i or not causal) and (window is None or abs(i - j) < window)
                mask[i, j] = same and visible
        masks.append(mask)
        expected_sinks.append(torch.tensor([doc_of[j] >= 0 and starts[doc_of[j]] == j for j in range(length)]))
        expected_valid.append(torch.tensor([d >= 0 for d in doc_of]))
    mask = torch.stack(masks)[:, None]  # [B, 1, L, L]
    torch.testing.assert_close(diagonal_valid(mask, length, length), torch.stack(expected_valid))
    sinks = sink_keys(mask, length, length, 1, self_attention=True)
    # pads are never attended by a real row, so only the sinks of real tokens matter
    real = torch.stack(expected_valid)
    torch.testing.assert_close(sinks & real, torch.stack(expected_sinks))
