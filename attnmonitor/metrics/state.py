"""The monitor's statistic state: one torchmetrics ``Metric`` of every statistic per (layer, head), and
:class:`StageStatistics`, which owns a stage's accumulator and its metric.

``sums [S, L, H]`` and ``counts [L, H]`` are reduced with ``"sum"`` across processes (exact under
DDP: sums and counts, never means of means); ``maxima [M, L, H]`` of the statistics reduced with max
(``max_logit``) with ``"max"``. Layers appear while the model runs (shared modules,
discovery by behaviour), so before a reduction the processes agree on the layer list and head counts
(:func:`gather_layers`).

Across processes, two ``all_reduce`` calls (sums and counts packed in one, maxima in the other): the
bytes each process sends and receives do not grow with the number of processes, where torchmetrics'
own sync gathers every process's states (``world_size ×`` the grid on every process; gigabytes at
10⁴ processes, see docs/scaling.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torchmetrics import Metric

from attnmonitor.capture.accumulator import StatisticsAccumulator
from attnmonitor.functional.statistics import OFFSET_WEIGHTS, POSITION_STATISTICS, max_from_maxima, mean_from_sums, split_statistics


class HeadStatisticGrid(Metric):
    """Sums of the averaged statistics, maxima of those reduced with max (``max_logit``), and valid-row
    counts per (layer, head).

    Args:
        statistics: the statistic names; the ``S`` averaged ones (in this order) are the rows of
            :attr:`sums`, the ``M`` reduced with max those of :attr:`maxima`.
        num_layers: ``L``. num_heads: ``H``.
        kwargs: passed to :class:`torchmetrics.Metric`.

    Example:
        >>> state = HeadStatisticGrid(["entropy", "sink_mass", "max_logit"], num_layers=1, num_heads=2)
        >>> state.update(torch.tensor([[[2.0, 4.0]], [[1.0, 0.5]]]), torch.tensor([[4.0, 2.0]]), torch.tensor([[[3.0, 7.5]]]))
        >>> state.compute()["entropy"], state.compute()["max_logit"]
        (tensor([[0.5000, 2.0000]]), tensor([[3.0000, 7.5000]]))
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    sums: Tensor
    counts: Tensor
    maxima: Tensor

    def __init__(self, statistics: Sequence[str], num_layers: int, num_heads: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.statistics = tuple(statistics)
        self.averaged, self.maxed = split_statistics(self.statistics)
        self.add_state("sums", torch.zeros(len(self.averaged), num_layers, num_heads), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(num_layers, num_heads), dist_reduce_fx="sum")
        self.add_state("maxima", torch.full((len(self.maxed), num_layers, num_heads), float("-inf")), dist_reduce_fx="max")

    def update(self, sums: Tensor, counts: Tensor, maxima: Tensor | None = None) -> None:
        """Add ``[S, L, H]`` per-head sums and their ``[L, H]`` valid-row counts; take the maximum with
        ``[M, L, H]`` per-head maxima (``-inf``: none)."""
        self.sums += sums.to(self.sums)
        self.counts += counts.to(self.counts)
        if maxima is not None:
            self.maxima = torch.maximum(self.maxima, maxima.to(self.maxima))

    def compute(self) -> dict[str, Tensor]:
        """``{statistic: [L, H]}`` means (0 where no row was seen: check :attr:`counts`), and maxima
        (NaN where none was seen)."""
        return self._values(self.sums, self.counts, self.maxima)

    def synced(self) -> tuple[dict[str, Tensor], Tensor]:
        """``({statistic: [L, H]} means and maxima, [L, H] counts)`` over every process (all must call it):
        one ``all_reduce`` of the packed sums and counts, one of the maxima."""
        packed = torch.cat([self.sums.flatten(), self.counts.flatten()])
        maxima = self.maxima.clone()
        if _distributed():
            dist.all_reduce(packed, dist.ReduceOp.SUM)
            if maxima.numel():
                dist.all_reduce(maxima, dist.ReduceOp.MAX)
        sums, counts = packed[: self.sums.numel()].view_as(self.sums), packed[self.sums.numel() :].view_as(self.counts)
        return self._values(sums, counts, maxima), counts

    def _values(self, sums: Tensor, counts: Tensor, maxima: Tensor) -> dict[str, Tensor]:
        values = {name: mean_from_sums(sums[i], counts) for i, name in enumerate(self.averaged)}
        values.update({name: max_from_maxima(maxima[i], counts) for i, name in enumerate(self.maxed)})
        return {name: values[name] for name in self.statistics}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_rank() -> int:
    """This process's rank in the default process group (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def gather_layers(local: Mapping[str, int], known: Sequence[str] = ()) -> dict[str, int]:
    """``{layer: heads}`` seen here and on every other process, in first-seen order after ``known``.

    One ``all_gather_object`` when a process group of several processes is initialised; every
    process must call it (a process that captured nothing passes an empty mapping).
    """
    merged = {layer: 0 for layer in known}
    parts: list[Mapping[str, int]] = [local]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, dict(local))
        parts = gathered
    return merge_layers(parts, merged)


def merge_layers(parts: Sequence[Mapping[str, int]], merged: dict[str, int]) -> dict[str, int]:
    """Every process's ``{layer: heads}`` merged into ``merged`` (the largest count of a layer), with a
    warning when processes disagree on a layer's (global) head count: tensor-parallel slices of
    unequal sizes, or a wrong ``capture.head_shard``, whose statistics would land on the wrong heads."""
    seen: dict[str, set[int]] = {}
    for part in parts:
        for layer, heads in part.items():
            merged[layer] = max(merged.get(layer, 0), heads)
            seen.setdefault(layer, set()).add(heads)
    disagreeing = {layer: sorted(counts) for layer, counts in seen.items() if len(counts) > 1}
    if disagreeing:
        warnings.warn(
            f"attnmonitor: processes report different head counts for {disagreeing}: their heads cannot be "
            "placed consistently (tensor-parallel slices must be equal; check `capture.head_shard`); the "
            "per-head statistics of these layers are not reliable.",
            RuntimeWarning,
            stacklevel=3,
        )
    return merged


class LayerAgreement:
    """Every process's ``{layer: heads}``, merged (:func:`gather_layers`), gathered again only when some
    process's layers or the known layers changed since the last call: otherwise one ``all_reduce`` of
    one number instead of an ``all_gather_object`` whose bytes grow with the number of processes.

    Every process must call it at the same points, as :func:`gather_layers`.
    """

    def __init__(self) -> None:
        self._seen: tuple[dict[str, int], tuple[str, ...]] | None = None  # this process's last (local, known)
        self._merged: dict[str, int] = {}

    def __call__(self, local: Mapping[str, int], known: Sequence[str], device: torch.device) -> dict[str, int]:
        seen = (dict(local), tuple(known))
        changed = torch.tensor([float(seen != self._seen)], device=device)
        if _distributed():
            dist.all_reduce(changed, dist.ReduceOp.MAX)
        if bool(changed.item()):
            self._merged = gather_layers(local, known)
        self._seen = seen
        return dict(self._merged)


@dataclass
class Synced:
    """A stage's statistics reduced over every process.

    Attributes:
        layers: layer names, rows of every grid; heads: ``{layer: H_l}``.
        values: ``{statistic: [L, H]}`` means (maxima for ``max_logit``), NaN where a layer does not
            define a statistic (position statistics of cross-attention) or where its mask makes it
            0 in every head (the next-token weight of causal attention).
        observed: bool ``[L, H]``, cells with at least one valid row.
    """

    layers: list[str]
    heads: dict[str, int]
    values: dict[str, Tensor]
    observed: Tensor


class StageStatistics:
    """The one owner of a stage's statistic state: the per-layer accumulator the capture fills, and the
    metric that reduces it across processes.

    Args:
        statistics: the statistic names accumulated.
    """

    def __init__(self, statistics: Sequence[str]) -> None:
        self.accumulator = StatisticsAccumulator(statistics)
        self._metric: HeadStatisticGrid | None = None  # reused while the layer grid keeps its shape
        self._layers = LayerAgreement()

    def sync(self, known_layers: Sequence[str], device: torch.device, cross_layers: Collection[str] = ()) -> Synced | None:
        """Reduce the accumulated statistics over every process (all must call it; layers in
        ``known_layers`` order, then new ones); None when no process captured anything."""
        accumulator = self.accumulator
        heads = self._layers(accumulator.heads(), known_layers, device)
        if not any(heads.values()):
            return None
        sums, counts = accumulator.grid(heads, device=device)
        metric = self._metric
        if metric is None or metric.counts.shape != counts.shape or metric.counts.device != counts.device:
            metric = self._metric = HeadStatisticGrid(accumulator.statistics, *counts.shape).to(device)
        metric.reset()
        metric.update(sums, counts, accumulator.max_grid(heads, device=device))
        values, rows = metric.synced()
        layers = list(heads)
        cross = torch.tensor([layer in cross_layers for layer in layers], device=rows.device)
        for name in POSITION_STATISTICS & set(values):  # not defined for cross-attention
            values[name] = values[name].masked_fill(cross.unsqueeze(1), float("nan"))
        observed = rows > 0
        for name in OFFSET_WEIGHTS & set(values):  # masked by construction: 0 in every row and head
            masked = ((values[name] == 0) | ~observed).all(1) & observed.any(1)
            values[name] = values[name].masked_fill(masked.unsqueeze(1), float("nan"))
        return Synced(layers, heads, values, observed)
