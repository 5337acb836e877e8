"""Per-layer sums of attention statistics over captured calls, and each layer's example."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnmonitor.functional.statistics import max_from_maxima, mean_from_sums, split_statistics


@dataclass
class Example:
    """Batch element 0 of a layer's first captured call since :meth:`StatisticsAccumulator.reset`.

    Attributes:
        probs: ``[H, T, T]`` probabilities from row ``start`` and key ``key_start`` (left padding
            skipped); None until the call's attention was captured.
        key_valid: bool ``[H, T, T]``.
        start: position of the first row in its sequence (for token labels).
        key_start: position of the first key in its sequence.
        inputs: ``[L, C]`` the module's input states; outputs: ``[L, C]`` its output states.
        values: ``[Hkv, Lk, Dv]`` SDPA values (None for eager softmax attention).
    """

    probs: Tensor | None = None
    key_valid: Tensor | None = None
    start: int = 0
    key_start: int = 0
    inputs: Tensor | None = None
    outputs: Tensor | None = None
    values: Tensor | None = None


class StatisticsAccumulator:
    """Per-head sums, maxima (statistics reduced with max: ``max_logit``) and valid-row counts by
    layer, in the order layers were first seen.

    Args:
        statistics: the statistic names accumulated.
    """

    def __init__(self, statistics: Sequence[str]) -> None:
        self.statistics = tuple(statistics)
        self.averaged, self.maxed = split_statistics(self.statistics)
        """Statistics averaged over valid rows (the rows of :meth:`grid`), and those reduced with max
        (the rows of :meth:`max_grid`)."""
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        self.sums: dict[str, dict[str, Tensor]] = {}
        self.maxima: dict[str, dict[str, Tensor]] = {}
        """``{layer: {statistic: [H]}}`` running maxima (``-inf``: no value yet)."""
        self.counts: dict[str, Tensor] = {}
        self.examples: dict[str, Example] = {}
        """``{layer: Example}`` (see :class:`Example`)."""
        self.alignment: dict[str, Tensor] = {}
        """``{layer: [correct, total]}``: rows whose head-mean argmax is the ground-truth key."""
        self.placement: dict[str, tuple[int, int]] = {}
        """``{layer: (first global head, global heads)}`` of layers whose heads are split over processes
        (tensor parallelism, see :mod:`attnmonitor.capture.sharding`); other layers hold every head."""

    def add_alignment(self, layer: str, correct_total: Tensor) -> None:
        self.alignment[layer] = correct_total + self.alignment.get(layer, 0)

    def place(self, layer: str, placement: tuple[int, int] | None) -> None:
        """Record that ``layer``'s heads here start at global head ``placement[0]`` of ``placement[1]`` (None: all here)."""
        if placement is not None:
            self.placement[layer] = placement

    @property
    def layers(self) -> list[str]:
        return list(self.counts)

    def heads(self) -> dict[str, int]:
        """``{layer: number of heads}`` (global heads of a layer whose heads are split over processes)."""
        return {layer: self.placement[layer][1] if layer in self.placement else count.numel() for layer, count in self.counts.items()}

    def rename(self, old: str, new: str) -> None:
        """Rename layer ``old`` to ``new`` everywhere, keeping the order of layers."""
        for attribute in ("sums", "maxima", "counts", "examples", "alignment", "placement"):
            table = getattr(self, attribute)
            if old in table:
                setattr(self, attribute, {new if k == old else k: v for k, v in table.items()})

    def add(self, layer: str, sums: dict[str, Tensor], count: Tensor, maxima: dict[str, Tensor] | None = None) -> str | None:
        """Add one call's ``{statistic: [H]}`` sums, ``[H]`` count and ``{statistic: [H]}`` maxima
        (``-inf``: no value); returns why not, or None."""
        if layer in self.counts and self.counts[layer].shape != count.shape:
            return f"it has {count.numel()} heads, earlier calls had {self.counts[layer].numel()}"
        layer_maxima = self.maxima.setdefault(layer, {})
        for name, m in (maxima or {}).items():
            layer_maxima[name] = torch.maximum(layer_maxima[name], m) if name in layer_maxima else m
        if layer not in self.counts:
            self.sums[layer], self.counts[layer] = dict(sums), count
            return None
        self.counts[layer] = self.counts[layer] + count
        for name, s in sums.items():
            self.sums[layer][name] = self.sums[layer][name] + s if name in self.sums[layer] else s
        return None

    def layer_means(self) -> dict[str, dict[str, Tensor]]:
        """``{layer: {statistic: [H]}}`` means, and maxima of the statistics reduced with max (NaN for a
        head with no value: a call whose logits were unknown)."""
        return {
            layer: {
                **{name: mean_from_sums(s, self.counts[layer]) for name, s in sums.items()},
                **{name: max_from_maxima(m, self.counts[layer]) for name, m in self.maxima.get(layer, {}).items()},
            }
            for layer, sums in self.sums.items()
        }

    def grid(self, heads: dict[str, int], device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """``[S, L, H]`` sums of the averaged statistics (:attr:`averaged`) and ``[L, H]`` counts, rows
        in the order of ``heads`` (``{layer: H_l}``).

        Layers not seen here (and heads a layer lacks) have count 0, so a process that captured
        nothing still takes part in a distributed reduction with the right shapes.
        """
        width = max(heads.values(), default=0)
        sums = torch.zeros(len(self.averaged), len(heads), width, device=device)
        counts = torch.zeros(len(heads), width, device=device)
        for row, layer in enumerate(heads):
            if layer in self.counts:
                first = self.placement.get(layer, (0, 0))[0]
                columns = slice(first, first + self.counts[layer].numel())  # the layer's heads held here, by global index
                counts[row, columns] = self.counts[layer]
                for index, name in enumerate(self.averaged):
                    if name in self.sums[layer]:  # a cross-attention layer lacks position statistics
                        sums[index, row, columns] = self.sums[layer][name]
        return sums, counts

    def max_grid(self, heads: dict[str, int], device: torch.device | None = None) -> Tensor:
        """``[M, L, H]`` maxima of the statistics reduced with max (:attr:`maxed`), ``-inf`` where
        nothing was seen (layers and heads as :meth:`grid`)."""
        width = max(heads.values(), default=0)
        maxima = torch.full((len(self.maxed), len(heads), width), float("-inf"), device=device)
        for row, layer in enumerate(heads):
            for index, name in enumerate(self.maxed):
                m = self.maxima.get(layer, {}).get(name)
                if m is not None:
                    first = self.placement.get(layer, (0, 0))[0]
                    maxima[index, row, first : first + m.numel()] = m
        return maxima
