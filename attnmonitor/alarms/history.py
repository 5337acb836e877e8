"""Each layer's recent captures, as the alarm rules read them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


class LayerHistory:
    """The ``{statistic: [H]}`` values of a layer's earlier captures, by optimizer step, oldest first."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.values: list[dict[str, Tensor]] = []

    def append(self, step: int, values: Mapping[str, Tensor], keep_steps: int) -> None:
        """Add a capture; forget those more than ``keep_steps`` steps older than it."""
        self.steps.append(step)
        self.values.append(dict(values))
        while self.steps[0] < step - keep_steps:
            del self.steps[0], self.values[0]

    def log_mean(self, statistic: str, start: float, end: float, now: Tensor | None = None) -> Tensor | None:
        """``[H]`` mean of ``log(statistic)`` over the captures with ``start < step <= end`` (and ``now``,
        this capture's values, if given); None without any."""
        kept = [values[statistic] for at, values in zip(self.steps, self.values, strict=False) if start < at <= end and statistic in values]
        if now is not None:
            kept.append(now)
        return torch.stack(kept).clamp(min=1e-30).log().nanmean(0) if kept else None

    def mean(self, statistic: str, since: int) -> Tensor | None:
        """``[H]`` mean of ``statistic`` over the captures at or after step ``since`` (NaN: never observed)."""
        kept = [values[statistic] for at, values in zip(self.steps, self.values, strict=False) if at >= since and statistic in values]
        return torch.stack(kept).nanmean(0) if kept else None

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "values": [{s: v.tolist() for s, v in values.items()} for values in self.values]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = [int(s) for s in state["steps"]]
        self.values = [{s: torch.tensor(v) for s, v in values.items()} for values in state["values"]]
