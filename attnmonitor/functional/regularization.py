"""Differentiable penalties on attention rows and exact clipping of attention weights.

Penalties are per valid query row (``[B, H, Lq]``); clipping is the Euclidean projection of each row
onto the capped simplex over its valid keys. Both compute in at least float32 (float64 inputs stay
float64) and keep values and gradients finite for masked, one-hot and fully masked rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnmonitor.functional.statistics import safe_entropy

_BISECTION_STEPS = 64


def _prepared(probs: Tensor, key_valid: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(p, valid keys, n_i)``: probabilities in >= float32, zero on invalid keys."""
    dtype = torch.promote_types(probs.dtype, torch.float32)
    valid = torch.ones_like(probs, dtype=torch.bool) if key_valid is None else key_valid.expand_as(probs)
    p = probs.to(dtype).masked_fill(~valid, 0.0)
    return p, valid, valid.sum(-1).to(dtype)


def row_entropy(probs: Tensor, key_valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(H_i [B, H, Lq], log n_i [B, H, Lq])`` with finite gradients (``0 log 0 = 0``, masked first)."""
    p, _, n = _prepared(probs, key_valid)
    return safe_entropy(p), n.clamp_min(1).log()


def entropy_penalty(probs: Tensor, key_valid: Tensor | None = None, *, target: float, relative: bool = True) -> Tensor:
    """Squared deviation of each row's entropy from a target: ``(H_i − t_i)^2``, ``[B, H, Lq]``.

    Args:
        probs: ``[B, H, Lq, Lk]`` attention probabilities.
        key_valid: bool, broadcastable to ``probs``.
        target: ``t_i = target · log n_i`` when ``relative`` (a fraction of the row's maximal
            entropy, so causal and padded rows get their own target), else ``target`` nats.
        relative: see ``target``.

    Example:
        >>> uniform = torch.full((1, 1, 1, 4), 0.25)
        >>> entropy_penalty(uniform, target=1.0)  # already at the maximal entropy
        tensor([[[0.]]])
    """
    entropy, log_n = row_entropy(probs, key_valid)
    goal = target * log_n if relative else torch.full_like(entropy, target)
    return (entropy - goal).square()


def sparsity_penalty(probs: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """Gini impurity of each row, ``1 − Σ_j A_ij²`` (``[B, H, Lq]``): 0 for one-hot, ``1 − 1/n`` uniform.

    Unlike ``mean(|w|)`` (a constant for softmax rows, zero gradient), its gradient ``−2 A_ij`` moves
    mass towards the already largest weights; unlike ``Σ √w`` it is smooth and bounded at ``w = 0``.

    Example:
        >>> sparsity_penalty(torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]]))
        tensor([[[0.0000, 0.5000]]])
    """
    p, _, _ = _prepared(probs, key_valid)
    return 1.0 - p.square().sum(-1)


def clip_attention(probs: Tensor, key_valid: Tensor | None = None, *, min: float = 0.0, max: float = 1.0) -> tuple[Tensor, Tensor]:
    """Project each row onto ``{min ≤ w_j ≤ max, Σ_j w_j = 1}`` over its valid keys (Euclidean, exact).

    The solution is ``w_j = clamp(p_j − τ, min, max)`` with ``τ`` such that the row sums to 1 (water
    filling). ``τ`` is located by bisection without gradient, then recomputed in closed form from the
    free (unclamped) keys so the result is differentiable: ``∂w/∂p`` is the projection's Jacobian.
    Invalid keys stay 0. When the row is infeasible (``max · n_i < 1`` or ``min · n_i > 1``) the
    result is uniform ``1 / n_i``, the nearest point of the nearest feasible set. Rows with no valid
    key are all zero.

    Args:
        probs: ``[..., Lk]`` probabilities (rows summing to 1 over valid keys).
        key_valid: bool, broadcastable to ``probs``.
        min: lower bound, ``0 ≤ min ≤ max``.
        max: upper bound, ``max ≤ 1``.

    Returns:
        ``(clipped [..., Lk] in probs' dtype, at_bound bool [..., Lk])``: ``at_bound`` marks valid
        keys held at ``min`` or ``max``.

    Raises:
        ValueError: unless ``0 ≤ min ≤ max ≤ 1``.

    Example:
        >>> w, at_bound = clip_attention(torch.tensor([0.99, 0.01]), max=0.8)
        >>> w, at_bound
        (tensor([0.8000, 0.2000]), tensor([ True, False]))
    """
    if not 0.0 <= min <= max <= 1.0:
        raise ValueError(f"clip bounds must satisfy 0 <= min <= max <= 1, got min={min}, max={max}")
    p, valid, n = _prepared(probs, key_valid)
    with torch.no_grad():
        tau = _water_level(p.detach().double(), valid, min, max)  # [..., 1]
        free = valid & (p.detach().double() - tau > min) & (p.detach().double() - tau < max)
        low = valid & ~free & (p.detach().double() - tau <= min)
        high = valid & ~free & ~low
    bounded = min * low.to(p.dtype) + max * high.to(p.dtype)
    n_free = free.sum(-1, keepdim=True).to(p.dtype)
    tau_exact = ((p * free).sum(-1, keepdim=True) + bounded.sum(-1, keepdim=True) - 1.0) / n_free.clamp_min(1)
    w = torch.where(free, p - tau_exact, bounded)
    uniform = valid / n.clamp_min(1).unsqueeze(-1)
    infeasible = ((max * n < 1.0) | (min * n > 1.0)).unsqueeze(-1)
    w = torch.where(infeasible, uniform, w)
    at_bound = (low | high) & ~infeasible
    return w.to(probs.dtype), at_bound


def _water_level(p: Tensor, valid: Tensor, lo: float, hi: float) -> Tensor:
    """``τ`` with ``Σ_valid clamp(p − τ, lo, hi) = 1`` by bisection (float64), ``[..., 1]``."""
    big = torch.finfo(p.dtype).max
    masked_min = p.masked_fill(~valid, big).amin(-1, keepdim=True).clamp_max(1.0)
    masked_max = p.masked_fill(~valid, -big).amax(-1, keepdim=True).clamp_min(0.0)
    left, right = masked_min - hi, masked_max - lo  # f(left) = n·hi >= 1 >= n·lo = f(right)
    for _ in range(_BISECTION_STEPS):
        mid = (left + right) / 2
        total = ((p - mid).clamp(lo, hi) * valid).sum(-1, keepdim=True)
        above = total > 1.0
        left = torch.where(above, mid, left)
        right = torch.where(above, right, mid)
    return (left + right) / 2
