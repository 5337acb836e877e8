"""The compiled kernel that takes an SDPA call's statistics from blocks of ``q · kᵀ`` gives what the
float64 per-row reference gives, on every mask layout, and is used only where it should be."""

from __future__ import annotations

import pytest
import torch

import attnmonitor.functional.logit_kernel as logit_kernel
import attnmonitor.functional.row_kernel as row_kernel
from attnmonitor.functional import STATISTICS
from attnmonitor.functional.evaluation import AttentionCall, call_head_sums
from attnmonitor.functional.statistics import max_from_maxima
from tests.helpers.reference import assert_stats_close, attention_probs, head_max_logit, head_means

B, H, L, D = 2, 4, 40, 8


def _layouts() -> dict[str, dict]:
    """SDPA arguments and the reference's key and query masks of each layout."""
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    lengths = torch.tensor([L, 23])
    keys = (torch.arange(L) < lengths.view(B, 1, 1, 1)).expand(B, 1, L, L)
    rows = (torch.arange(L) < lengths.view(B, 1, 1)).expand(B, H, L)
    documents = (torch.arange(L) >= 17).long()
    packed = causal & (documents.view(-1, 1) == documents.view(1, -1))
    additive = torch.zeros(B, 1, L, L).masked_fill(~keys, torch.finfo(torch.float32).min)
    return {
        "causal": dict(sdpa=dict(is_causal=True), key_valid=causal, query_valid=None),
        "padded, bool": dict(sdpa=dict(attn_mask=keys & causal), key_valid=keys & causal, query_valid=rows),
        "padded, additive": dict(sdpa=dict(attn_mask=additive), key_valid=keys, query_valid=rows),
        "packed": dict(sdpa=dict(attn_mask=packed), key_valid=packed, query_valid=None),
        "bidirectional": dict(sdpa=dict(), key_valid=torch.ones(L, L, dtype=torch.bool), query_valid=None),
    }


def _inputs(kv_heads: int = H) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=generator) * 2
    return q, torch.randn(B, kv_heads, L, D, generator=generator)


@pytest.fixture
def kernel_on(monkeypatch) -> list[int]:
    """The kernel for every size; the list records its calls."""
    monkeypatch.setattr(row_kernel, "MIN_ELEMENTS", 0)
    monkeypatch.setattr(row_kernel, "_failed", False)
    calls: list[int] = []
    real = logit_kernel.qk_row_statistics

    def recorded(*args, **kwargs):
        result = real(*args, **kwargs)
        calls.append(result is not None)
        return result

    monkeypatch.setattr("attnmonitor.functional.evaluation.qk_row_statistics", recorded)
    return calls


@pytest.mark.parametrize("layout", list(_layouts()))
@pytest.mark.parametrize("kv_heads", [H, 2])
def test_the_logit_kernel_equals_the_float64_reference(layout, kv_heads, kernel_on, monkeypatch):
    monkeypatch.setattr(logit_kernel, "MAX_PASS_BLOCK_BYTES", B * H * L * 4 * 7)  # several blocks of 7 rows
    case = _layouts()[layout]
    q, k = _inputs(kv_heads)
    call = AttentionCall(q=q, k=k, query_valid=case["query_valid"], scale=0.4, **case["sdpa"])
    result = call_head_sums(call, statistics=STATISTICS, sink_tokens=2, budget_bytes=1 << 30)
    assert kernel_on == [True] and row_kernel._failed is False
    bias = case["sdpa"].get("attn_mask") if layout == "padded, additive" else None
    probs = attention_probs(q, k, case["key_valid"], 0.4, bias)
    expected = head_means(probs, case["key_valid"], case["query_valid"], sink=2)
    actual = {name: total / result.count for name, total in result.sums.items()}
    assert_stats_close(actual, expected, rtol=1e-5, atol=1e-5)
    max_logit = head_max_logit(q, k, case["key_valid"], case["query_valid"], 0.4, bias)
    torch.testing.assert_close(max_from_maxima(result.maxima["max_logit"]).double(), max_logit, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "statistics",
    [("normalized_entropy", "sink_mass", "max_logit"), ("entropy", "sparsity"), ("distance", "prev_token_weight")],
    ids=["alarms", "no positions", "positions"],
)
def test_a_subset_of_statistics_takes_only_its_passes_and_equals_the_reference(statistics, kernel_on, monkeypatch):
    """A light capture (the alarms' statistics) skips the comparison pass and the position sums."""
    passes: list[str] = []
    sums, below = logit_kernel._sums, logit_kernel._below
    monkeypatch.setattr(logit_kernel, "_sums", lambda *a: passes.append("positions" if a[-1] else "sums") or sums(*a))
    monkeypatch.setattr(logit_kernel, "_below", lambda *a: passes.append("comparisons") or below(*a))
    case = _layouts()["padded, bool"]
    q, k = _inputs()
    call = AttentionCall(q=q, k=k, query_valid=case["query_valid"], scale=0.4, **case["sdpa"])
    result = call_head_sums(call, statistics=statistics, sink_tokens=2, budget_bytes=1 << 30)
    assert kernel_on == [True]
    assert set(passes) == {"sums" if statistics[0] != "distance" else "positions", *(["comparisons"] if "sparsity" in statistics else [])}
    expected = head_means(attention_probs(q, k, case["key_valid"], 0.4), case["key_valid"], case["query_valid"], sink=2)
    averaged = [name for name in statistics if name != "max_logit"]
    assert set(result.sums) == set(averaged)
    actual = {name: result.sums[name] / result.count for name in averaged}
    assert_stats_close(actual, {name: expected[name] for name in averaged}, rtol=1e-5, atol=1e-5)
