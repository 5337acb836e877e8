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
    {
        "entropy",
        "normalized_entropy",
        "effective_support",
        "sink_mass",
        "self_weight",
        "prev_token_weight",
        "next_token_weight",
        "distance",
        "max_logit",
    }
)
"""Statistics of the fused path; ``max_weight`` and ``sparsity`` need the probabilities. ``max_logit``
is not computed here but by a pass of chunked maxima of the logits, without probabilities
(:func:`attnmonitor.functional.chunked.qk_logit_max`)."""


def fused_path_refusal(
    q: Tensor,
    k: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    *,
    statistics: Sequence[str],
    budget_bytes: int,
) -> str | None:
    """Why an SDPA call's statistics cannot take the fused path, or None when they can.

    Example:
        >>> q = torch.randn(1, 2, 4, 8)
        >>> fused_path_refusal(q, q, None, True, statistics=["entropy"], budget_bytes=2**20) is None
        True
        >>> fused_path_refusal(q, q, None, True, statistics=["max_weight"], budget_bytes=2**20)
        "needs the probabilities for ['max_weight']"
    """
    other = sorted(set(statistics) - FUSED_STATISTICS)
    if other:
        return f"needs the probabilities for {other}"
    if q.device.type != "cpu":
        return "the fused kernel with a log-normaliser is used on CPU only"
    if q.requires_grad or k.requires_grad:
        return "a gradient is needed (regularization)"
    if "distance" in statistics and not is_causal:
        return "distance needs a causal mask"
    if attn_mask is not None:
        if is_causal or attn_mask.numel() * 4 > budget_bytes:
            return "the mask does not fit the memory budget as an additive mask"
        if attn_mask.dtype != torch.bool and not bool(((attn_mask == 0) | ~key_valid_from_logits(attn_mask)).all()):
            return "an additive positional bias (the entropy would need sum_j A_ij bias_ij)"
    return None


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
        statistics: names, a subset of :data:`FUSED_STATISTICS` (``max_logit`` is left out of the result:
            see :func:`attnmonitor.functional.chunked.qk_logit_max`).
        sink_keys: bool ``[B or 1, Lk]`` sink keys of each sequence (default: the first ``sink_tokens``).
        budget_bytes: a boolean mask is turned into an additive float mask only if it fits.

    Returns:
        ``({name: [B, H, Lq]}, valid [B, H, Lq])`` as :func:`row_statistics`, or None when the call
        does not allow the fused path (other statistics, a gradient, a non-CPU device, additive
        biases other than 0/−inf, ``distance`` without a causal mask, a mask over the budget); the
        caller then evaluates the probabilities in chunks.
    """
    if fused_path_refusal(q, k, attn_mask, is_causal, statistics=statistics, budget_bytes=budget_bytes):
        return None
    b, h, lq, d = q.shape
    lk = k.shape[-2]
    valid = None if attn_mask is None else (attn_mask if attn_mask.dtype == torch.bool else key_valid_from_logits(attn_mask))
    if k.shape[-3] != h:
        k = k.repeat_interleave(h // k.shape[-3], dim=-3)  # [B, H, Lk, D]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf, kf = q.float(), k.float()
    if sink_keys is None:
        sink_keys = torch.arange(lk, device=q.device) < sink_tokens
    out, lse = _augmented_attention(qf, kf, valid, is_causal, scale, sink_keys)
    n = _valid_key_counts(valid, is_causal, (b, h, lq), lk, q.device)
    row_valid = n > 0 if query_valid is None else (n > 0) & query_valid.to(torch.bool)
    weights = _PositionWeights(qf, kf, lse, scale, is_causal, valid)
    entropy = (lse - scale * (qf * out[..., :d]).sum(-1)).clamp_min(0.0)
    compute = {
        "entropy": lambda: entropy,
        "normalized_entropy": lambda: _normalized_entropy_from(entropy, n),
        "effective_support": lambda: entropy.exp(),
        "sink_mass": lambda: out[..., d],
        "distance": lambda: weights.positions.float() - out[..., d + 1],
        "self_weight": lambda: weights.at(0),
        "prev_token_weight": lambda: weights.at(-1),
        "next_token_weight": lambda: weights.at(1),
    }
    values = {name: torch.where(row_valid, compute[name](), 0.0) for name in statistics if name in compute}
    return values, row_valid


def _augmented_attention(
    qf: Tensor, kf: Tensor, valid: Tensor | None, is_causal: bool, scale: float, sink_keys: Tensor
) -> tuple[Tensor, Tensor]:
    """One CPU flash-attention call with values ``[K | sink indicator | key position]``.

    Returns ``out [B, H, Lq, D + 2]`` (``A K``, sink mass, mean key position) and ``lse [B, H, Lq]``.
    The kernel needs equal head sizes: ``q`` and ``k`` get two zero columns (dot products unchanged).
    """
    b, lk = qf.shape[0], kf.shape[-2]
    additive = None
    if valid is not None:
        additive = torch.zeros(valid.shape, dtype=torch.float32, device=qf.device).masked_fill(~valid, -math.inf)
    positions = torch.arange(lk, device=qf.device, dtype=torch.float32).expand(b, lk)
    extra = torch.stack([sink_keys.to(qf.device, torch.float32).expand(b, lk), positions], -1)  # [B, Lk, 2]
    extra = extra.unsqueeze(1).expand(*kf.shape[:-1], 2)  # [B, H, Lk, 2]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        F.pad(qf, (0, 2)), F.pad(kf, (0, 2)), torch.cat([kf, extra], -1), 0.0, is_causal, attn_mask=additive, scale=scale
    )[:2]
    return out, lse


def _valid_key_counts(valid: Tensor | None, is_causal: bool, shape: tuple[int, int, int], lk: int, device: torch.device) -> Tensor:
    """``n_i``, the keys each row may attend, ``[B, H, Lq]`` float32."""
    rows = torch.arange(shape[-1], device=device)
    if is_causal:
        return (rows + 1).clamp_max(lk).float().expand(shape)  # top-left causal: keys j <= i
    if valid is not None:
        return valid.sum(-1, dtype=torch.float32).expand(shape)
    return torch.full(shape, float(lk), device=device)


class _PositionWeights:
    """``A[i, p_i + offset]`` from one dot product per row and the log-normaliser (bottom-right ``p_i``)."""

    def __init__(self, qf: Tensor, kf: Tensor, lse: Tensor, scale: float, is_causal: bool, valid: Tensor | None) -> None:
        self.qf, self.kf, self.lse, self.scale, self.is_causal, self.valid = qf, kf, lse, scale, is_causal, valid
        self.lq, self.lk = qf.shape[-2], kf.shape[-2]
        self.rows = torch.arange(self.lq, device=qf.device)
        self.positions = self.rows + (self.lk - self.lq)  # as the chunked path

    def at(self, offset: int) -> Tensor:
        """``[B, H, Lq]`` weight of the key ``offset`` positions from each query (0 where invalid)."""
        index = self.positions + offset
        exists = (index >= 0) & (index < self.lk)
        if self.is_causal:
            exists = exists & (index <= self.rows)
        index = index.clamp(0, self.lk - 1)
        logits = self.scale * (self.qf * self.kf[:, :, index]).sum(-1)  # [B, H, Lq]: q_i . k_{p_i + offset}
        if self.valid is not None:
            b = self.qf.shape[0]
            gather = index.view(1, 1, -1, 1).expand(b, self.valid.shape[1], self.lq, 1)
            exists = exists & self.valid.expand(b, -1, self.lq, self.lk).gather(-1, gather).squeeze(-1)
        return torch.where(exists, (logits - self.lse).exp(), 0.0)
