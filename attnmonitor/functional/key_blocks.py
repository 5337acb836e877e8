"""Statistics of query rows whose keys arrive in blocks (context parallelism: keys sharded over
processes), merged exactly from per-block partial results, never materialising a row's full key set.

Two passes over the blocks, each by row chunks within a memory budget:

1. row maxima ``m_i``, sums ``s_i = Σ_j exp(x_ij − m_i)`` (merged online, as flash attention merges
   blocks) and valid-key counts ``n_i``: the log-normaliser ``LSE_i = m_i + log s_i``, ``max_logit = m_i``
   and ``max_weight = exp(m_i − LSE_i)``;
2. with ``A_ij = exp(x_ij − LSE_i)`` known per block, the statistics that are sums over keys
   (:data:`~attnmonitor.functional.statistics.KEY_ADDITIVE_STATISTICS`) and the sparse-key count
   (threshold ``ε / n_i`` with the row's total ``n_i``) add up over blocks.

Then ``normalized_entropy = H_i / log n_i``, ``effective_support = exp(H_i)``, ``sparsity = count / n_i``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnmonitor.functional.chunked import rows_per_chunk
from attnmonitor.functional.evaluation import CallSums
from attnmonitor.functional.statistics import (
    KEY_ADDITIVE_STATISTICS,
    RowContext,
    check_statistics,
    head_max,
    head_sums,
    key_additive_values,
    max_row_counts,
    split_statistics,
)


@dataclass(frozen=True)
class KeyBlock:
    """Contiguous keys of a sequence.

    Attributes:
        k: ``[B, Hkv, Lb, D]`` keys at global positions ``start … start + Lb − 1``.
        start: global position of the first key.
        valid: bool ``[B, Lb]``: keys that may be attended (padding is False); None: all.
        sinks: bool ``[B or 1, Lb]``: the sink keys among them; None: those at positions ``< sink_tokens``.
    """

    k: Tensor
    start: int
    valid: Tensor | None = None
    sinks: Tensor | None = None


def key_block_head_sums(
    q: Tensor,
    blocks: Sequence[KeyBlock],
    positions: Tensor,
    *,
    is_causal: bool,
    scale: float | None = None,
    query_valid: Tensor | None = None,
    statistics: Sequence[str],
    sink_tokens: int = 1,
    sparsity_eps: float = 0.1,
    budget_bytes: int,
) -> CallSums:
    """Per-head sums of the statistics of query rows ``q`` attending every key of ``blocks``.

    Args:
        q: ``[B, H, Lq, D]`` queries; ``H`` a multiple of the blocks' ``Hkv``.
        blocks: disjoint key blocks covering the sequence, in any order.
        positions: ``[Lq]`` global position of each query row.
        is_causal: row ``i`` attends keys at positions ``<= positions[i]`` (and valid).
        scale: logit scale, default ``1 / sqrt(D)``.
        query_valid: bool, broadcastable to ``[B, H, Lq]``.
        statistics, sink_tokens, sparsity_eps: as :func:`attnmonitor.functional.row_statistics`.
        budget_bytes: memory for one block's temporaries of a row chunk.

    Returns:
        sums and valid-row counts of the averaged statistics, maxima of ``max_logit``.

    Example:
        >>> q, k = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
        >>> halves = [KeyBlock(k[:, :, :2], 0), KeyBlock(k[:, :, 2:], 2)]
        >>> result = key_block_head_sums(q, halves, torch.arange(4), is_causal=True, statistics=["entropy"], budget_bytes=2**20)
        >>> result.count
        tensor([4., 4.])
    """
    averaged, maxed = split_statistics(check_statistics(statistics))
    if not blocks:
        raise ValueError("`blocks` is empty: give at least one block of keys")
    if q.shape[-3] % blocks[0].k.shape[-3]:
        raise ValueError(f"query heads ({q.shape[-3]}) must be a multiple of key heads ({blocks[0].k.shape[-3]})")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    widest = max(block.k.shape[-2] for block in blocks)
    step = rows_per_chunk(q.shape[-2], q.shape[:-2].numel() * widest, budget_bytes)
    sums: dict[str, Tensor] = {}
    count = maximum = None
    with torch.no_grad():
        for start in range(0, q.shape[-2], step):
            rows = slice(start, min(q.shape[-2], start + step))
            chunk_valid = _rows(query_valid, rows)
            lse, top, n = _normalisers(q[..., rows, :], blocks, positions[rows], is_causal, scale)
            values = _merged(q[..., rows, :], blocks, positions[rows], is_causal, scale, averaged, lse, top, n, sink_tokens, sparsity_eps)
            valid = n > 0 if chunk_valid is None else (n > 0) & chunk_valid.to(torch.bool)
            part, part_count = head_sums(values, valid)
            sums = {name: sums[name] + s if name in sums else s for name, s in part.items()}
            if maxed:
                part_max = head_max(top, chunk_valid)
                maximum = part_max if maximum is None else torch.maximum(maximum, part_max)
                part_count = part_count if averaged else max_row_counts(top, chunk_valid)
            count = part_count if count is None else count + part_count
    assert count is not None
    return CallSums(sums, count, maxima=dict.fromkeys(maxed, maximum) if maxed else {})


def _rows(query_valid: Tensor | None, rows: slice) -> Tensor | None:
    if query_valid is None or query_valid.shape[-1] == 1:
        return query_valid
    return query_valid[..., rows]


def _block_logits(q: Tensor, block: KeyBlock, positions: Tensor, is_causal: bool, scale: float) -> tuple[Tensor, Tensor | None]:
    """``(logits [B, H, r, Lb] with -inf on invalid keys, valid keys or None)`` of one block."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    k = block.k.repeat_interleave(q.shape[-3] // block.k.shape[-3], dim=-3)  # [B, H, Lb, D]
    logits = (q.to(dtype) @ k.to(dtype).transpose(-2, -1)).mul_(scale)
    keys = block.start + torch.arange(k.shape[-2], device=q.device)
    valid = keys <= positions.unsqueeze(-1) if is_causal else None  # [r, Lb]
    if block.valid is not None:
        padding = block.valid.to(q.device, torch.bool)[:, None, None, :]  # [B, 1, 1, Lb]
        valid = padding if valid is None else valid & padding
    if valid is not None:
        logits = logits.masked_fill_(~valid, float("-inf"))
    return logits, valid


def _normalisers(q: Tensor, blocks: Sequence[KeyBlock], positions: Tensor, is_causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(LSE, row max, valid keys)``, each ``[B, H, r]`` over every block (``-inf``, ``-inf``, 0 for a
    row with no valid key)."""
    top = total = n = None
    for block in blocks:
        logits, valid = _block_logits(q, block, positions, is_causal, scale)
        block_top = logits.amax(-1)
        new_top = block_top if top is None else torch.maximum(top, block_top)
        shift = torch.where(torch.isfinite(new_top), new_top, 0.0)  # no (-inf) - (-inf)
        block_total = logits.sub_(shift.unsqueeze(-1)).exp_().sum(-1)
        total = block_total if total is None else total * (top - shift).exp() + block_total
        block_n = (
            torch.full_like(block_top, block.k.shape[-2]) if valid is None else valid.sum(-1, dtype=block_top.dtype).expand(block_top.shape)
        )
        n = block_n if n is None else n + block_n
        top = new_top
    assert top is not None and total is not None and n is not None
    return top + total.log(), top, n


def _merged(
    q: Tensor,
    blocks: Sequence[KeyBlock],
    positions: Tensor,
    is_causal: bool,
    scale: float,
    averaged: Sequence[str],
    lse: Tensor,
    top: Tensor,
    n: Tensor,
    sink_tokens: int,
    sparsity_eps: float,
) -> dict[str, Tensor]:
    """``{name: [B, H, r]}`` row values of the averaged statistics, from the normalisers of every block."""
    additive = [name for name in KEY_ADDITIVE_STATISTICS if name in averaged or (name == "entropy" and _needs_entropy(averaged))]
    totals: dict[str, Tensor] = {}
    sparse = None
    if additive or "sparsity" in averaged:
        normaliser = torch.where(n > 0, lse, 0.0).unsqueeze(-1)
        threshold = (sparsity_eps / n.clamp_min(1)).unsqueeze(-1)
        for block in blocks:
            logits, valid = _block_logits(q, block, positions, is_causal, scale)
            probs = logits.sub_(normaliser).exp_()  # exactly 0 on invalid keys
            if "sparsity" in averaged:
                below = probs < threshold if valid is None else (probs < threshold) & valid
                part = below.sum(-1, dtype=probs.dtype)
                sparse = part if sparse is None else sparse + part
            sinks = block.sinks
            if sinks is None:
                sinks = (block.start + torch.arange(block.k.shape[-2], device=q.device) < sink_tokens).unsqueeze(0)
            # a 4-D key mask: the causal shortcut of `distance` assumes rows that sum to 1, a block's do not
            key_valid = None if valid is None else valid.expand(1, 1, *valid.shape[-2:]) if valid.dim() == 2 else valid
            ctx = RowContext(probs, key_valid, query_positions=positions - block.start, masked=True, overwrite=True, sink_keys=sinks)
            for name, value in key_additive_values(ctx, additive).items():
                totals[name] = totals[name] + value if name in totals else value
    entropy = totals.get("entropy")
    derived = {
        "normalized_entropy": lambda: torch.where(n > 1, entropy / n.clamp_min(2).log(), 0.0),
        "max_weight": lambda: torch.where(n > 0, (top - lse).exp(), 0.0),
        "effective_support": lambda: torch.where(n > 0, entropy.exp(), 0.0),
        "sparsity": lambda: sparse / n.clamp_min(1),
    }
    return {name: totals[name] if name in totals else derived[name]() for name in averaged}


def _needs_entropy(averaged: Sequence[str]) -> bool:
    return bool({"normalized_entropy", "effective_support"} & set(averaged))


__all__ = ["KeyBlock", "key_block_head_sums"]
