"""Structured option groups of :class:`attnmonitor.AttentionMonitor`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
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
        self.layers = _check_layers("heatmaps.layers", self.layers)


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


def _check_layers(option: str, layers: list[str] | None) -> list[str] | None:
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = [layers]
    for pattern in layers:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"`{option}` holds an invalid regex {pattern!r}: {err}") from err
    return list(layers)


@dataclass
class RegularizerConfig:
    """Attention penalty added to the training loss: ``λ_H · R_H + λ_S · R_S``.

    ``R_H`` is the mean over valid query rows of ``(H_i − t_i)^2``; ``R_S`` the mean Gini impurity
    ``1 − Σ_j A_ij^2`` (see :mod:`attnmonitor.functional.steering`).

    Attributes:
        entropy_weight: ``λ_H >= 0`` (0 disables the entropy term).
        entropy_target: target entropy, a fraction of ``log n_i`` in [0, 1] (``target_unit="fraction"``)
            or nats (``"nats"``).
        target_unit: ``"fraction"`` or ``"nats"``.
        sparsity_weight: ``λ_S >= 0`` (0 disables the sparsity term).
        layers: regexes (full match) of the layers regularized; None for all.
        warmup_steps: the weights ramp linearly from 0 over this many optimizer steps.
    """

    entropy_weight: float = 0.0
    entropy_target: float = 0.5
    target_unit: str = "fraction"
    sparsity_weight: float = 0.0
    layers: list[str] | None = None
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("entropy_weight", "sparsity_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"`regularizer.{name}` must be a number >= 0, got {value!r}")
        if self.target_unit not in ("fraction", "nats"):
            raise ValueError(f"`regularizer.target_unit` must be 'fraction' or 'nats', got {self.target_unit!r}")
        upper = 1.0 if self.target_unit == "fraction" else float("inf")
        if not (isinstance(self.entropy_target, (int, float)) and 0 <= self.entropy_target <= upper):
            raise ValueError(
                f"`regularizer.entropy_target` must be in [0, {upper}] for target_unit={self.target_unit!r}, "
                f"got {self.entropy_target!r}"
            )
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"`regularizer.warmup_steps` must be an int >= 0, got {self.warmup_steps!r}")
        self.layers = _check_layers("regularizer.layers", self.layers)

    @property
    def enabled(self) -> bool:
        return self.entropy_weight > 0 or self.sparsity_weight > 0


@dataclass
class ClipConfig:
    """Exact clipping of attention weights to ``[min, max]`` (rows still sum to 1), inside the forward.

    The default bounds ``[0, 1]`` clip nothing (clipping is off).

    Attributes:
        min: lower bound, ``0 <= min <= max``.
        max: upper bound, ``<= 1``.
        training_only: clip only modules in training mode (False: also in eval/inference).
        layers: regexes (full match) of the layers clipped; None for all.
    """

    min: float = 0.0
    max: float = 1.0
    training_only: bool = True
    layers: list[str] | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.min, (int, float)) and isinstance(self.max, (int, float)) and 0 <= self.min <= self.max <= 1):
            raise ValueError(f"`clip` needs 0 <= min <= max <= 1, got min={self.min!r}, max={self.max!r}")
        self.layers = _check_layers("clip.layers", self.layers)

    @property
    def enabled(self) -> bool:
        return self.min > 0 or self.max < 1


@dataclass
class AttentionMonitorConfig:
    """Structured Hydra config of :class:`attnmonitor.AttentionMonitor`: one field per argument.

    Registered in Hydra's ConfigStore as ``attnmonitor/attention_monitor`` (see :func:`register_configs`)
    so that a misspelt key or a wrong type fails when the configuration is composed.
    """

    _target_: str = "attnmonitor.AttentionMonitor"
    targets: Any = "auto"
    statistics: list[str] = field(default_factory=lambda: list(_statistics()))
    every_n_steps: int = 50
    per_head: bool = False
    heatmaps: HeatmapConfig = field(default_factory=HeatmapConfig)
    decoder: Any = None
    val_batches: int = 1
    atlas_every_n_steps: int = 500
    input_key: str = "input_ids"
    query_mask_key: str | None = None
    decoder_input_key: str = "decoder_input_ids"
    memory_budget_mb: float = 256.0
    sink_tokens: int = 1
    sparsity_eps: float = 0.1
    sample_rows: int | None = None
    pool_shared: bool = False
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    analyses: bool = True
    alignment_key: str = "alignments"
    top_k: int = 5
    token_classes: dict[str, list[str]] | None = None


def _statistics() -> tuple[str, ...]:
    from attnmonitor.functional.statistics import STATISTICS

    return STATISTICS


def register_configs() -> None:
    """Register the structured configs in Hydra's ConfigStore (group ``attnmonitor``)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="attnmonitor", name="attention_monitor", node=AttentionMonitorConfig)
    store.store(group="attnmonitor", name="heatmaps", node=HeatmapConfig)
    store.store(group="attnmonitor", name="regularizer", node=RegularizerConfig)
    store.store(group="attnmonitor", name="clip", node=ClipConfig)
