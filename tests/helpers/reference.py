"""Naive float64 references, written independently of attnmonitor: explicit loops over rows."""

from __future__ import annotations

import math

import torch
from torch import Tensor

NAMES = (
    "entropy",
    "normalized_entropy",
    "max_weight",
    "sparsity",
    "effective_support",
    "distance",
    "self_weight",
    "prev_token_weight",
    "next_token_weight",
    "sink_mass",
)


def attention_probs(q: Tensor, k: Tensor, key_valid: Tensor, scale: float | None = None, bias: Tensor | None = None) -> Tensor:
    """Float64 softmax attention ``[B, H, Lq, Lk]``; ``key_valid`` (bool, broadcastable) blocks keys.

    ``k`` may have fewer heads (grouped-query attention); rows with no valid key are all zero.
    """
    q, k = q.double(), k.double()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        logits = logits + bias.double()
    valid = key_valid.expand_as(logits)
    logits = logits.masked_fill(~valid, -math.inf)
    probs = torch.zeros_like(logits)
    rows = valid.any(-1)
    probs[rows] = logits[rows].softmax(-1)
    return probs


def head_max_logit(
    q: Tensor,
    k: Tensor,
    key_valid: Tensor,
    query_valid: Tensor | None = None,
    scale: float | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """Float64 ``[H]`` ``max_logit``: per head, the largest ``scale · q · kᵀ (+ bias)`` over valid query
    rows (``query_valid`` broadcastable to ``[B, H, Lq]``) and valid keys; NaN for a head with none.

    ``k`` may have fewer heads (grouped-query attention).
    """
    q, k = q.detach().double(), k.detach().double()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale  # [B, H, Lq, Lk]
    if bias is not None:
        logits = logits + bias.double()
    valid = key_valid.expand_as(logits)
    if query_valid is not None:
        valid = valid & query_valid.expand(logits.shape[:-1]).unsqueeze(-1)
    best = logits.masked_fill(~valid, -math.inf).amax(dim=(0, 2, 3))
    return best.masked_fill(best == -math.inf, math.nan)


def row_values(row: list[float], valid: list[bool], pos: int, sink: int, eps: float) -> dict[str, float]:
    """Every statistic of one query row at key position ``pos``."""
    keys = [j for j, v in enumerate(valid) if v]
    n = len(keys)
    w = {j: row[j] for j in keys}
    h = -sum(a * math.log(a) for a in w.values() if a > 0)
    return {
        "entropy": h,
        "normalized_entropy": h / math.log(n) if n > 1 else 0.0,
        "max_weight": max(w.values()),
        "sparsity": sum(1 for a in w.values() if a < eps / n) / n,
        "effective_support": math.exp(h),
        "distance": sum(a * abs(pos - j) for j, a in w.items()),
        "self_weight": w.get(pos, 0.0),
        "prev_token_weight": w.get(pos - 1, 0.0),
        "next_token_weight": w.get(pos + 1, 0.0),
        "sink_mass": sum(a for j, a in w.items() if j < sink),
    }


def head_means(
    probs: Tensor,
    key_valid: Tensor | None = None,
    query_valid: Tensor | None = None,
    sink: int = 1,
    eps: float = 0.1,
) -> dict[str, Tensor]:
    """Per-head float64 means ``{name: [H]}`` over valid rows of ``probs`` ``[B, H, Lq, Lk]``."""
    b, h, lq, lk = probs.shape
    kv = torch.ones(b, h, lq, lk, dtype=torch.bool) if key_valid is None else key_valid.expand(b, h, lq, lk)
    qv = torch.ones(b, h, lq, dtype=torch.bool) if query_valid is None else query_valid.expand(b, h, lq)
    p = probs.double().tolist()
    sums = {name: [0.0] * h for name in NAMES}
    counts = [0] * h
    for bi in range(b):
        for hi in range(h):
            for i in range(lq):
                valid = kv[bi, hi, i].tolist()
                if not qv[bi, hi, i] or not any(valid):
                    continue
                counts[hi] += 1
                for name, value in row_values(p[bi][hi][i], valid, i + lk - lq, sink, eps).items():
                    sums[name][hi] += value
    return {name: torch.tensor([s / max(c, 1) for s, c in zip(sums[name], counts, strict=True)], dtype=torch.float64) for name in NAMES}


def assert_stats_close(actual: dict[str, Tensor], expected: dict[str, Tensor], rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every statistic in ``actual`` equals ``expected`` within tolerance."""
    assert set(actual) == set(expected), (set(actual), set(expected))
    for name in expected:
        torch.testing.assert_close(actual[name].double().cpu(), expected[name].double(), rtol=rtol, atol=atol, msg=name)


def logged(expected: dict[str, Tensor]) -> dict[str, Tensor]:
    """The statistics of a float64 reference that the monitor logs: all but the offset weights that
    are 0 in every head (a mask forbids that key, as causal attention the next token)."""
    from attnmonitor.functional import OFFSET_WEIGHTS

    return {name: values for name, values in expected.items() if name not in OFFSET_WEIGHTS or values.any()}
