"""Per-head sums of one attention call, by the cheapest exact path.

An SDPA call (``q``/``k``) whose statistics allow it takes the fused path (one extra attention call,
no probabilities: :mod:`attnmonitor.functional.fused`); every other call is evaluated from
probabilities in chunks of query rows within a memory budget (:mod:`attnmonitor.functional.chunked`).
Alignment counts, when asked for, come from the same chunks.

``max_logit`` (reduced with max, see :data:`attnmonitor.functional.statistics.MAX_STATISTICS`) comes
from the logits: the row maxima an eager softmax's interception recorded (every row), the chunks'
logits before their softmax (chunked path), or one extra pass of chunked maxima of ``scale · q · kᵀ``
without probabilities (fused path, or when it is the only statistic asked for).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnmonitor.functional.analyses import alignment_counts
from attnmonitor.functional.chunked import Chunk, ScoreMod, chunk_head_sums, probability_chunks, qk_chunks, qk_logit_max
from attnmonitor.functional.fused import fused_row_statistics
from attnmonitor.functional.logit_kernel import qk_row_statistics
from attnmonitor.functional.statistics import head_max, head_sums, max_row_counts, split_statistics


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
        logit_max: ``[B, H, Lq]`` float32 largest logit over the valid keys of each row of ``probs``
            (``-inf``: no valid key), from the softmax input; None when unknown (no ``max_logit``).
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
    logit_max: Tensor | None = None

    @property
    def sdpa(self) -> tuple[Tensor, Tensor, Tensor | None, bool, float | None]:
        """``(q, k, attn_mask, is_causal, scale)``: SDPA's own arguments, the leading ones of every
        ``q``/``k`` function of :mod:`attnmonitor.functional` (not for probabilities)."""
        assert self.q is not None and self.k is not None, "probabilities have no SDPA arguments"
        return self.q, self.k, self.attn_mask, self.is_causal, self.scale

    def chunks(self, budget_bytes: int, rows: Tensor | None = None, logit_max: bool = False) -> Iterator[Chunk]:
        """Row chunks (of ``rows`` only, if given) whose temporaries fit ``budget_bytes``; ``logit_max``:
        chunks of ``q``/``k`` also carry their rows' largest logits."""
        if self.probs is not None:
            return probability_chunks(self.probs, self.key_valid, self.query_valid, budget_bytes=budget_bytes, masked=True, rows=rows)
        return qk_chunks(*self.sdpa, self.query_valid, budget_bytes=budget_bytes, rows=rows, score_mod=self.score_mod, logit_max=logit_max)

    def logit_row_max(self, budget_bytes: int, rows: Tensor | None = None) -> Tensor | None:
        """``[B, H, r]`` largest logit of each row (of ``rows``, if given) over its valid keys (``-inf``:
        none): recorded for probabilities (every row), a pass of chunked maxima for ``q``/``k``."""
        if self.probs is not None:
            return self.logit_max
        return qk_logit_max(*self.sdpa, budget_bytes=budget_bytes, rows=rows, score_mod=self.score_mod)


@dataclass
class CallSums:
    """``{statistic: [H]}`` sums over valid rows, their ``[H]`` count, ``[correct, counted]`` alignment,
    and ``{statistic: [H]}`` maxima of the statistics reduced with max (``-inf``: no valid row)."""

    sums: dict[str, Tensor]
    count: Tensor
    alignment: Tensor | None = None
    fused: bool = False
    maxima: dict[str, Tensor] = field(default_factory=dict)


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
        averaged, maxed = split_statistics(statistics)
        qk = call.q is not None and call.k is not None
        if not averaged and (qk or call.logit_max is not None):  # the maxima alone: no probabilities at all
            row_max = call.logit_row_max(budget_bytes, None if call.probs is not None else rows)
            assert row_max is not None
            query_valid = call.query_valid if rows is None or call.probs is not None else _rows_of(call.query_valid, rows)
            maxima = dict.fromkeys(maxed, head_max(row_max, query_valid))
            alignment = None
            if alignments is not None:
                alignment = sum(_alignment(chunk, alignments) for chunk in call.chunks(budget_bytes, rows))
            return CallSums({}, max_row_counts(row_max, query_valid), alignment, fused=qk, maxima=maxima)
        if not averaged:  # probabilities whose logits are unknown: their valid rows, no maximum
            assert call.probs is not None
            if call.key_valid is None:
                has_key = torch.ones(call.probs.shape[:-1], dtype=torch.bool, device=call.probs.device)
            else:
                has_key = call.key_valid.expand_as(call.probs).any(-1)  # [B, H, Lq]
            return CallSums({}, max_row_counts(torch.where(has_key, 0.0, float("-inf")), call.query_valid))
        # probabilities: the maxima of the rows their softmax's input recorded (every row, even when sampled)
        maxima = {}
        if maxed and call.probs is not None and call.logit_max is not None:
            maxima = dict.fromkeys(maxed, head_max(call.logit_max, call.query_valid))
        if qk and call.score_mod is None and alignments is None:
            kernel = qk_row_statistics(
                *call.sdpa,
                call.query_valid,
                statistics=averaged,
                sink_tokens=sink_tokens,
                sink_keys=call.sink_keys,
                sparsity_eps=sparsity_eps,
                rows=rows,
            )
            if kernel is not None:
                values, valid, row_max = kernel
                sums, count = head_sums(values, valid)
                if maxed:
                    maxima = dict.fromkeys(maxed, head_max(row_max, valid))
                return CallSums(sums, count, fused=True, maxima=maxima)
        fused = None
        if qk and call.score_mod is None and rows is None:
            fused = fused_row_statistics(
                *call.sdpa,
                call.query_valid,
                statistics=statistics,
                sink_tokens=sink_tokens,
                sink_keys=call.sink_keys,
                budget_bytes=budget_bytes,
            )
        if fused is not None:
            sums, count = head_sums(*fused)
            if maxed:  # one extra pass of chunked maxima of the logits, no probabilities
                row_max = call.logit_row_max(budget_bytes)
                assert row_max is not None
                maxima = dict.fromkeys(maxed, head_max(row_max, call.query_valid))
            alignment = None
            if alignments is not None:  # no probabilities on the fused path: one pass for the argmax
                alignment = sum(_alignment(chunk, alignments) for chunk in call.chunks(budget_bytes))
            return CallSums(sums, count, alignment, fused=True, maxima=maxima)
        total: dict[str, Tensor] = {}
        count = torch.zeros(())
        alignment = torch.zeros(2) if alignments is not None else None
        chunk_max = bool(maxed) and call.probs is None
        for chunk in call.chunks(budget_bytes, rows, logit_max=chunk_max):
            if alignment is not None:  # before the statistics, which may overwrite the chunk
                alignment = alignment + _alignment(chunk, alignments)
            if chunk_max and chunk.logit_max is not None:
                part_max = head_max(chunk.logit_max, chunk.query_valid)
                maxima = {name: torch.maximum(maxima[name], part_max) if name in maxima else part_max for name in maxed}
            part, n = chunk_head_sums(
                chunk, statistics=averaged, sink_tokens=sink_tokens, sparsity_eps=sparsity_eps, sink_keys=call.sink_keys
            )
            count = count + n
            total = {name: total.get(name, 0) + s for name, s in part.items()}
        return CallSums(total, count, alignment, maxima=maxima)


def _rows_of(query_valid: Tensor | None, rows: Tensor) -> Tensor | None:
    """Query rows ``rows`` of a mask broadcastable to ``[B, H, Lq]`` (size 1 stays)."""
    if query_valid is None or query_valid.shape[-1] == 1:
        return query_valid
    return query_valid.index_select(-1, rows.to(query_valid.device))


def _alignment(chunk: Chunk, alignments: Tensor) -> Tensor:
    lk = chunk.probs.shape[-1]
    first = int(alignments.shape[-1])
    truth = alignments[:, chunk.positions.cpu() - (lk - first)]  # [B, r]: positions are key positions
    return alignment_counts(chunk.probs, truth, chunk.key_valid, chunk.query_valid).cpu()
