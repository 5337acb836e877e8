"""Per-head sums of one attention call, by the cheapest exact path.

An SDPA call (``q``/``k``) whose statistics allow it takes the fused path (one extra attention call,
no probabilities: :mod:`attnmonitor.functional.fused`); every other call is evaluated from
probabilities in chunks of query rows within a memory budget (:mod:`attnmonitor.functional.chunked`).
Alignment counts, when asked for, come from the same chunks.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnmonitor.functional.analyses import alignment_counts
from attnmonitor.functional.chunked import Chunk, ScoreMod, chunk_head_sums, probability_chunks, qk_chunks
from attnmonitor.functional.fused import fused_row_statistics
from attnmonitor.functional.statistics import head_sums


@dataclass(frozen=True)
class AttentionCall:
    """The inputs of one attention computation: probabilities, or the ``q``/``k`` of an SDPA or flex call.

    Attributes:
        probs: ``[B, H, Lq, Lk]`` probabilities (a softmax over masked logits: exactly 0 on invalid keys).
        key_valid: bool, broadcastable to ``probs``.
        q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]``; attn_mask, is_causal, scale: as SDPA.
        query_valid: bool, broadcastable to ``[B, H, Lq]``.
        sink_keys: bool ``[B or 1, Lk]`` (None: the first ``sink_tokens`` keys).
        score_mod: a modification of the scaled logits (flex attention; see
            :data:`attnmonitor.functional.chunked.ScoreMod`).
    """

    probs: Tensor | None = None
    key_valid: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    attn_mask: Tensor | None = None
    is_causal: bool = False
    scale: float | None = None
    query_valid: Tensor | None = None
    sink_keys: Tensor | None = None
    score_mod: ScoreMod | None = None

    def chunks(self, budget_bytes: int, rows: Tensor | None = None) -> Iterator[Chunk]:
        """Row chunks (of ``rows`` only, if given) whose temporaries fit ``budget_bytes``."""
        if self.probs is not None:
            return probability_chunks(
                self.probs, self.key_valid, self.query_valid, budget_bytes=budget_bytes, masked=True, rows=rows
            )
        assert self.q is not None and self.k is not None
        return qk_chunks(
            self.q, self.k, self.attn_mask, self.is_causal, self.scale, self.query_valid, budget_bytes=budget_bytes, rows=rows,
            score_mod=self.score_mod,
        )


@dataclass
class CallSums:
    """``{statistic: [H]}`` sums over valid rows, their ``[H]`` count, and ``[correct, counted]`` alignment."""

    sums: dict[str, Tensor]
    count: Tensor
    alignment: Tensor | None = None
    fused: bool = False


def call_head_sums(
    call: AttentionCall,
    *,
    statistics: Sequence[str],
    sink_tokens: int = 1,
    sparsity_eps: float = 0.1,
    budget_bytes: int,
    rows: Tensor | None = None,
    alignments: Tensor | None = None,
) -> CallSums:
    """Per-head sums of one call's statistics, fused when possible, else chunked.

    Args:
        call: the attention computation.
        statistics: names from :data:`attnmonitor.functional.STATISTICS`.
        sink_tokens, sparsity_eps: as :func:`attnmonitor.functional.row_statistics`.
        budget_bytes: memory for one chunk's temporaries.
        rows: evaluate only these query rows (a sample; chunked path only).
        alignments: ``[B, Lq]`` true key of each row (negative: none), counted by
            :func:`attnmonitor.functional.analyses.alignment_counts`.
    """
    with torch.no_grad():
        fused = None
        if call.q is not None and call.k is not None and call.score_mod is None and rows is None:
            fused = fused_row_statistics(
                call.q, call.k, call.attn_mask, call.is_causal, call.scale, call.query_valid,
                statistics=statistics, sink_tokens=sink_tokens, sink_keys=call.sink_keys, budget_bytes=budget_bytes,
            )
        if fused is not None:
            sums, count = head_sums(*fused)
            alignment = None
            if alignments is not None:  # no probabilities on the fused path: one pass for the argmax
                alignment = sum(_alignment(chunk, alignments) for chunk in call.chunks(budget_bytes))
            return CallSums(sums, count, alignment, fused=True)
        total: dict[str, Tensor] = {}
        count = torch.zeros(())
        alignment = torch.zeros(2) if alignments is not None else None
        for chunk in call.chunks(budget_bytes, rows):
            if alignment is not None:  # before the statistics, which may overwrite the chunk
                alignment = alignment + _alignment(chunk, alignments)
            part, n = chunk_head_sums(
                chunk, statistics=statistics, sink_tokens=sink_tokens, sparsity_eps=sparsity_eps, sink_keys=call.sink_keys
            )
            count = count + n
            total = {name: total.get(name, 0) + s for name, s in part.items()}
        return CallSums(total, count, alignment)


def _alignment(chunk: Chunk, alignments: Tensor) -> Tensor:
    lk = chunk.probs.shape[-1]
    first = int(alignments.shape[-1])
    truth = alignments[:, chunk.positions.cpu() - (lk - first)]  # [B, r]: positions are key positions
    return alignment_counts(chunk.probs, truth, chunk.key_valid, chunk.query_valid).cpu()
