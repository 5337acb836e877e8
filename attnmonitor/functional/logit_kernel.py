"""Every statistic of an SDPA call from blocks of ``q · kᵀ``, one exponential per logit: a compiled kernel.

With ``x_ij`` a row's logits (``-inf`` on blocked keys), ``m_i`` its largest, ``y_ij = x_ij − m_i``,
``e_ij = exp(y_ij)`` and ``s_i = Σ_j e_ij`` (so ``A_ij = e_ij / s_i``):

    H_i = log s_i − Σ_j e_ij y_ij / s_i,      max_j A_ij = 1 / s_i,      max_logit_i = m_i,
    distance_i = Σ_j e_ij |p_i − j| / s_i,    sink_i = Σ_{j sink} e_ij / s_i,
    A_ij < eps / n_i  ⇔  y_ij < log(eps · s_i / n_i),

so a block takes one pass of maxima, one of exponentials (every sum at once) and, for sparsity only,
one of comparisons, fused by inductor; the offset weights (self, previous, next) are three gathered
logits, and the position sums are left out when no position statistic is asked for (the alarms'
light captures). The probabilities are never written. Blocks of query rows hold at most
:data:`~attnmonitor.functional.chunked.MAX_PASS_BLOCK_BYTES` of logits (they stay in cache); under a
causal mask a block stops at the key of its last row.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from attnmonitor.functional.chunked import MAX_PASS_BLOCK_BYTES, _key_slice, _row_slice, rows_per_chunk, sdpa_operands
from attnmonitor.functional.row_kernel import CompiledKernel, kernel_applies
from attnmonitor.functional.statistics import POSITION_STATISTICS, ROW_STATISTICS, _normalized_entropy_from

OFFSETS = {"self_weight": 0, "prev_token_weight": -1, "next_token_weight": 1}


def _masked_logits(
    scores: Tensor, scale: Tensor, rows: Tensor, key_valid: Tensor | None, bias: Tensor | None, causal: bool
) -> tuple[Tensor, Tensor]:
    """``(x [B, H, r, W], n [B, H, r])``: the logits the softmax sees, ``-inf`` on blocked keys, and
    each row's valid keys (arguments as :func:`block_sums`)."""
    width = scores.shape[-1]
    x = scores * scale
    ok = torch.arange(width, device=x.device, dtype=x.dtype) <= rows.unsqueeze(-1) if causal else None  # [r, W]
    if key_valid is not None:
        ok = key_valid if ok is None else ok & key_valid
    if bias is not None:
        x = x + bias
        unblocked = ~(bias <= torch.finfo(bias.dtype).min / 2)  # NaN stays valid: detected, not hidden
        ok = unblocked if ok is None else ok & unblocked
    if ok is None:
        return x, torch.full(x.shape[:-1], width, device=x.device, dtype=x.dtype)
    return torch.where(ok, x, -math.inf), ok.sum(-1, dtype=x.dtype).expand(x.shape[:-1])


def _centered(x: Tensor, m: Tensor) -> Tensor:
    """``y = x − m`` (rows without a valid key, ``m = -inf``, stay all ``-inf``)."""
    return x - torch.where(m == -math.inf, 0.0, m).unsqueeze(-1)


def block_sums(
    scores: Tensor,
    scale: Tensor,
    rows: Tensor,
    positions: Tensor,
    key_valid: Tensor | None,
    bias: Tensor | None,
    sinks: Tensor,
    causal: bool,
    positional: bool,
) -> tuple[Tensor, ...]:
    """The pass of maxima and the pass of exponentials over one block of query rows.

    Args:
        scores: ``[B, H, r, W]`` unscaled ``q · kᵀ`` of the block's rows and first ``W`` keys.
        scale: 0-d logit scale.
        rows: ``[r]`` query index of each row (top-left causal mask: key ``j`` valid when ``j <= row``).
        positions: ``[r]`` key position of each row (bottom-right: ``row + Lk − Lq``).
        key_valid: bool broadcastable to ``scores``, or None.
        bias: additive float mask broadcastable to ``scores`` (``<= finfo.min / 2`` blocks a key), or None.
        sinks: ``[B or 1, W]``, 1 on sink keys.
        causal: apply the causal mask.
        positional: also the sums of the position statistics (distance, offset weights).

    Returns:
        ``[B, H, r]`` each: largest logit ``m`` (``-inf``: no valid key), valid keys ``n``, ``s``,
        ``Σ e y``, ``Σ_sinks e``; if ``positional``, ``Σ e |p − j|`` and ``[B, H, r, 3]`` ``e`` at
        offsets -1, 0, +1.
    """
    x, n = _masked_logits(scores, scale, rows, key_valid, bias, causal)
    width = x.shape[-1]
    m = x.amax(-1)
    y = _centered(x, m)

    def e() -> Tensor:  # one node per sum: inductor realises a reused exp on CPU; these share one loop
        return torch.exp(y)

    sums = (
        e().sum(-1),
        torch.where(y > -math.inf, e() * y, 0.0).sum(-1),  # 0 · (-inf) on blocked keys: 0
        (e() * sinks[:, None, None, :]).sum(-1),
    )
    if not positional:
        return (m, n, *sums)
    keys = torch.arange(width, device=x.device, dtype=x.dtype)
    distance = (e() * (positions.unsqueeze(-1) - keys).abs()).sum(-1)
    index = positions.long().unsqueeze(-1) + torch.tensor([-1, 0, 1], device=x.device)  # [r, 3]
    gathered = y.gather(-1, index.clamp(0, width - 1).expand(*y.shape[:-1], 3))
    offsets = torch.where((index >= 0) & (index < width), torch.exp(gathered), 0.0)
    return (m, n, *sums, distance, offsets)


def block_below(
    scores: Tensor,
    scale: Tensor,
    rows: Tensor,
    key_valid: Tensor | None,
    bias: Tensor | None,
    causal: bool,
    m: Tensor,
    n: Tensor,
    threshold: Tensor,
) -> Tensor:
    """The pass of comparisons over one block: ``[B, H, r]`` valid keys whose weight is below the
    sparsity threshold, ``y_ij < threshold_i = log(eps · s_i / n_i)`` (arguments as :func:`block_sums`)."""
    x, _ = _masked_logits(scores, scale, rows, key_valid, bias, causal)
    below = (_centered(x, m) < threshold.unsqueeze(-1)).sum(-1, dtype=x.dtype)
    return below - (x.shape[-1] - n)  # blocked keys compare below too


_sums = CompiledKernel(block_sums)
_below = CompiledKernel(block_below)


def _block_mask(attn_mask: Tensor | None, start: int, stop: int, width: int, dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None]:
    """``(key_valid, bias)`` of rows ``start:stop`` and the first ``width`` keys: a bool mask, or an
    additive one in ``dtype`` (either None)."""
    mask = _key_slice(_row_slice(attn_mask, start, stop, -2), width)
    if mask is None or mask.dtype == torch.bool:
        return mask, None
    return None, mask.to(dtype)


def qk_row_statistics(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    query_valid: Tensor | None = None,
    *,
    statistics: Iterable[str] = ROW_STATISTICS,
    sink_tokens: int = 1,
    sink_keys: Tensor | None = None,
    sparsity_eps: float = 0.1,
    rows: Tensor | None = None,
) -> tuple[dict[str, Tensor], Tensor, Tensor] | None:
    """Row statistics and row maxima of ``scaled_dot_product_attention(q, k, ...)``.

    Args:
        q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]``; attn_mask, is_causal, scale: as SDPA.
        query_valid: bool, broadcastable to ``[B, H, Lq]``.
        statistics: the row statistics wanted (names of :data:`ROW_STATISTICS`): without ``sparsity``
            no comparison pass, without position statistics no position sums.
        sink_tokens, sink_keys, sparsity_eps: as :func:`attnmonitor.functional.row_statistics`.
        rows: only these query rows (``[r]`` indices), e.g. a random sample.

    Returns:
        ``({name: [B, H, r]} for the wanted statistics, valid [B, H, r], largest logit [B, H, r])``
        (invalid rows hold 0; ``-inf`` largest logit: no valid key), or None where the compiled kernel
        is not used (:func:`~attnmonitor.functional.row_kernel.kernel_applies`, or it failed).
    """
    b, h, lq, _ = q.shape
    lk = k.shape[-2]
    count = lq if rows is None else rows.numel()
    if not kernel_applies(b * h * count * lk, q, k):
        return None
    wanted = set(statistics)
    positional, sparsity = bool(wanted & POSITION_STATISTICS), "sparsity" in wanted
    q, keys_t, attn_mask, query_valid, index, dtype, scale = sdpa_operands(q, k, attn_mask, scale, query_valid, rows)
    if sink_keys is None:
        sink_keys = torch.arange(lk, device=q.device) < sink_tokens
    sinks = sink_keys.to(q.device, dtype).view(-1, lk)
    scale_t = torch.tensor(scale, dtype=dtype, device=q.device)
    prefix = is_causal and rows is None  # top-left causal: the rows of a block see keys before its end
    step = rows_per_chunk(count, b * h * lk, MAX_PASS_BLOCK_BYTES, live_copies=1)
    blocks = []
    with torch.autocast(q.device.type, enabled=False):  # logits in float32 at least, as the reference
        for start in range(0, count, step):
            stop = min(count, start + step)
            width = min(lk, stop) if prefix else lk
            scores = q[..., start:stop, :].to(dtype) @ keys_t[..., :width]
            key_valid, bias = _block_mask(attn_mask, start, stop, width, dtype)
            block_rows = index[start:stop].to(dtype)
            sums = _sums(scores, scale_t, block_rows, block_rows + (lk - lq), key_valid, bias, sinks[:, :width], is_causal, positional)
            if sums is None:
                return None
            if sparsity:
                m, n, total = sums[:3]
                threshold = torch.log(sparsity_eps * total / n.clamp_min(1.0))  # A_ij < eps/n_i ⇔ y_ij < log(eps s_i/n_i)
                below = _below(scores, scale_t, block_rows, key_valid, bias, is_causal, m, n, threshold)
                if below is None:
                    return None
                sums = (*sums, below)
            blocks.append(sums)
    columns = [torch.cat(column, -2 if column[0].dim() == 4 else -1) for column in zip(*blocks, strict=True)]  # rows: dim 2
    m, n, total, ey, sink = columns[:5]
    inverse = 1.0 / total
    entropy = torch.log(total) - ey * inverse
    values = {
        "entropy": entropy,
        "normalized_entropy": _normalized_entropy_from(entropy, n),
        "max_weight": inverse,
        "effective_support": entropy.exp(),
        "sink_mass": sink * inverse,
    }
    if positional:
        distance, offsets = columns[5] * inverse, columns[6] * inverse.unsqueeze(-1)
        values |= {"distance": distance, **{name: offsets[..., offset + 1] for name, offset in OFFSETS.items()}}
    if sparsity:
        values["sparsity"] = columns[-1] / n.clamp_min(1.0)
    valid = n > 0
    if query_valid is not None:
        valid = valid & query_valid.to(torch.bool)
    return {name: torch.where(valid, values[name].float(), 0.0) for name in wanted}, valid, m.float()
