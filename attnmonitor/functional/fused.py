"""Statistics of an SDPA call from one extra fused attention call: no ``[Lq, Lk]`` matrix at all.

With ``LSE_i`` the log-normaliser of row ``i`` and values augmented with the keys and two columns,
``V' = [K | 1{j < sink} | j]``, one fused call returns ``(A K)_i``, the sink mass and the mean key
position, and

    H_i = LSE_i − scale · q_i · (A K)_i,      A_ij = exp(scale · q_i · k_j − LSE_i),
    distance_i = p_i − Σ_j A_ij j              (causal: every valid key is at or before the query).

The fused kernel is PyTorch's CPU flash attention, which also returns ``LSE``; it needs equal head
sizes, so ``q`` and ``k`` are padded with two zero columns (their dot products are unchanged).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attnmonitor.functional.chunked import key_valid_from_logits
from attnmonitor.functional.statistics import _normalized_entropy_from

FUSED_STATISTICS = frozenset(
    {"entropy", "normalized_entropy", "effective_support", "sink_mass", "self_weight", "prev_token_weight", "next_token_weight", "distance"}
)
"""Statistics the fused path computes; ``max_weight`` and ``sparsity`` need the probabilities."""


def fused_row_statistics(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    query_valid: Tensor | None = None,
    *,
    statistics: Sequence[str],
    sink_tokens: int = 1,
    sink_keys: Tensor | None = None,
    budget_bytes: int,
) -> tuple[dict[str, Tensor], Tensor] | None:
    """Per-row statistics of ``scaled_dot_product_attention(q, k, ...)`` without its probabilities.

    Args:
        q: ``[B, H, Lq, D]``; k: ``[B, Hkv, Lk, D]``; the rest as SDPA, plus ``query_valid``
            (bool, broadcastable to ``[B, H, Lq]``).
        statistics: names, a subset of :data:`FUSED_STATISTICS`.
        sink_keys: bool ``[B or 1, Lk]`` sink keys of each sequence (default: the first ``sink_tokens``).
        budget_bytes: a boolean mask is turned into an additive float mask only if it fits.

    Returns:
        ``({name: [B, H, Lq]}, valid [B, H, Lq])`` as :func:`row_statistics`, or None when the call
        does not allow the fused path (other statistics, a gradient, a non-CPU device, additive
        biases other than 0/−inf, ``distance`` without a causal mask, a mask over the budget); the
        caller then evaluates the probabilities in chunks.
    """
    wanted = set(statistics)
    if not wanted <= FUSED_STATISTICS or q.device.type != "cpu" or q.requires_grad or k.requires_grad:
        return None
    if "distance" in wanted and not is_causal:
        return None
    b, h, lq, d = q.shape
    lk = k.shape[-2]
    additive, valid = None, None
    if attn_mask is not None:
        if is_causal or attn_mask.numel() * 4 > budget_bytes:
            return None
        valid = attn_mask if attn_mask.dtype == torch.bool else key_valid_from_logits(attn_mask)
        if attn_mask.dtype != torch.bool and not bool(((attn_mask == 0) | ~valid).all()):
            return None  # a positional bias: the entropy would need sum_j A_ij bias_ij
        additive = torch.zeros(attn_mask.shape, dtype=torch.float32, device=q.device).masked_fill(~valid, -math.inf)
    if k.shape[-3] != h:
        k = k.repeat_interleave(h // k.shape[-3], dim=-3)  # [B, H, Lk, D]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    keys = torch.arange(lk, device=q.device, dtype=torch.float32)
    qf, kf = q.float(), k.float()
    sinks = (keys < sink_tokens).float().expand(b, lk) if sink_keys is None else sink_keys.to(q.device, torch.float32).expand(b, lk)
    extra = torch.stack([sinks, keys.expand(b, lk)], -1).unsqueeze(1).expand(*kf.shape[:-1], 2)  # [B, H, Lk, 2]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        F.pad(qf, (0, 2)), F.pad(kf, (0, 2)), torch.cat([kf, extra], -1), 0.0, is_causal, attn_mask=additive, scale=scale
    )  # out: [B, H, Lq, D + 2] = [A K | sink mass | mean key position]; lse: [B, H, Lq]
    rows = torch.arange(lq, device=q.device)
    positions = rows + (lk - lq)  # bottom-right query positions, as the chunked path
    if is_causal:
        n = (rows + 1).clamp_max(lk).float().expand(b, h, lq)  # top-left causal: keys j <= i
    elif valid is not None:
        n = valid.sum(-1, dtype=torch.float32).expand(b, h, lq)
    else:
        n = torch.full((b, h, lq), float(lk), device=q.device)
    row_valid = n > 0
    if query_valid is not None:
        row_valid = row_valid & query_valid.to(torch.bool)

    def weight_at(offset: int) -> Tensor:
        index = positions + offset
        exists = (index >= 0) & (index < lk)
        if is_causal:
            exists = exists & (index <= rows)
        index = index.clamp(0, lk - 1)
        logits = scale * (qf * kf[:, :, index]).sum(-1)  # [B, H, Lq]: q_i . k_{p_i + offset}
        if valid is not None:
            allowed = valid.expand(b, -1, lq, lk).gather(-1, index.view(1, 1, -1, 1).expand(b, valid.shape[1], lq, 1)).squeeze(-1)
            exists = exists & allowed
        return torch.where(exists, (logits - lse).exp(), 0.0)

    entropy = (lse - scale * (qf * out[..., :d]).sum(-1)).clamp_min(0.0)
    compute = {
        "entropy": lambda: entropy,
        "normalized_entropy": lambda: _normalized_entropy_from(entropy, n),
        "effective_support": lambda: entropy.exp(),
        "sink_mass": lambda: out[..., d],
        "distance": lambda: positions.float() - out[..., d + 1],
        "self_weight": lambda: weight_at(0),
        "prev_token_weight": lambda: weight_at(-1),
        "next_token_weight": lambda: weight_at(1),
    }
    values = {name: torch.where(row_valid, compute[name](), 0.0) for name in statistics}
    return values, row_valid
