"""Context (sequence) parallelism: each process of a group holds some positions of every sequence, its
queries and its keys; a row's statistics need all of the row's keys.

On a captured call, the keys (and key padding) are gathered over the group, split into contiguous
blocks of positions, and each local row's statistics merged exactly over the blocks
(:func:`attnmonitor.functional.key_blocks.key_block_head_sums`). Rows are then summed over every
process like data-parallel rows. One ``all_gather`` of the keys and one of the padding per captured
call; nothing on steps that are not captured. ``is_causal`` is the causal mask of global positions, as
PyTorch's ``context_parallel`` reads it.

Layouts (how a process's ``L`` local positions map to the sequence, ``r`` its rank, ``n`` the group size):

- ``contiguous``: positions ``r·L … r·L + L − 1``;
- ``head_tail``: two chunks of ``L / 2``, chunk ``r`` and chunk ``2n − 1 − r`` (the load balancing of
  PyTorch's ``context_parallel`` for causal attention).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from attnmonitor.functional.chunked import key_valid_from_logits
from attnmonitor.functional.evaluation import AttentionCall, CallSums
from attnmonitor.functional.key_blocks import KeyBlock, key_block_head_sums
from attnmonitor.functional.masks import sink_keys

LAYOUTS = ("contiguous", "head_tail")


def shard_positions(layout: str, rank: int, size: int, length: int) -> Tensor:
    """``[length]`` global positions of process ``rank``'s ``length`` local positions, in local order.

    Example:
        >>> shard_positions("head_tail", 0, 2, 4)
        tensor([0, 1, 6, 7])
    """
    if layout == "contiguous":
        return rank * length + torch.arange(length)
    if layout == "head_tail":
        if length % 2:
            raise ValueError(f"the `head_tail` layout needs an even number of local positions, got {length}")
        half = length // 2
        return torch.cat([rank * half + torch.arange(half), (2 * size - 1 - rank) * half + torch.arange(half)])
    raise ValueError(f"unknown context-parallel layout {layout!r}; accepted: {list(LAYOUTS)}")


def _runs(positions: Tensor) -> list[tuple[int, int]]:
    """``(local start, local stop)`` of each run of consecutive positions."""
    breaks = [0, *((positions[1:] != positions[:-1] + 1).nonzero().flatten() + 1).tolist(), positions.numel()]
    return list(zip(breaks[:-1], breaks[1:], strict=False))


class ContextParallel:
    """Gathers keys over a context-parallel group and merges each row's statistics over them.

    Args:
        layout: one of :data:`LAYOUTS`.
        group: the context-parallel process group or 1-D ``DeviceMesh`` (None: every process).
    """

    def __init__(self, layout: str, group: Any = None) -> None:
        if layout not in LAYOUTS:
            raise ValueError(f"`capture.context_parallel` must be one of {list(LAYOUTS)} or None, got {layout!r}")
        self.layout = layout
        self.group = group.get_group() if hasattr(group, "get_group") else group  # a 1-D DeviceMesh

    def head_sums(
        self,
        call: AttentionCall,
        *,
        statistics: Sequence[str],
        sink_tokens: int,
        sparsity_eps: float,
        budget_bytes: int,
    ) -> CallSums:
        """Per-head sums of this process's query rows of ``call`` over the keys of every process.

        Raises:
            ValueError: for a call whose keys cannot be gathered (no ``q``/``k``, a score modification,
                cross-attention, a mask that differs between query rows); every process raises alike.
        """
        if call.q is None or call.k is None or call.score_mod is not None:
            raise ValueError(
                "context parallelism needs the q/k of a scaled_dot_product_attention call (an eager softmax or a flex "
                "score_mod sees only this process's keys)"
            )
        q, k = call.q, call.k
        if q.shape[-2] != k.shape[-2]:
            raise ValueError(
                f"context parallelism needs self-attention (as many keys as queries), got {q.shape[-2]} queries, {k.shape[-2]} keys"
            )
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        positions = [shard_positions(self.layout, r, size, k.shape[-2]).to(q.device) for r in range(size)]
        valid = self._gather(_key_padding(call.attn_mask, k), size).bool()  # [P, B, L]
        keys = self._gather(k.contiguous(), size)  # [P, B, Hkv, L, D]
        full = torch.ones(k.shape[0], size * k.shape[-2], dtype=torch.bool, device=q.device)  # [B, P·L] in global order
        for r in range(size):
            full[:, positions[r]] = valid[r]
        sinks = None
        if not bool(full.all()):
            sinks = sink_keys(full[:, None, None, :], full.shape[-1], full.shape[-1], sink_tokens, self_attention=True)
        blocks = [
            KeyBlock(
                keys[r][..., start:stop, :],
                int(positions[r][start]),
                valid[r][:, start:stop],
                None if sinks is None else sinks[:, positions[r][start] : positions[r][start] + stop - start],
            )
            for r in range(size)
            for start, stop in _runs(positions[r])
        ]
        return key_block_head_sums(
            q,
            blocks,
            positions[rank],
            is_causal=call.is_causal,
            scale=call.scale,
            query_valid=call.query_valid,
            statistics=statistics,
            sink_tokens=sink_tokens,
            sparsity_eps=sparsity_eps,
            budget_bytes=budget_bytes,
        )

    def _gather(self, tensor: Tensor, size: int) -> Tensor:
        """``[P, *shape]`` this tensor of every process of the group, in group-rank order."""
        parts = [torch.empty_like(tensor) for _ in range(size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.stack(parts)


def _key_padding(attn_mask: Tensor | None, k: Tensor) -> Tensor:
    """``[B, L]`` uint8 (1: valid) local key padding from a mask that is the same for every query row and head."""
    b, length = k.shape[0], k.shape[-2]
    if attn_mask is None:
        return torch.ones(b, length, dtype=torch.uint8, device=k.device)
    if attn_mask.dim() != 4 or attn_mask.shape[-2] != 1 or attn_mask.shape[-3] != 1:
        raise ValueError(
            "context parallelism takes a key-padding mask [B, 1, 1, L] (the same for every query row and head), "
            f"got {tuple(attn_mask.shape)}"
        )
    valid = attn_mask if attn_mask.dtype == torch.bool else key_valid_from_logits(attn_mask)
    return valid[:, 0, 0, :].expand(b, length).to(torch.uint8).contiguous()


__all__ = ["LAYOUTS", "ContextParallel", "shard_positions"]
