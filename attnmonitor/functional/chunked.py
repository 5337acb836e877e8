"""Statistics of one attention call, in chunks of query rows that fit a memory budget.

Two sources: probabilities the model already materialised (eager softmax), or the ``q``/``k`` of a
``scaled_dot_product_attention`` call, whose probabilities are recomputed chunk by chunk so the full
``[Lq, Lk]`` matrix never exists when it would exceed the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from attnmonitor.functional.statistics import ROW_STATISTICS, head_sums, row_statistics

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20
ScoreMod = Callable[[Tensor, Tensor], Tensor]
"""``(scores [B, H, r, Lk], rows [r]) -> scores``: a score modification applied to the scaled logits
of query rows ``rows`` before masking (FlexAttention's ``score_mod``; ``-inf`` blocks a key)."""
_LIVE_COPIES = 8  # float32 tensors of a chunk's size alive at once while its statistics are computed
MAX_PASS_BLOCK_BYTES = 4 * 2**20
"""Logits per block of the pass of logit maxima (:func:`qk_logit_max`): small blocks stay in cache and,
under a causal mask, skip the keys after the block's last row (about 5x faster than one large block)."""


class Chunk(NamedTuple):
    """``r`` query rows of one attention call."""

    probs: Tensor  # [B, H, r, Lk]
    key_valid: Tensor | None  # bool, broadcastable to probs
    query_valid: Tensor | None  # bool, broadcastable to [B, H, r]
    positions: Tensor  # [r] key position of each row
    owned: bool = False  # probs were made here: consumers may overwrite them
    masked: bool = False  # probs are exactly 0 on invalid keys of rows with a valid key
    logit_max: Tensor | None = None  # [B, H, r] float32 largest logit over valid keys (-inf: none)


def rows_per_chunk(rows: int, row_elements: int, budget_bytes: int, live_copies: int = _LIVE_COPIES) -> int:
    """Query rows per chunk so that ``live_copies`` float32 copies of a chunk fit ``budget_bytes``."""
    per_row = max(1, row_elements) * 4 * live_copies
    return max(1, min(rows, budget_bytes // per_row))


def key_valid_from_logits(logits: Tensor) -> Tensor:
    """Bool mask of keys not masked out of the softmax input (``-inf`` or ``<= finfo.min / 2``).

    NaN logits count as valid so that non-finite attention is detected rather than hidden.
    """
    return ~(logits <= torch.finfo(logits.dtype).min / 2)


def sdpa_key_valid(attn_mask: Tensor | None, is_causal: bool, lk: int, rows: Tensor) -> Tensor | None:
    """Bool key mask (True = attend) of some query rows of an SDPA call, broadcastable to ``[B, H, r, Lk]``.

    Args:
        attn_mask: SDPA's mask restricted to these rows (bool means "attend"; a float mask is added
            to the logits, ``-inf`` or the dtype's minimum blocking a key), or None.
        is_causal: top-left causal mask, as in PyTorch; only these rows are built, so the mask of a
            long sequence is never materialised whole.
        lk: number of keys.
        rows: ``[r]`` indices of the query rows.
    """
    valid = None
    if attn_mask is not None:
        valid = attn_mask if attn_mask.dtype == torch.bool else key_valid_from_logits(attn_mask)
    if is_causal:
        causal = torch.arange(lk, device=rows.device) <= rows.unsqueeze(-1)  # [r, Lk]
        valid = causal if valid is None else valid & causal
    return valid


def _select(t: Tensor | None, rows: Tensor | None, dim: int) -> Tensor | None:
    """Query rows ``rows`` of a tensor broadcastable along ``dim`` (size 1 stays)."""
    if t is None or rows is None or t.dim() < -dim or t.shape[dim] == 1:
        return t
    return t.index_select(t.dim() + dim, rows.to(t.device))


def _row_slice(t: Tensor | None, start: int, stop: int, dim: int) -> Tensor | None:
    """Slice query rows ``start:stop`` of a tensor broadcastable along ``dim`` (size 1 stays)."""
    if t is None or t.dim() < -dim or t.shape[dim] == 1:
        return t
    return t.narrow(t.dim() + dim, start, stop - start)


def _key_slice(t: Tensor | None, width: int) -> Tensor | None:
    """The first ``width`` keys of a mask broadcastable along its last dim (size 1 stays)."""
    if t is None or t.shape[-1] == 1 or t.shape[-1] == width:
        return t
    return t[..., :width]


def probability_chunks(
    probs: Tensor,
    key_valid: Tensor | None = None,
    query_valid: Tensor | None = None,
    *,
    budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    masked: bool = False,
    rows: Tensor | None = None,
) -> Iterator[Chunk]:
    """Split materialised probabilities ``[B, H, Lq, Lk]`` into row chunks.

    ``masked``: the probabilities are already 0 on invalid keys (a softmax over masked logits).
    ``rows``: only these query rows (``[r]`` indices), e.g. a random sample.
    """
    b, h, lq, lk = probs.shape
    index = torch.arange(lq, device=probs.device) if rows is None else rows.to(probs.device)
    key_valid, query_valid = _select(key_valid, rows, -2), _select(query_valid, rows, -1)
    step = rows_per_chunk(index.numel(), b * h * lk, budget_bytes)
    for start in range(0, index.numel(), step):
        stop = min(index.numel(), start + step)
        chunk = probs[:, :, start:stop] if rows is None else probs.index_select(-2, index[start:stop])
        selected = (_row_slice(key_valid, start, stop, -2), _row_slice(query_valid, start, stop, -1))
        yield Chunk(chunk, *selected, index[start:stop] + (lk - lq), owned=rows is not None, masked=masked)


def qk_chunks(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    query_valid: Tensor | None = None,
    *,
    budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    rows: Tensor | None = None,
    score_mod: ScoreMod | None = None,
    logit_max: bool = False,
) -> Iterator[Chunk]:
    """Recompute the probabilities of ``scaled_dot_product_attention(q, k, ...)`` by row chunks.

    Args:
        q: ``[B, H, Lq, D]`` queries.
        k: ``[B, Hkv, Lk, D]`` keys; ``Hkv`` divides ``H`` (grouped-query attention: query head
            ``h`` reads key head ``h // (H / Hkv)``).
        attn_mask: bool (True = attend) or additive float, broadcastable to ``[B, H, Lq, Lk]``.
        is_causal: top-left causal mask, as SDPA.
        scale: logit scale, default ``1 / sqrt(D)``.
        query_valid: bool, broadcastable to ``[B, H, Lq]``.
        budget_bytes: memory for one chunk's temporaries.
        rows: only these query rows (``[r]`` indices), e.g. a random sample.
        score_mod: modifies the scaled logits before the mask (flex attention); keys it sets to
            ``-inf`` are invalid.
        logit_max: also give each chunk's ``[B, H, r]`` largest logit over valid keys
            (:attr:`Chunk.logit_max`, one more reduction of the logits before the softmax).

    Raises:
        ValueError: if the head counts are incompatible.
    """
    lq, lk = q.shape[-2], k.shape[-2]
    for logits, valid, index, chunk_query_valid in _logit_chunks(
        q, k, attn_mask, is_causal, scale, query_valid, budget_bytes=budget_bytes, rows=rows, score_mod=score_mod
    ):
        in_place = not logits.requires_grad
        # the largest logit over valid keys: blocked keys are -inf in a row with a valid key
        row_max = _row_max(logits, valid) if logit_max else None
        # in place when no gradient is needed (the row-wise kernel reads a row before writing it): one
        # full-size buffer fewer
        probs = torch.ops.aten._softmax.out(logits, -1, False, out=logits) if in_place else logits.softmax(-1)
        del logits  # not alive while the consumer computes statistics
        positions = index + (lk - lq)
        yield Chunk(probs, valid, chunk_query_valid, positions, owned=not probs.requires_grad, masked=True, logit_max=row_max)


def qk_logit_max(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
    rows: Tensor | None = None,
    score_mod: ScoreMod | None = None,
) -> Tensor:
    """Largest logit over valid keys of each query row of ``scaled_dot_product_attention(q, k, ...)``,
    by row chunks within ``budget_bytes`` and without any softmax (arguments as :func:`qk_chunks`).

    Returns:
        ``[B, H, r]`` float32 (``r``: every query row, or ``rows``); ``-inf`` for a row with no valid key.

    Example:
        >>> q, k = torch.eye(2).view(1, 1, 2, 2), torch.eye(2).view(1, 1, 2, 2)
        >>> qk_logit_max(q, k, is_causal=True, scale=1.0)
        tensor([[[1., 1.]]])
    """
    with torch.no_grad():  # maxima only: no graph, in-place arithmetic
        return _qk_logit_max(q, k, attn_mask, is_causal, scale, budget_bytes=budget_bytes, rows=rows, score_mod=score_mod)


def _qk_logit_max(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    *,
    budget_bytes: int,
    rows: Tensor | None,
    score_mod: ScoreMod | None,
) -> Tensor:
    parts = [
        _row_max(logits, valid)
        for logits, valid, _, _ in _logit_chunks(
            q,
            k,
            attn_mask,
            is_causal,
            scale,
            None,
            budget_bytes=min(budget_bytes, MAX_PASS_BLOCK_BYTES),
            rows=rows,
            score_mod=score_mod,
            live_copies=1,
            causal_prefix=True,
            scale_queries=True,
        )
    ]
    return torch.cat(parts, -1)


def _row_max(logits: Tensor, valid: Tensor | None) -> Tensor:
    """``[B, H, r]`` float32 row maxima of blocked logits (see :func:`_logit_chunks`); ``-inf`` where a
    row has no valid key (its logits were left finite)."""
    row_max = logits.detach().amax(-1).float()  # [B, H, r]
    if valid is None:
        return row_max
    return row_max.masked_fill(~valid.any(-1).expand(row_max.shape), float("-inf"))


class SdpaOperands(NamedTuple):
    """An SDPA call's operands as the statistics read them (see :func:`sdpa_operands`)."""

    q: Tensor  # [B, H, r, D]: the evaluated query rows
    keys_t: Tensor  # [B, H, D, Lk] in ``dtype``: keys, one head per query head, transposed
    attn_mask: Tensor | None  # restricted to the evaluated rows
    query_valid: Tensor | None  # restricted to the evaluated rows
    index: Tensor  # [r] the evaluated rows' indices
    dtype: torch.dtype  # float32 at least; float64 stays
    scale: float


def sdpa_operands(
    q: Tensor, k: Tensor, attn_mask: Tensor | None, scale: float | None, query_valid: Tensor | None, rows: Tensor | None
) -> SdpaOperands:
    """Keys repeated for grouped-query attention, the rows ``rows`` (all if None) selected, the scale
    defaulted (arguments as :func:`qk_chunks`).

    Raises:
        ValueError: if the query heads are not a multiple of the key heads.
    """
    if q.shape[-3] != k.shape[-3]:
        if q.shape[-3] % k.shape[-3]:
            raise ValueError(f"query heads ({q.shape[-3]}) must be a multiple of key heads ({k.shape[-3]})")
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)  # [B, H, Lk, D]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    index = torch.arange(q.shape[-2], device=q.device) if rows is None else rows.to(q.device)
    if rows is not None:
        q, attn_mask, query_valid = q.index_select(-2, index), _select(attn_mask, index, -2), _select(query_valid, index, -1)
    dtype = torch.promote_types(q.dtype, torch.float32)
    return SdpaOperands(q, k.to(dtype).transpose(-2, -1), attn_mask, query_valid, index, dtype, scale)


def _logit_chunks(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    query_valid: Tensor | None,
    *,
    budget_bytes: int,
    rows: Tensor | None,
    score_mod: ScoreMod | None,
    live_copies: int = _LIVE_COPIES,
    causal_prefix: bool = False,
    scale_queries: bool = False,
) -> Iterator[tuple[Tensor, Tensor | None, Tensor, Tensor | None]]:
    """``(logits [B, H, r, Lk], key_valid, row indices [r], query_valid)`` by row chunks: the logits the
    softmax sees (scaled, plus the additive mask and the score modification), ``-inf`` on invalid keys of
    rows that have a valid key (fully masked rows keep finite logits: no NaN after the softmax).

    ``causal_prefix``: under ``is_causal`` (every row, no ``score_mod``), a chunk's logits stop at the key
    of its last row (the keys after it are masked for every row of the chunk): ``[B, H, r, Lk']``.
    ``scale_queries``: scale the queries (``[r, D]``) rather than the logits (``[r, Lk]``); the logits
    then differ in rounding from SDPA's order of operations (fine for maxima, not for probabilities)."""
    lk = k.shape[-2]
    q, keys_t, attn_mask, query_valid, index, dtype, scale = sdpa_operands(q, k, attn_mask, scale, query_valid, rows)
    additive = attn_mask if attn_mask is not None and attn_mask.dtype != torch.bool else None
    step = rows_per_chunk(index.numel(), q.shape[:-2].numel() * lk, budget_bytes, live_copies)
    prefix = causal_prefix and is_causal and rows is None and score_mod is None
    for start in range(0, index.numel(), step):
        stop = min(index.numel(), start + step)
        width = min(lk, stop) if prefix else lk  # top-left causal: row i sees keys j <= i
        with torch.autocast(q.device.type, enabled=False):  # float32 logits at least, even under autocast
            queries = q[..., start:stop, :].to(dtype)
            logits = (queries * scale if scale_queries else queries) @ keys_t[..., :width]  # [B, H, r, Lk]
        in_place = not logits.requires_grad  # one full-size tensor fewer when no gradient is needed
        if not scale_queries:
            logits = logits.mul_(scale) if in_place else logits * scale
        mask = _key_slice(_row_slice(additive, start, stop, -2), width)
        if mask is not None:
            logits = logits.add_(mask.to(dtype)) if in_place else logits + mask.to(dtype)
        valid = sdpa_key_valid(_key_slice(_row_slice(attn_mask, start, stop, -2), width), is_causal, width, index[start:stop])
        if score_mod is not None:
            logits = score_mod(logits, index[start:stop]).to(dtype)
            modified = key_valid_from_logits(logits)
            valid = modified if valid is None else valid & modified
        if valid is not None:  # as an additive bias at the mask's own size: far cheaper than masked_fill
            # fully masked rows keep their finite logits: no NaN in values or gradients (the row never counts)
            blocked = ~valid & valid.any(-1, keepdim=True)
            # only a causal mask on a prefix: keys before the chunk's first row are valid for all its rows
            first = start if prefix and attn_mask is None else 0
            bias = torch.zeros(blocked[..., first:].shape, dtype=dtype, device=logits.device)
            bias = bias.masked_fill_(blocked[..., first:], float("-inf"))
            if first:
                logits[..., first:].add_(bias)
            else:
                logits = logits.add_(bias) if in_place else logits + bias
        yield logits, valid, index[start:stop], _row_slice(query_valid, start, stop, -1)


def chunk_head_sums(
    chunk: Chunk,
    *,
    statistics: Sequence[str] = ROW_STATISTICS,
    sink_tokens: int = 1,
    sparsity_eps: float = 0.1,
    sink_keys: Tensor | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-head sums ``{name: [H]}`` and valid-row counts ``[H]`` of one chunk (arguments as
    :func:`attnmonitor.functional.row_statistics`)."""
    values, valid = row_statistics(
        chunk.probs,
        chunk.key_valid,
        chunk.query_valid,
        statistics=statistics,
        query_positions=chunk.positions,
        sink_tokens=sink_tokens,
        sparsity_eps=sparsity_eps,
        overwrite=chunk.owned,
        masked=chunk.masked,
        sink_keys=sink_keys,
    )
    return head_sums(values, valid)


def chunked_head_sums(chunks: Iterator[Chunk], **options: object) -> tuple[dict[str, Tensor], Tensor]:
    """Per-head sums ``{name: [H]}`` and valid-row counts ``[H]`` over all chunks (``options``: those
    of :func:`chunk_head_sums`)."""
    total: dict[str, Tensor] = {}
    count: Tensor | None = None
    for chunk in chunks:
        sums, n = chunk_head_sums(chunk, **options)  # type: ignore[arg-type]
        count = n if count is None else count + n
        total = {name: total[name] + s if name in total else s for name, s in sums.items()}
    assert count is not None, "no query rows"
    return total, count
