"""Structured option groups of :class:`attnmonitor.AttentionMonitor`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class HeatmapConfig:
    """Attention heatmaps of one example, every layer's heads tiled.

    Attributes:
        every_n_steps: training heatmaps every this many optimizer steps (a multiple of the
            monitor's ``every_n_steps`` is best); None for validation heatmaps only.
        max_tokens: largest number of tokens shown per side.
        layers: regexes (full match) selecting the layers drawn; None for all.
    """

    every_n_steps: int | None = 500
    max_tokens: int = 64
    layers: list[str] | None = None

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and not (isinstance(self.every_n_steps, int) and self.every_n_steps >= 1):
            raise ValueError(f"`heatmaps.every_n_steps` must be an int >= 1 or None, got {self.every_n_steps!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 2):
            raise ValueError(f"`heatmaps.max_tokens` must be an int >= 2, got {self.max_tokens!r}")
        if self.layers is not None:
            self.layers = list(self.layers)
            for pattern in self.layers:
                try:
                    re.compile(pattern)
                except (re.error, TypeError) as err:
                    raise ValueError(f"`heatmaps.layers` holds an invalid regex {pattern!r}: {err}") from err


def as_config(value: T | Mapping[str, Any] | None, cls: type[T], option: str) -> T | None:
    """Accept a dataclass instance, a mapping of its fields, or None.

    Raises:
        ValueError: on another type or an unknown key (the message lists the accepted keys).
    """
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        accepted = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(value) - set(accepted))
        if unknown:
            raise ValueError(f"`{option}` got unknown keys {unknown}; accepted keys are {accepted}")
        return cls(**dict(value))
    raise ValueError(f"`{option}` must be a {cls.__name__}, a mapping or None, got {type(value).__name__}")
