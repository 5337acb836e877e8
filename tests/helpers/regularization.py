"""Float64 references of the attention regularizer and clipping, written independently of attnmonitor."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tests.helpers.models import TinyTransformer

LAMBDA_H, TARGET, LAMBDA_S = 0.7, 0.3, 0.4
"""Entropy weight, entropy target (a fraction of ``log n_i``) and sparsity weight used by the tests."""


def reference_projection(row: list[float], lo: float, hi: float) -> list[float]:
    """Euclidean projection of one row onto {lo <= w <= hi, sum w = 1} by scanning the breakpoints."""
    n = len(row)
    if hi * n < 1 or lo * n > 1:
        return [1.0 / n] * n

    def total(tau: float) -> float:
        return sum(min(hi, max(lo, p - tau)) for p in row)

    points = sorted({p - lo for p in row} | {p - hi for p in row})
    for a, b in zip(points, points[1:], strict=False):  # consecutive breakpoints
        fa, fb = total(a), total(b)
        if fa >= 1 >= fb:
            tau = a if fa == fb else a + (fa - 1) / (fa - fb) * (b - a)
            return [min(hi, max(lo, p - tau)) for p in row]
    return [min(hi, max(lo, p - points[0])) for p in row]


def reference_terms(probs_list: list[Tensor], key_valid: Tensor, query_valid: Tensor) -> tuple[Tensor, Tensor]:
    """Mean over valid rows of all layers of (H_i - TARGET log n_i)^2 and of 1 - sum_j A_ij^2."""
    entropy_sum = sparsity_sum = 0.0
    rows_total = 0
    for probs in probs_list:
        kv = key_valid.expand_as(probs)
        p = probs.masked_fill(~kv, 0.0)
        h = -(p * torch.where(p > 0, p, torch.ones_like(p)).log()).sum(-1)
        log_n = kv.sum(-1).double().clamp_min(1).log()
        rows = kv.any(-1) & query_valid.expand_as(h)
        entropy_sum = entropy_sum + ((h - TARGET * log_n) ** 2)[rows].sum()
        sparsity_sum = sparsity_sum + (1 - (p**2).sum(-1))[rows].sum()
        rows_total += int(rows.sum())
    return entropy_sum / rows_total, sparsity_sum / rows_total


def assert_same_gradients(ours: nn.Module, ref: nn.Module) -> None:
    """Every parameter of ``ours`` has the gradient of its counterpart in ``ref`` (none where ``ref`` has none)."""
    checked = 0
    for (name, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        if b.grad is None:
            assert a.grad is None or not a.grad.any(), name
            continue
        assert a.grad is not None and torch.isfinite(a.grad).all(), name
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-12, msg=name)
        checked += 1
    assert checked > 0


def reference_forward(
    model: TinyTransformer, ids: Tensor, key_valid: Tensor, clip: tuple[float, float] | None = None
) -> tuple[Tensor, list[Tensor]]:
    """TinyTransformer's forward written out with explicit softmax attention; returns the weights used."""
    x = model.embed(ids)
    b, seq, c = x.shape
    probs_list = []
    for layer in model.layers:
        q, k = layer.qk(x)
        v = layer.v(x).view(b, seq, layer.kv_heads, layer.head_dim).transpose(1, 2)
        k, v = (t.repeat_interleave(layer.heads // layer.kv_heads, dim=1) for t in (k, v))
        scores = (q @ k.transpose(-1, -2)) * (layer.scale or 1 / math.sqrt(layer.head_dim))
        probs = scores.masked_fill(~key_valid, -math.inf).softmax(-1)
        if clip is not None:  # project each row over its valid keys; masked keys stay 0
            clipped = torch.zeros_like(probs)
            valid = key_valid.expand_as(probs)
            for index in torch.cartesian_prod(*(torch.arange(s) for s in probs.shape[:-1])).tolist():
                keys = valid[tuple(index)]
                row = reference_projection(probs[tuple(index)][keys].tolist(), *clip)
                clipped[tuple(index)][keys] = torch.tensor(row, dtype=probs.dtype)
            probs = clipped
        probs_list.append(probs)
        x = x + layer.o((probs @ v).transpose(1, 2).reshape(b, seq, c))
    return x, probs_list
