"""Per-layer sums of attention statistics, accumulated over captured calls."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnmonitor.functional.statistics import mean_from_sums


class StatisticsAccumulator:
    """Per-head sums and valid-row counts by layer, in the order layers were first seen.

    Args:
        statistics: the statistic names accumulated.
    """

    def __init__(self, statistics: Sequence[str]) -> None:
        self.statistics = tuple(statistics)
        self.reset()

    def reset(self) -> None:
        """Forget everything."""
        self.sums: dict[str, dict[str, Tensor]] = {}
        self.counts: dict[str, Tensor] = {}
        self.examples: dict[str, Tensor] = {}
        """``{layer: [H, T, T]}`` example probabilities, from the first call of each layer."""
        self.example_states: dict[str, dict[str, Tensor]] = {}
        """``{layer: {"inputs": [L, C], "outputs": [L, C], "values": [Hkv, L, Dv], "key_valid": [H, T, T],
        "start": [], "key_start": []}}`` of batch element 0 (what was available: values only from SDPA
        calls); the example's rows start at position ``start``, its keys at ``key_start``."""
        self.alignment: dict[str, Tensor] = {}
        """``{layer: [correct, total]}``: rows whose head-mean argmax is the ground-truth key."""

    def add_alignment(self, layer: str, correct_total: Tensor) -> None:
        self.alignment[layer] = correct_total + self.alignment.get(layer, 0)

    @property
    def layers(self) -> list[str]:
        return list(self.counts)

    def rename(self, old: str, new: str) -> None:
        """Rename layer ``old`` to ``new`` everywhere, keeping the order of layers."""
        for attribute in ("sums", "counts", "examples", "example_states", "alignment"):
            table = getattr(self, attribute)
            if old in table:
                setattr(self, attribute, {new if k == old else k: v for k, v in table.items()})

    def add(self, layer: str, sums: dict[str, Tensor], count: Tensor) -> str | None:
        """Add one call's ``{statistic: [H]}`` sums and ``[H]`` count; returns why not, or None."""
        if layer not in self.counts:
            self.sums[layer], self.counts[layer] = sums, count
            return None
        if self.counts[layer].shape != count.shape:
            return f"it has {count.numel()} heads, earlier calls had {self.counts[layer].numel()}"
        self.counts[layer] = self.counts[layer] + count
        for name, s in sums.items():
            self.sums[layer][name] = self.sums[layer][name] + s
        return None

    def layer_means(self) -> dict[str, dict[str, Tensor]]:
        """``{layer: {statistic: [H]}}`` means."""
        return {
            layer: {name: mean_from_sums(s, self.counts[layer]) for name, s in sums.items()}
            for layer, sums in self.sums.items()
        }

    def grid(
        self, layers: Sequence[str], heads: int | None = None, device: torch.device | None = None
    ) -> tuple[dict[str, Tensor], Tensor]:
        """``{statistic: [len(layers), H]}`` sums and ``[len(layers), H]`` counts, rows in ``layers`` order.

        Layers not seen (and heads a layer lacks) have count 0; ``H`` is ``heads`` or the largest
        head count seen. Works when nothing was seen if ``heads`` is given (a process that captured
        nothing still takes part in a distributed reduction).
        """
        if heads is None:
            heads = max(c.numel() for c in self.counts.values())
        if device is None:
            device = next(iter(self.counts.values())).device if self.counts else torch.device("cpu")
        counts = torch.zeros(len(layers), heads, device=device)
        sums = {name: torch.zeros(len(layers), heads, device=device) for name in self.statistics}
        for row, layer in enumerate(layers):
            if layer in self.counts:
                h = self.counts[layer].numel()
                counts[row, :h] = self.counts[layer]
                for name, value in self.sums[layer].items():  # a cross-attention layer lacks position statistics
                    sums[name][row, :h] = value
        return sums, counts
