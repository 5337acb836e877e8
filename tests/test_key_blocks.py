"""Statistics merged over blocks of keys (context parallelism) against the float64 reference over the
whole key set: contiguous, split and shuffled blocks, causal and padded, grouped-query heads."""

import pytest
import torch

from attnmonitor.capture.context_parallel import shard_positions
from attnmonitor.functional import STATISTICS
from attnmonitor.functional.key_blocks import KeyBlock, key_block_head_sums
from attnmonitor.functional.statistics import mean_from_sums
from tests.helpers.reference import attention_probs, head_max_logit, head_means

B, H, HKV, L, D = 2, 4, 2, 12, 8


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64) * 2
    k = torch.randn(B, HKV, L, D, generator=g, dtype=torch.float64) * 2
    lengths = torch.tensor([L, 7])  # right padding of sequence 1
    padding = torch.arange(L) < lengths[:, None]  # [B, L]
    return q, k, padding


def _blocks(k, padding, bounds, order):
    blocks = [KeyBlock(k[..., a:b, :], a, None if padding is None else padding[:, a:b]) for a, b in bounds]
    return [blocks[i] for i in order]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(
    ("bounds", "order"),
    [
        ([(0, 12)], [0]),
        ([(0, 6), (6, 12)], [1, 0]),
        ([(0, 3), (3, 6), (6, 9), (9, 12)], [2, 0, 3, 1]),  # head-tail chunks arrive out of order
        ([(0, 1), (1, 11), (11, 12)], [1, 2, 0]),  # uneven
    ],
)
def test_blocks_merge_to_the_statistics_over_every_key(causal, padded, bounds, order):
    q, k, padding = _inputs()
    key_valid = torch.ones(B, 1, L, L, dtype=torch.bool)
    if causal:
        key_valid = key_valid & torch.ones(L, L, dtype=torch.bool).tril()
    query_valid = None
    if padded:
        key_valid = key_valid & padding[:, None, None, :]
        query_valid = padding[:, None, :]  # [B, 1, L]
    probs = attention_probs(q, k, key_valid)
    expected = head_means(probs, key_valid, query_valid, sink=2)
    expected["max_logit"] = head_max_logit(q, k, key_valid, query_valid)
    result = key_block_head_sums(
        q,
        _blocks(k, padding if padded else None, bounds, order),
        torch.arange(L),
        is_causal=causal,
        query_valid=query_valid,
        statistics=STATISTICS,
        sink_tokens=2,
        budget_bytes=2_000,  # a few rows per chunk
    )
    for name, value in expected.items():
        actual = result.maxima[name] if name == "max_logit" else mean_from_sums(result.sums[name], result.count)
        torch.testing.assert_close(actual.double(), value, rtol=1e-5, atol=1e-6, msg=name)


def test_max_logit_alone_needs_one_pass():
    q, k, _ = _inputs()
    result = key_block_head_sums(
        q, _blocks(k, None, [(0, 5), (5, 12)], [1, 0]), torch.arange(L), is_causal=True, statistics=["max_logit"], budget_bytes=2**20
    )
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    torch.testing.assert_close(result.maxima["max_logit"].double(), head_max_logit(q, k, causal), rtol=1e-6, atol=0)
    assert result.count.tolist() == [B * L] * H


def test_layouts_cover_the_sequence_once():
    for layout in ("contiguous", "head_tail"):
        positions = torch.cat([shard_positions(layout, r, 4, 6) for r in range(4)])
        assert sorted(positions.tolist()) == list(range(24)), layout
    assert shard_positions("head_tail", 1, 2, 4).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="needs an even number of local positions, got 5"):
        shard_positions("head_tail", 0, 2, 5)


def test_context_parallel_option_is_checked():
    from attnmonitor import MonitorOptions

    with pytest.raises(ValueError, match=r"`capture.context_parallel` must be one of \['contiguous', 'head_tail'\] or None, got 'ring'"):
        MonitorOptions(capture={"context_parallel": "ring"})
