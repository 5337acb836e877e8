"""Attention records: what one intercepted attention computation hands to the statistics."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from attnmonitor.functional.chunked import key_valid_from_logits, qk_chunks
from attnmonitor.functional.evaluation import AttentionCall


@dataclass(frozen=True)
class AttentionRecord:
    """One intercepted attention computation: what its statistics need, and what replacing its
    probabilities needs.

    Attributes:
        call: the computation's inputs (probabilities of an eager softmax, or ``q``/``k``, mask,
            causality, scale and score modification of an SDPA or flex call; valid rows, sinks).
        v: ``[B, Hkv, Lk, Dv]`` values of an SDPA or flex call.
        dropout_p: SDPA's dropout probability.
        out_shape: shape of the intercepted call's output (SDPA output or softmax result).
        out_dtype: dtype of that output.
    """

    call: AttentionCall
    v: Tensor | None = None
    dropout_p: float = 0.0
    out_shape: tuple[int, ...] = ()
    out_dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, Lq, Lk)``."""
        call = self.call
        if call.probs is not None:
            b, h, lq, lk = call.probs.shape
            return b, h, lq, lk
        assert call.q is not None and call.k is not None
        b, h, lq, _ = call.q.shape
        return b, h, lq, call.k.shape[-2]

    def with_call(self, **changes: Any) -> AttentionRecord:
        """A copy whose call has ``changes`` (its fields)."""
        return replace(self, call=replace(self.call, **changes))

    def with_query_valid(self, query_valid: Tensor | None) -> AttentionRecord:
        """A copy whose query mask is also restricted by ``query_valid`` (``[B, 1, Lq]``)."""
        if query_valid is None:
            return self
        mask = query_valid if self.call.query_valid is None else self.call.query_valid & query_valid
        return self.with_call(query_valid=mask)

    @property
    def device(self) -> torch.device:
        tensor = self.call.probs if self.call.probs is not None else self.call.q
        assert tensor is not None
        return tensor.device

    def key_mask(self) -> Tensor | None:
        """The call's own key mask as bool, 4-D, broadcastable to ``[B, H, Lq, Lk]`` (SDPA's ``is_causal``
        excluded), or None when it has none."""
        call = self.call
        mask = call.key_valid if call.probs is not None else call.attn_mask
        if mask is None:
            return None
        if mask.dtype != torch.bool:
            mask = key_valid_from_logits(mask)
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        return mask

    def probabilities(self) -> tuple[Tensor, Tensor | None]:
        """All ``[B, H, Lq, Lk]`` probabilities (differentiable) and their key mask."""
        if self.call.probs is not None:
            return self.call.probs, self.call.key_valid
        (chunk,) = self.call.chunks(budget_bytes=1 << 62)
        return chunk.probs, chunk.key_valid

    def output(self, probs: Tensor) -> Tensor:
        """What the intercepted call returns when its probabilities are replaced by ``probs``.

        Softmax: ``probs`` in the call's shape and dtype. SDPA: ``dropout(probs) @ v``.
        """
        if self.call.probs is not None:
            return probs.to(self.out_dtype).reshape(self.out_shape)
        assert self.v is not None
        v = self.v
        if v.shape[-3] != probs.shape[-3]:  # grouped-query attention
            v = v.repeat_interleave(probs.shape[-3] // v.shape[-3], dim=-3)
        if self.dropout_p > 0:
            probs = F.dropout(probs, self.dropout_p)
        return (probs @ v.to(probs.dtype)).to(self.out_dtype).reshape(self.out_shape)

    def example(self, max_tokens: int, row: int = 0) -> tuple[Tensor, Tensor, int, int]:
        """Batch element ``row`` (0 when the batch is smaller) from its first real token: probabilities
        ``[H, T, T]`` float32, valid keys, start.

        Rows start at the first counted query row and keys at the first key that row may attend
        (left padding skipped), ``T`` is ``max_tokens`` capped by the queries and keys left. Rows are
        the full softmax (keys past ``T`` keep their share, so a truncated row may sum to < 1). The
        key mask is bool ``[H, T, T]``; ``start`` and ``key_start`` are the first row's and key's
        indices (for token labels).
        """
        b, h, lq, lk = self.shape
        call, start = self.call, 0
        row = row if row < b else 0
        if call.query_valid is not None:
            rows = _element(call.query_valid, row).reshape(-1, lq).any(0).nonzero()
            start = int(rows[0]) if rows.numel() else 0
        if call.probs is not None:
            probs, valid = call.probs[row : row + 1, :, start:].float(), _first_rows(call.key_valid, start, lq - start, row)
        else:
            assert call.q is not None and call.k is not None
            ((probs, valid, *_),) = qk_chunks(
                call.q[row : row + 1],
                call.k[row : row + 1],
                _first_rows(call.attn_mask, 0, lq, row),
                call.is_causal,
                call.scale,
                budget_bytes=1 << 62,
                rows=torch.arange(start, lq, device=call.q.device),
                score_mod=call.score_mod,
            )
        valid = torch.ones_like(probs, dtype=torch.bool) if valid is None else valid.expand_as(probs)
        probs = probs.masked_fill(~valid, 0.0)
        attended = valid[0, :, 0].any(0).nonzero()
        key_start = int(attended[0]) if attended.numel() else 0
        t = max(1, min(max_tokens, lq - start, lk - key_start))
        probs, valid = probs[0, :, :t, key_start : key_start + t], valid[0, :, :t, key_start : key_start + t]
        return probs.detach().cpu(), valid.cpu(), start, key_start


def unpack_query_heads(record: AttentionRecord, num_heads: int) -> AttentionRecord:
    """Undo Hugging Face's decode-time grouped-query packing of an SDPA record.

    For one query token, ``sdpa_attention_forward`` reshapes ``[B, H, 1, D]`` queries to
    ``[B, Hkv, H / Hkv, D]`` (query heads folded into the length) to avoid repeating keys. Given the
    module's ``num_heads``, such a record is returned with ``[B, H, 1, D]`` queries; others as they are.
    """
    q, k = record.call.q, record.call.k
    if q is None or k is None or q.dim() != 4:
        return record
    b, hkv, rows, d = q.shape
    mask = record.call.attn_mask
    if hkv == num_heads or hkv * rows != num_heads or k.shape[1] != hkv or (mask is not None and mask.shape[-2] != 1):
        return record
    return record.with_call(q=q.reshape(b, num_heads, 1, d))


def _element(t: Tensor, row: int) -> Tensor:
    """Batch element ``row`` of a tensor broadcastable over the batch (its only element when that dimension is 1)."""
    return t[row] if t.shape[0] > 1 else t[0]


def _first_rows(t: Tensor | None, start: int, rows: int, row: int = 0) -> Tensor | None:
    """Batch element ``row`` and query rows ``start : start + rows`` of a mask broadcastable to ``[B, H, Lq, Lk]``."""
    if t is None:
        return None
    if t.dim() == 4 and t.shape[0] > 1:
        t = t[row : row + 1]
    if t.dim() >= 2 and t.shape[-2] > 1:
        t = t[..., start : start + rows, :]
    return t


def as_heads(t: Tensor | None) -> Tensor | None:
    """View a 3-D attention tensor ``[B, L, X]`` as ``[B, 1, L, X]``; 4-D tensors are returned as is."""
    if t is None or t.dim() != 3:
        return t
    return t.unsqueeze(1)
