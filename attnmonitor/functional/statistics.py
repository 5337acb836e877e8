"""Per-row attention statistics from probabilities, and their per-head reduction.

Every statistic is defined per valid query row ``i`` of attention probabilities ``A`` of shape
``[B, H, Lq, Lk]`` whose row has ``n_i`` valid keys. Rows with no valid key, and rows
excluded by a query mask, are invalid: their value is 0 and they never enter a reduction.

All arithmetic is done in float32 whatever the input dtype; values and gradients are finite for
masked, one-hot and fully masked rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

POSITION_STATISTICS: frozenset[str] = frozenset({"distance", "self_weight", "prev_token_weight", "next_token_weight"})
"""Statistics that compare a query's position with its keys': defined for self-attention only."""

OFFSET_WEIGHTS: frozenset[str] = frozenset({"self_weight", "prev_token_weight", "next_token_weight"})
"""Weights on one key offset: exactly 0 in every row of every head of a layer only when a mask forbids
that offset (a causal mask, the next token), where they say nothing about the heads."""

STATISTICS: tuple[str, ...] = (
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
    "max_logit",
)
"""Names of every statistic, in the order they are reported."""

MAX_STATISTICS: frozenset[str] = frozenset({"max_logit"})
"""Statistics reduced with max (per head, over valid rows, micro-batches and processes), not averaged.

``max_logit`` is the largest pre-softmax score the softmax sees (``scale · q · kᵀ`` plus any additive
bias or score modification) over valid query rows and valid keys: it needs the logits, not the
probabilities (see :func:`logit_row_max` and :func:`head_max`)."""


def split_statistics(statistics: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(averaged, maxed)``: the statistics averaged over valid rows and those reduced with max
    (:data:`MAX_STATISTICS`), each in the order given."""
    return tuple(n for n in statistics if n not in MAX_STATISTICS), tuple(n for n in statistics if n in MAX_STATISTICS)


ROW_STATISTICS: tuple[str, ...] = split_statistics(STATISTICS)[0]
"""Statistics computed per row from probabilities and averaged over valid rows."""


def check_statistics(statistics: str | Sequence[str], *, option: str = "statistics") -> tuple[str, ...]:
    """Validate statistic names (one name or a sequence) and return them as a tuple.

    Raises:
        ValueError: if a name is unknown or the sequence is empty.
    """
    if isinstance(statistics, str):
        statistics = [statistics]
    if not isinstance(statistics, Sequence):
        raise ValueError(f"`{option}` must be a statistic name or a list of them, got {statistics!r}")
    if not statistics:
        raise ValueError(f"`{option}` is empty: name at least one of {list(STATISTICS)}")
    unknown = [s for s in statistics if s not in STATISTICS]
    if unknown:
        raise ValueError(f"`{option}` got unknown {unknown!r}; accepted names are {list(STATISTICS)}")
    return tuple(statistics)


@dataclass
class RowContext:
    """Probabilities prepared once for every statistic of a call.

    Args:
        probs: ``[B, H, Lq, Lk]`` attention probabilities (any float dtype).
        key_valid: bool, broadcastable to ``[B, H, Lq, Lk]``; True where the key may be attended.
        query_valid: bool, broadcastable to ``[B, H, Lq]``; False for padded query rows.
        query_positions: ``[Lq]`` position of each query row among the keys. Default: bottom-right
            alignment ``i + Lk - Lq`` (self-attention: ``i``; a KV cache: the last ``Lq`` keys).
        sink_tokens: number of leading keys whose mass is the sink mass.
        sink_keys: bool ``[B or 1, Lk]``: the sink keys of each sequence (overrides ``sink_tokens``;
            see :func:`attnmonitor.functional.masks.sink_keys`).
        sparsity_eps: a valid key is sparse when its weight is below ``sparsity_eps / n_i``.
        overwrite: ``probs`` may be modified in place (saves a full-size copy).
        masked: ``probs`` are already exactly 0 on invalid keys of rows that have a valid key (true of
            a softmax over masked logits): the masking pass is skipped.
    """

    probs: Tensor
    key_valid: Tensor | None = None
    query_valid: Tensor | None = None
    query_positions: Tensor | None = None
    sink_tokens: int = 1
    sparsity_eps: float = 0.1
    overwrite: bool = False
    masked: bool = False
    sink_keys: Tensor | None = None

    @cached_property
    def keys(self) -> Tensor:
        """Bool ``[B, H, Lq, Lk]``: valid keys."""
        if self.key_valid is None:
            return torch.ones_like(self.probs, dtype=torch.bool)
        return self.key_valid.expand_as(self.probs)

    @cached_property
    def p(self) -> Tensor:
        """Float32 probabilities, exactly 0 on invalid keys."""  # [B, H, Lq, Lk]
        p = self.probs.float()
        if self.key_valid is None or self.masked:
            return p
        if (p is self.probs and not self.overwrite) or p.requires_grad:
            return p.masked_fill(~self.keys, 0.0)
        return p.masked_fill_(~self.keys, 0.0)  # a float32 copy of ours, or overwritable: no second copy

    @cached_property
    def n(self) -> Tensor:
        """Number of valid keys per row, float32."""  # [B, H, Lq]
        if self.key_valid is None:
            return torch.full(self.probs.shape[:-1], float(self.probs.shape[-1]), device=self.probs.device)
        return self.key_valid.sum(-1, dtype=torch.float32).expand(self.probs.shape[:-1])  # before broadcasting

    @cached_property
    def valid(self) -> Tensor:
        """Bool ``[B, H, Lq]``: rows that count."""
        valid = self.n > 0
        if self.query_valid is not None:
            valid = valid & self.query_valid.to(torch.bool)
        return valid

    @cached_property
    def positions(self) -> Tensor:
        """``[Lq]`` (long) position of each query row in key coordinates."""
        lq, lk = self.probs.shape[-2:]
        if self.query_positions is not None:
            return self.query_positions.to(self.probs.device, torch.long)
        return torch.arange(lq, device=self.probs.device) + (lk - lq)

    def weight_at_offset(self, offset: int) -> Tensor:
        """``A[i, pos_i + offset]`` (0 where that key does not exist)."""  # [B, H, Lq]
        lk = self.probs.shape[-1]
        index = self.positions + offset  # [Lq]
        exists = (index >= 0) & (index < lk)
        index = index.clamp(0, lk - 1).view(1, 1, -1, 1).expand(*self.p.shape[:-1], 1)
        return self.p.gather(-1, index).squeeze(-1) * exists

    @cached_property
    def scratch(self) -> Tensor:
        """A ``[B, H, Lq, Lk]`` float32 buffer shared by the statistics that need one full-size
        temporary (a fresh large allocation per statistic costs page faults on CPU)."""
        return torch.empty_like(self.p)

    @cached_property
    def entropy(self) -> Tensor:
        return safe_entropy(self.p, out=None if self.p.requires_grad else self.scratch)  # [B, H, Lq]


def safe_entropy(p: Tensor, out: Tensor | None = None) -> Tensor:
    """``−Σ_j p_j log p_j`` over the last dim, ``0 · log 0 = 0``, with finite values and gradients.

    ``out``: a buffer shaped like ``p`` for the temporary ``p log p`` (no gradient then).

    Example:
        >>> safe_entropy(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
        tensor([0.0000, 0.6931])
    """
    if not (torch.is_grad_enabled() and p.requires_grad):
        # log of the smallest normal float instead of log(0): 0 · log(tiny) = 0, and CPU log (or xlogy)
        # at 0 and denormals is several times slower; for p < tiny the change is below p · 90
        terms = torch.clamp_min(p, torch.finfo(p.dtype).tiny, out=out).log_().mul_(p)
        return terms.sum(-1).neg_() + 0.0  # -0.0 -> 0.0
    safe = torch.where(p > 0, p, torch.ones_like(p))  # log(1) = 0: finite gradient (not NaN through where)
    return (p * safe.log()).sum(-1).neg() + 0.0


def _normalized_entropy_from(entropy: Tensor, n: Tensor) -> Tensor:
    """``H_i / log n_i``, 0 where ``n_i <= 1`` (a single key has zero entropy by definition)."""
    return torch.where(n > 1, entropy / n.clamp_min(2).log(), torch.zeros_like(entropy))


def _normalized_entropy(ctx: RowContext) -> Tensor:
    return _normalized_entropy_from(ctx.entropy, ctx.n)


def _sparsity(ctx: RowContext) -> Tensor:
    threshold = ctx.sparsity_eps / ctx.n.clamp_min(1)  # [B, H, Lq]
    below = torch.lt(ctx.p, threshold.unsqueeze(-1), out=ctx.scratch).sum(-1)  # invalid keys (p = 0) too
    invalid = ctx.probs.shape[-1] - ctx.n
    return (below - invalid) / ctx.n.clamp_min(1)


def _distance(ctx: RowContext) -> Tensor:
    lk = ctx.probs.shape[-1]
    keys = torch.arange(lk, device=ctx.p.device)
    if ctx.key_valid is not None and ctx.key_valid.dim() <= 2 and not (ctx.key_valid & (keys > ctx.positions.unsqueeze(-1))).any():
        # every valid key is at or before the query (causal): sum_j A_ij (p_i - j) = p_i sum_j A_ij - A_i . j,
        # one GEMM with two columns (rows of low-precision probabilities do not sum to exactly 1)
        mass, moment = (ctx.p @ torch.stack([torch.ones(lk, device=keys.device), keys.float()], -1)).unbind(-1)
        return ctx.positions.float() * mass - moment
    gap = (ctx.positions.unsqueeze(-1) - keys).abs().float()  # [Lq, Lk]
    return (ctx.p * gap).sum(-1)


_ROW_FUNCTIONS = {
    "entropy": lambda ctx: ctx.entropy,
    "normalized_entropy": _normalized_entropy,
    "max_weight": lambda ctx: ctx.p.amax(-1),
    "sparsity": _sparsity,
    "effective_support": lambda ctx: ctx.entropy.exp() * (ctx.n > 0),
    "distance": _distance,
    "self_weight": lambda ctx: ctx.weight_at_offset(0),
    "prev_token_weight": lambda ctx: ctx.weight_at_offset(-1),
    "next_token_weight": lambda ctx: ctx.weight_at_offset(1),
    "sink_mass": lambda ctx: _sink_mass(ctx),
}


KEY_ADDITIVE_STATISTICS: tuple[str, ...] = ("entropy", "distance", "self_weight", "prev_token_weight", "next_token_weight", "sink_mass")
"""Sums over keys: with probabilities normalised over all of a row's keys, a row's value is the sum of
its values over disjoint blocks of keys (how key shards of context parallelism are merged)."""


def key_additive_values(ctx: RowContext, names: Sequence[str]) -> dict[str, Tensor]:
    """``{name: [B, H, Lq]}`` of :data:`KEY_ADDITIVE_STATISTICS` over the keys of ``ctx`` (its invalid
    rows are not zeroed: they hold the sums of their zero probabilities)."""
    return {name: _ROW_FUNCTIONS[name](ctx).expand(ctx.probs.shape[:-1]) for name in names}


def _sink_mass(ctx: RowContext) -> Tensor:
    if ctx.sink_keys is None:
        return ctx.p[..., : ctx.sink_tokens].sum(-1)
    b, lk = ctx.sink_keys.shape
    sinks = ctx.sink_keys.to(ctx.p.device, ctx.p.dtype).view(b, 1, lk, 1)
    return (ctx.p @ sinks).squeeze(-1)  # [B, H, Lq]


_FUSED = frozenset({"entropy", "normalized_entropy", "max_weight", "sparsity", "effective_support", "distance", "sink_mass"})
"""Statistics the one-pass kernel (:mod:`attnmonitor.functional.row_kernel`) gives."""


def _fused_values(ctx: RowContext, names: Sequence[str]) -> dict[str, Tensor]:
    """``{name: [B, H, Lq]}`` of the requested statistics the compiled one-pass kernel gives, or {} where
    it is not used (see :func:`~attnmonitor.functional.row_kernel.fused_reductions`)."""
    if not _FUSED.intersection(names):
        return {}
    from attnmonitor.functional.row_kernel import fused_reductions

    n = ctx.n
    reductions = fused_reductions(ctx.p, ctx.positions.float(), ctx.sparsity_eps / n.clamp_min(1), ctx.sink_tokens)
    if reductions is None:
        return {}
    entropy, largest, below, distance, sink = reductions
    values = {
        "entropy": entropy,
        "normalized_entropy": _normalized_entropy_from(entropy, n),
        "max_weight": largest,
        "sparsity": (below - (ctx.probs.shape[-1] - n)) / n.clamp_min(1),
        "effective_support": entropy.exp() * (n > 0),
        "distance": distance,
    }
    if ctx.sink_keys is None:  # per-sequence sinks (packed documents) stay on the eager path
        values["sink_mass"] = sink
    return values


def row_statistics(
    probs: Tensor,
    key_valid: Tensor | None = None,
    query_valid: Tensor | None = None,
    *,
    statistics: Sequence[str] = ROW_STATISTICS,
    query_positions: Tensor | None = None,
    sink_tokens: int = 1,
    sparsity_eps: float = 0.1,
    overwrite: bool = False,
    masked: bool = False,
    sink_keys: Tensor | None = None,
) -> tuple[dict[str, Tensor], Tensor]:
    """Every requested statistic for every query row.

    Args:
        probs: ``[B, H, Lq, Lk]`` attention probabilities.
        key_valid: bool, broadcastable to ``[B, H, Lq, Lk]``; True where a key may be attended.
        query_valid: bool, broadcastable to ``[B, H, Lq]``; False for padded query rows.
        statistics: names from :data:`ROW_STATISTICS` (``max_logit`` needs the logits: see
            :func:`logit_row_max`).
        query_positions: ``[Lq]`` key position of each query row (default ``i + Lk - Lq``).
        sink_tokens: leading keys counted by ``sink_mass``.
        sparsity_eps: threshold factor of ``sparsity`` (weight ``< eps / n_i``).
        overwrite: ``probs`` may be modified in place (saves memory on long sequences).
        masked: ``probs`` are already 0 on invalid keys of rows with a valid key (skips a pass).
        sink_keys: bool ``[B or 1, Lk]`` sink keys of each sequence (default: the first ``sink_tokens``).

    Returns:
        ``({name: [B, H, Lq] float32}, valid [B, H, Lq] bool)``; invalid rows hold 0.

    Raises:
        ValueError: for an unknown name, or a statistic that needs the logits (``max_logit``).

    Example:
        >>> probs = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]]]])  # [1, 1, 2, 2]
        >>> values, valid = row_statistics(probs, statistics=["entropy", "self_weight"])
        >>> values["entropy"]
        tensor([[[0.0000, 0.6931]]])
        >>> values["self_weight"]
        tensor([[[1.0000, 0.5000]]])
    """
    check_statistics(statistics)
    from_logits = sorted(set(statistics) & MAX_STATISTICS)
    if from_logits:
        raise ValueError(f"{from_logits} need the logits, not probabilities: use `logit_row_max` and `head_max`")
    if probs.dim() != 4:
        raise ValueError(f"`probs` must have shape [B, H, Lq, Lk], got {tuple(probs.shape)}")
    with torch.autocast(probs.device.type, enabled=False):  # float32 at least, even under autocast
        ctx = RowContext(probs, key_valid, query_valid, query_positions, sink_tokens, sparsity_eps, overwrite, masked, sink_keys)
        valid = ctx.valid
        names = list(statistics)
        fused = _fused_values(ctx, names)
        rows = torch.stack(
            [(fused[name] if name in fused else _ROW_FUNCTIONS[name](ctx)).expand(valid.shape) for name in names]
        )  # [S, B, H, Lq]
    return dict(zip(names, torch.where(valid, rows, 0.0).unbind(0), strict=True)), valid


def head_sums(values: dict[str, Tensor], valid: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Sum each statistic over batch and valid rows, per head.

    Args:
        values: ``{name: [B, H, Lq]}`` as returned by :func:`row_statistics`.
        valid: bool ``[B, H, Lq]``.

    Returns:
        ``({name: [H] float32 sum}, [H] float32 count of valid rows)``.
    """
    count = valid.sum(dim=(0, 2), dtype=torch.float32)
    if not values:
        return {}, count
    stacked = torch.stack([v.expand(valid.shape) for v in values.values()])  # [S, B, H, Lq]: one pass for all
    sums = torch.where(valid, stacked, 0.0).sum(dim=(1, 3), dtype=torch.float32)  # [S, H]
    return dict(zip(values, sums.unbind(0), strict=True)), count


def attention_statistics(
    probs: Tensor,
    key_valid: Tensor | None = None,
    query_valid: Tensor | None = None,
    **kwargs: object,
) -> dict[str, Tensor]:
    """Per-head means over valid rows: ``{name: [H]}`` (0 for a head with no valid row).

    Takes the arguments of :func:`row_statistics`.

    Example:
        >>> probs = torch.full((2, 3, 4, 4), 0.25)  # uniform attention
        >>> stats = attention_statistics(probs, statistics=["normalized_entropy", "sink_mass"])
        >>> stats["normalized_entropy"], stats["sink_mass"]
        (tensor([1., 1., 1.]), tensor([0.2500, 0.2500, 0.2500]))
    """
    sums, count = head_sums(*row_statistics(probs, key_valid, query_valid, **kwargs))  # type: ignore[arg-type]
    return {name: mean_from_sums(s, count) for name, s in sums.items()}


def mean_from_sums(sums: Tensor, counts: Tensor) -> Tensor:
    """``sums / counts`` where ``counts > 0``, else 0 (never NaN)."""
    return sums / counts.clamp_min(1)


def logit_row_max(logits: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """Largest logit of each row over its valid keys, float32; ``-inf`` for a row with no valid key.

    Args:
        logits: ``[..., Lk]`` what the softmax sees (scaled scores plus biases or score modifications).
        key_valid: bool, broadcastable to ``logits``; None: the keys that are not masked out of the
            softmax input (``-inf`` or ``<= finfo.min / 2``, as an additive mask leaves them).

    NaN logits give a NaN maximum (non-finite attention is detected, not hidden).

    Example:
        >>> logit_row_max(torch.tensor([[1.0, 3.0, float("-inf")], [float("-inf")] * 3]))
        tensor([3., -inf])
        >>> logit_row_max(torch.tensor([[1.0, 3.0]]), torch.tensor([True, False]))
        tensor([1.])
    """
    if key_valid is not None:
        logits = logits.masked_fill(~key_valid, float("-inf"))
    row_max = logits.amax(-1)
    blocked = torch.finfo(logits.dtype).min / 2 if logits.is_floating_point() else float("-inf")
    return row_max.float().masked_fill(row_max <= blocked, float("-inf"))


def head_max(row_max: Tensor, query_valid: Tensor | None = None) -> Tensor:
    """Per-head maximum ``[H]`` of row maxima ``[B, H, Lq]`` over valid query rows (``-inf``: none).

    Args:
        row_max: from :func:`logit_row_max` (``-inf`` for rows with no valid key).
        query_valid: bool, broadcastable to ``row_max``; False for padded query rows.

    Example:
        >>> head_max(torch.tensor([[[1.0, 5.0], [2.0, float("-inf")]]]), torch.tensor([[[True, False]]]))
        tensor([1., 2.])
    """
    if query_valid is not None:
        row_max = row_max.masked_fill(~query_valid.to(torch.bool), float("-inf"))
    return row_max.amax(dim=(0, 2))


def max_row_counts(row_max: Tensor, query_valid: Tensor | None = None) -> Tensor:
    """``[H]`` float32 number of valid rows (a valid key, and ``query_valid``) of row maxima ``[B, H, Lq]``.

    A NaN row counts (its NaN reaches the maximum, which is then detected as non-finite).
    """
    valid = row_max != float("-inf")
    if query_valid is not None:
        valid = valid & query_valid.to(torch.bool)
    return valid.sum(dim=(0, 2), dtype=torch.float32)


def max_from_maxima(maxima: Tensor, counts: Tensor | None = None) -> Tensor:
    """Maxima where a value was seen, else NaN (``-inf``, "no value", never leaves; nor does a maximum
    of cells that ``counts`` says saw no row)."""
    unseen = maxima == float("-inf")
    if counts is not None:
        unseen = unseen | (counts <= 0)
    return maxima.masked_fill(unseen, float("nan"))


__all__ = [
    "KEY_ADDITIVE_STATISTICS",
    "MAX_STATISTICS",
    "OFFSET_WEIGHTS",
    "POSITION_STATISTICS",
    "ROW_STATISTICS",
    "STATISTICS",
    "RowContext",
    "attention_statistics",
    "check_statistics",
    "head_max",
    "head_sums",
    "key_additive_values",
    "logit_row_max",
    "max_from_maxima",
    "max_row_counts",
    "mean_from_sums",
    "row_statistics",
    "safe_entropy",
    "split_statistics",
]
