"""Which query rows count and which keys are sinks, from one attention call's own key mask.

Every rule reads only the call's key mask (bool, True = the key may be attended, broadcastable to
``[B, H, Lq, Lk]``), never a mask given to the model for some other sequence:

- **query validity (self-attention)**: position ``p_i = i + Lk - Lq`` is a real token iff row ``i``
  may attend its own key ``p_i``. Padding masks block padded keys for every row, so a padded query
  cannot see itself; causal, sliding-window and block-diagonal (packed) masks always let a real
  token see itself.
- **sequence starts (self-attention, no cache)**: the first valid key ``f_i`` of each row; following
  ``i → f_i`` until it stops moving ends at the first real token of the row's own sequence or packed
  document, also under a sliding window where a row no longer sees it.
- **sinks**: the ``sink_tokens`` keys from that start. Because a row only attends keys of its own
  document, a per-key indicator ``[B, Lk]`` is enough, on the chunked and the fused paths alike.
  Cross-attention and KV-cache calls (``Lq != Lk``) take the first key that any row may attend.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_ROW_CHUNK_ELEMENTS = 1 << 24  # bool elements of a mask processed at once


def diagonal_valid(key_valid: Tensor, lq: int, lk: int) -> Tensor | None:
    """Whether each query may attend its own position ``i + Lk - Lq``: bool ``[B', Lq]``.

    Args:
        key_valid: bool, broadcastable to ``[B, H, Lq, Lk]`` (4-D).
        lq: number of query rows. lk: number of keys.

    Returns:
        ``[B', Lq]`` (``B'`` is 1 when the mask is shared by the batch; any head counts), or None when
        ``Lk < Lq`` (queries have no key position).

    Example:
        >>> pad = torch.tensor([True, True, False])[None, None, None, :]  # [1, 1, 1, 3]: key 2 is padding
        >>> diagonal_valid(pad, 3, 3)
        tensor([[ True,  True, False]])
    """
    if lk < lq:
        return None
    full = key_valid.expand(*key_valid.shape[:-2], lq, lk)  # a view: nothing materialised
    return full.diagonal(offset=lk - lq, dim1=-2, dim2=-1).any(1)  # [B', Lq]


def first_valid_keys(key_valid: Tensor, lq: int, lk: int) -> tuple[Tensor, Tensor]:
    """Index of the first valid key of each row and whether the row has one.

    Args:
        key_valid: bool, broadcastable to ``[B, H, Lq, Lk]`` (4-D); heads are merged with ``any``.

    Returns:
        ``(first [B', Lq] long, has_key [B', Lq] bool)``; ``first`` is 0 where ``has_key`` is False.
    """
    rows = key_valid.shape[-2]
    step = max(1, _ROW_CHUNK_ELEMENTS // max(1, key_valid.shape[0] * key_valid.shape[1] * lk))
    firsts, anys = [], []
    for start in range(0, rows, step):
        chunk = key_valid[..., start : start + step, :].any(1)  # [B', r, Lk]
        firsts.append(chunk.to(torch.uint8).argmax(-1))  # argmax returns the first maximum
        anys.append(chunk.any(-1))
    first, has_key = torch.cat(firsts, -1), torch.cat(anys, -1)
    if rows == 1 and lq > 1:  # a mask shared by every row
        first, has_key = first.expand(-1, lq), has_key.expand(-1, lq)
    return first, has_key


def sequence_starts(first: Tensor, has_key: Tensor) -> Tensor:
    """Start of each position's sequence or packed document, ``[B', L]`` long.

    ``first[b, i]`` is the first key row ``i`` attends (self-attention without a cache); rows with no
    key point to themselves. Pointer jumping follows ``i → first[i]`` to its fixed point in
    ``O(log L)`` gathers: the first real token even where a sliding window hides it from row ``i``.

    Example:
        >>> first = torch.tensor([[0, 0, 1, 3, 3]])  # window of 2 keys, then a new document at 3
        >>> sequence_starts(first, torch.ones(1, 5, dtype=torch.bool))
        tensor([[0, 0, 0, 3, 3]])
    """
    length = first.shape[-1]
    start = torch.where(has_key, first, torch.arange(length, device=first.device)).contiguous()
    for _ in range(max(1, math.ceil(math.log2(max(length, 2)))) + 1):
        jumped = start.gather(-1, start)
        if torch.equal(jumped, start):
            break
        start = jumped
    return start


def sink_keys(
    key_valid: Tensor | None,
    lq: int,
    lk: int,
    sink_tokens: int,
    *,
    self_attention: bool,
    query_valid: Tensor | None = None,
) -> Tensor | None:
    """Bool ``[B', Lk]``: the keys whose attention counts as sink mass, or None for the first ``sink_tokens``.

    Args:
        key_valid: the call's key mask, bool broadcastable to ``[B, H, Lq, Lk]`` (4-D), or None
            (every key valid, or a plain causal mask: the sink is key 0).
        lq, lk: query rows and keys.
        sink_tokens: how many keys from the start are sinks.
        self_attention: queries and keys are one sequence; with ``Lq == Lk`` each position's own
            document start is used (packed sequences).
        query_valid: bool ``[B', Lq]``: rows that count (cross-attention and caches take the first key
            any counted row may attend).

    Example:
        >>> left_padded = torch.tensor([False, False, True, True, True])[None, None, None, :]
        >>> sink_keys(left_padded, 5, 5, 1, self_attention=True)
        tensor([[False, False,  True, False, False]])
    """
    if key_valid is None:
        return None
    first, has_key = first_valid_keys(key_valid, lq, lk)
    keys = torch.arange(lk, device=first.device)
    if self_attention and lq == lk:
        start = sequence_starts(first, has_key)  # [B', L]: per key, since key j is row j
        return (keys - start >= 0) & (keys - start < sink_tokens)
    counted = has_key if query_valid is None else has_key & query_valid.to(has_key.device)
    start = torch.where(counted, first, lk).amin(-1, keepdim=True)  # [B', 1]
    return (keys >= start) & (keys < start + sink_tokens)


__all__ = ["diagonal_valid", "first_valid_keys", "sequence_starts", "sink_keys"]
