"""The monitor's options as dataclasses (checked at construction), their Hydra registration, and the
option checks shared by every component.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
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
    ``1 − Σ_j A_ij^2`` (see :mod:`attnmonitor.functional.regularization`).

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


ALARM_ACTIONS = ("warn", "checkpoint", "stop")


def _check_rule(rule: str, window: Any, warmup: Any, action: Any) -> None:
    check_int(f"alarms.{rule}.window", window, 1)
    check_int(f"alarms.{rule}.warmup", warmup, 1)
    if warmup > window:
        raise ValueError(f"`alarms.{rule}.warmup` ({warmup}) must be <= its `window` ({window}): the history holds `window` captures")
    if not (callable(action) or action in ALARM_ACTIONS):
        raise ValueError(f"`alarms.{rule}.action` must be one of {list(ALARM_ACTIONS)} or a callable, got {action!r}")


def _check_number(option: str, value: Any, low: float, high: float = float("inf"), optional: bool = False) -> None:
    if value is None and optional:
        return
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high):
        raise ValueError(f"`{option}` must be a number in [{low}, {high}]{' or None' if optional else ''}, got {value!r}")


@dataclass
class EntropyCollapseConfig:
    """Fires for a head whose normalised entropy falls below ``(1 − drop)`` × its mean over the last
    ``window`` captures, by at least ``min_drop``, while its ``max_logit`` is above ``logit_floor``.

    Attributes:
        drop: relative fall, in (0, 1).
        min_drop: smallest absolute fall (normalised entropy is in [0, 1]).
        logit_floor: the head's ``max_logit`` must also exceed this; None: entropy alone. A head that
            learns a sharp pattern sharpens with moderate logits (the ``reverse`` preset's
            cross-attention falls from 0.99 to 0.06 with ``max_logit`` below 23), a runaway collapse
            with growing ones (``experiment=unstable``: above 100 within 30 steps).
        window: captures of history; warmup: captures needed before it may fire.
        action: ``"warn"``, ``"checkpoint"`` (save one at that step), ``"stop"`` (save, then stop
            training cleanly), or a callable receiving the list of firings.
    """

    drop: float = 0.5
    min_drop: float = 0.1
    logit_floor: float | None = 30.0
    window: int = 10
    warmup: int = 5
    action: Any = "warn"

    def __post_init__(self) -> None:
        _check_number("alarms.entropy_collapse.drop", self.drop, 0.0, 1.0)
        _check_number("alarms.entropy_collapse.min_drop", self.min_drop, 0.0, 1.0)
        _check_number("alarms.entropy_collapse.logit_floor", self.logit_floor, float("-inf"), optional=True)
        _check_rule("entropy_collapse", self.window, self.warmup, self.action)


@dataclass
class LogitGrowthConfig:
    """Fires for a head whose ``max_logit`` exceeds ``ceiling``, or exceeds ``rate`` × its minimum over
    the last ``window`` captures while above ``floor``.

    Attributes:
        ceiling: absolute limit (Kimi K2's QK-Clip caps logits at 100); None: no ceiling.
        rate: growth factor over the window; None: no growth rule.
        floor: the growth rule applies above this value (small logits double harmlessly: in the
            800-step demo run every head stays below 24, while a run whose attention collapses
            passes 400 within 20 steps).
        window, warmup, action: as :class:`EntropyCollapseConfig`.
    """

    ceiling: float | None = 100.0
    rate: float | None = 2.0
    floor: float = 30.0
    window: int = 10
    warmup: int = 5
    action: Any = "warn"

    def __post_init__(self) -> None:
        _check_number("alarms.logit_growth.ceiling", self.ceiling, 0.0, optional=True)
        _check_number("alarms.logit_growth.rate", self.rate, 1.0, optional=True)
        _check_number("alarms.logit_growth.floor", self.floor, 0.0)
        _check_rule("logit_growth", self.window, self.warmup, self.action)


@dataclass
class SinkJumpConfig:
    """Fires for a head whose ``sink_mass`` moves by more than ``jump`` from its mean over the last
    ``window`` captures.

    Attributes:
        jump: absolute change, in (0, 1].
        window, warmup, action: as :class:`EntropyCollapseConfig`.
    """

    jump: float = 0.3
    window: int = 10
    warmup: int = 5
    action: Any = "warn"

    def __post_init__(self) -> None:
        _check_number("alarms.sink_jump.jump", self.jump, 0.0, 1.0)
        _check_rule("sink_jump", self.window, self.warmup, self.action)


@dataclass
class AlarmsConfig:
    """Training-health alarms over the per-head statistics of training captures (see
    :mod:`attnmonitor.alarms`); a rule set to None is off.

    Attributes:
        entropy_collapse: :class:`EntropyCollapseConfig` (or mapping).
        logit_growth: :class:`LogitGrowthConfig` (or mapping); needs ``max_logit`` among the statistics.
        sink_jump: :class:`SinkJumpConfig` (or mapping).
        every_n_steps: extra captures for the alarms alone, of only the statistics the rules read
            (fused path where possible, nothing logged but the alarms); None: the alarms look at the
            monitor's regular captures only.
    """

    entropy_collapse: EntropyCollapseConfig | None = field(default_factory=EntropyCollapseConfig)
    logit_growth: LogitGrowthConfig | None = field(default_factory=LogitGrowthConfig)
    sink_jump: SinkJumpConfig | None = field(default_factory=SinkJumpConfig)
    every_n_steps: int | None = None

    def __post_init__(self) -> None:
        self.entropy_collapse = as_config(self.entropy_collapse, EntropyCollapseConfig, "alarms.entropy_collapse")
        self.logit_growth = as_config(self.logit_growth, LogitGrowthConfig, "alarms.logit_growth")
        self.sink_jump = as_config(self.sink_jump, SinkJumpConfig, "alarms.sink_jump")
        if self.every_n_steps is not None:
            check_int("alarms.every_n_steps", self.every_n_steps, 1)


def _is_rows(value: Any) -> bool:
    """A slice, a range, a tensor or a ``[start, stop]`` pair of ints."""
    if isinstance(value, (slice, range)) or hasattr(value, "long"):
        return True
    return isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


@dataclass
class QKClipConfig:
    """QK-clip (Kimi K2): after every optimizer step, each head whose ``max_logit`` of that step exceeded
    ``tau`` has its query and key projections multiplied by ``√(tau / max_logit)`` (see
    :mod:`attnmonitor.interventions.qk_clip`). Every training step is then captured for ``max_logit``.

    Attributes:
        tau: the largest logit allowed, > 0 (Kimi K2 uses 100); None: QK-clip is off.
        projections: ``{qualified name of a fused projection: [query rows, key rows]}`` for layouts not
            recognised (each a ``[start, stop]`` pair, a slice or a tensor of row indices, head by head
            along the output features); empty: recognised layouts only.
        layers: regexes (full match) of the layers clipped; None for all.
    """

    tau: float | None = None
    projections: dict[str, Any] = field(default_factory=dict)
    layers: list[str] | None = None

    def __post_init__(self) -> None:
        _check_number("qk_clip.tau", self.tau, 0.0, optional=True)
        if self.tau is not None and self.tau <= 0:
            raise ValueError(f"`qk_clip.tau` must be > 0, got {self.tau!r}")
        if self.projections is None:
            self.projections = {}
        else:
            if not (isinstance(self.projections, Mapping) and all(isinstance(k, str) for k in self.projections)):
                raise ValueError(f"`qk_clip.projections` must map module names to [query rows, key rows], got {self.projections!r}")
            for name, rows in self.projections.items():
                if isinstance(rows, str) or not isinstance(rows, Sequence) or len(rows) != 2 or not all(map(_is_rows, rows)):
                    raise ValueError(
                        f"`qk_clip.projections['{name}']` must be [query rows, key rows], each a [start, stop] pair, a slice, "
                        f"a range or a tensor of row indices, got {rows!r}"
                    )
            self.projections = {name: tuple(rows) for name, rows in self.projections.items()}
        self.layers = _check_layers("qk_clip.layers", self.layers)


@dataclass
class MonitorOptions:
    """Every option of the attention monitor, checked at once; shared by every training-loop adapter.

    Attributes:
        targets: attention modules: ``"auto"``, regexes fully matching module names, or a predicate
            ``(name, module) -> bool``.
        statistics: names from :data:`attnmonitor.STATISTICS`.
        every_n_steps: training capture interval in optimizer steps (all micro-batches of a step).
        per_head: also log one scalar per head.
        heatmaps: :class:`HeatmapConfig` (or a mapping of its fields); None disables heatmaps.
        tokenizer: ids -> token strings for labels: a tokenizer (``convert_ids_to_tokens``) or a callable.
        val_batches: validation batches captured per validation run (0 disables).
        atlas_every_n_steps: training interval of head atlases, histograms and the table.
        input_key: batch key (mapping batches) of the token ids; tuple batches use item 0.
        query_mask_key: None: padding from each attention call's own mask; or a batch key of a
            ``[B, L]`` mask (1 = real token) also applied to self-attention rows, for single-sequence
            models whose attention does not mask padding.
        decoder_input_key: batch key of the decoder's ids, labelling cross-attention queries.
        memory_budget_mb: largest probability chunk materialised per attention call.
        sink_tokens: keys counted by ``sink_mass``, from the first real token of each sequence.
        sparsity_eps: a key is sparse when its weight is below ``sparsity_eps / n_i``.
        sample_rows: evaluate at most this many random query rows per call on the chunked path.
        pool_shared: one layer for a module called several times per forward (not ``name#i``).
        regularizer: :class:`RegularizerConfig` (or mapping): entropy/sparsity penalty on the loss.
        clip: :class:`ClipConfig` (or mapping): exact clipping of the attention weights.
        analyses: run the example analyses whenever atlases are drawn.
        alignment_key: batch key of ``[B, Lq]`` ground-truth key positions (negative: none).
        top_k: keys listed per query in the interpretation table.
        token_classes: ``{class: [tokens]}`` for attention shares (default: function vs content words).
        alarms: :class:`AlarmsConfig` (or mapping): per-head training-health alarms; None: off.
        qk_clip: :class:`QKClipConfig` (or mapping, e.g. ``{"tau": 100}``): rescale the query and key
            projections of heads whose ``max_logit`` exceeds ``tau`` after each optimizer step; None
            (or ``tau`` None): off.

    Raises:
        ValueError: naming the first invalid option, the accepted values and the value received.
    """

    targets: Any = "auto"
    statistics: list[str] = field(default_factory=lambda: list(_statistics()))
    every_n_steps: int = 50
    per_head: bool = False
    heatmaps: HeatmapConfig | None = field(default_factory=HeatmapConfig)
    tokenizer: Any = None
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
    regularizer: RegularizerConfig | None = field(default_factory=RegularizerConfig)
    clip: ClipConfig | None = field(default_factory=ClipConfig)
    analyses: bool = True
    alignment_key: str = "alignments"
    top_k: int = 5
    token_classes: dict[str, list[str]] | None = None
    alarms: AlarmsConfig | None = None
    qk_clip: QKClipConfig | None = None

    def __post_init__(self) -> None:
        from attnmonitor.functional.statistics import check_statistics

        self.statistics = list(check_statistics(self.statistics))
        for name, minimum in (("every_n_steps", 1), ("val_batches", 0), ("atlas_every_n_steps", 1), ("top_k", 1)):
            check_int(name, getattr(self, name), minimum)
        for name in ("per_head", "pool_shared", "analyses"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be a bool, got {getattr(self, name)!r}")
        for name in ("input_key", "decoder_input_key", "alignment_key"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"`{name}` must be a string (a batch key), got {getattr(self, name)!r}")
        if self.query_mask_key is not None and not isinstance(self.query_mask_key, str):
            raise ValueError(f"`query_mask_key` must be a string or None, got {self.query_mask_key!r}")
        tokenizer = self.tokenizer
        if tokenizer is not None and not (callable(tokenizer) or hasattr(tokenizer, "convert_ids_to_tokens")):
            raise ValueError(f"`tokenizer` must be a tokenizer or a callable ids -> strings, got {type(tokenizer).__name__}")
        check_capture_options(self.memory_budget_mb, self.sink_tokens, self.sparsity_eps, self.sample_rows)
        self.heatmaps = as_config(self.heatmaps, HeatmapConfig, "heatmaps")
        self.regularizer = as_config(self.regularizer, RegularizerConfig, "regularizer")
        self.clip = as_config(self.clip, ClipConfig, "clip")
        self.token_classes = _check_token_classes(self.token_classes)
        self.alarms = as_config(self.alarms, AlarmsConfig, "alarms")
        if self.alarms is not None:
            from attnmonitor.alarms import rule_statistics

            for rule, statistics in rule_statistics(self.alarms).items():
                for statistic in statistics:
                    if statistic not in self.statistics:
                        raise ValueError(
                            f"`alarms.{rule}` reads the statistic {statistic!r}, which is not among `statistics` {self.statistics}: "
                            f"add it, or set `alarms.{rule}` to None"
                        )
        self.qk_clip = as_config(self.qk_clip, QKClipConfig, "qk_clip")
        if self.qk_clip is not None and self.qk_clip.tau is None:
            self.qk_clip = None  # off
        if self.qk_clip is not None and "max_logit" not in self.statistics:
            raise ValueError(f"`qk_clip` reads the statistic 'max_logit', which is not among `statistics` {self.statistics}: add it")


    def loggable(self) -> dict[str, Any]:
        """The options as plain values for a logger's hyperparameters (callables by their names)."""

        def plain(value: Any) -> Any:
            if value is None or isinstance(value, (bool, int, float, str)):
                return value
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            if isinstance(value, Mapping):
                return {str(k): plain(v) for k, v in value.items()}
            if hasattr(value, "__dataclass_fields__"):
                return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
            return getattr(value, "__qualname__", type(value).__name__)

        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}


@dataclass
class AttentionMonitorConfig(MonitorOptions):
    """Structured Hydra config of :class:`attnmonitor.AttentionMonitor`: :class:`MonitorOptions` and
    its ``_target_``.

    Registered in Hydra's ConfigStore as ``attnmonitor/attention_monitor`` (see :func:`register_configs`)
    so that a misspelt key or a wrong type fails when the configuration is composed.
    """

    _target_: str = "attnmonitor.AttentionMonitor"


def as_options(options: MonitorOptions | None, overrides: Mapping[str, Any]) -> MonitorOptions:
    """``options`` (or the defaults) with ``overrides`` set, checked.

    Raises:
        ValueError: on an unknown option (the message lists the accepted ones) or an invalid value.
    """
    if options is not None and not isinstance(options, MonitorOptions):
        raise ValueError(f"`options` must be a MonitorOptions or None, got {type(options).__name__}")
    accepted = [f.name for f in fields(MonitorOptions)]
    unknown = sorted(set(overrides) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; accepted options are {accepted}")
    base = {} if options is None else {f.name: getattr(options, f.name) for f in fields(MonitorOptions)}
    return MonitorOptions(**{**base, **overrides})


def check_int(option: str, value: Any, minimum: int) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) ``>= minimum``."""
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"`{option}` must be an int >= {minimum}, got {value!r}")


def check_capture_options(memory_budget_mb: Any, sink_tokens: Any, sparsity_eps: Any, sample_rows: Any = None) -> None:
    """Raise ``ValueError`` naming the first invalid option of a capture."""
    if sample_rows is not None and not (isinstance(sample_rows, int) and not isinstance(sample_rows, bool) and sample_rows >= 1):
        raise ValueError(f"`sample_rows` must be an int >= 1 or None, got {sample_rows!r}")
    if not (isinstance(memory_budget_mb, (int, float)) and not isinstance(memory_budget_mb, bool) and memory_budget_mb > 0):
        raise ValueError(f"`memory_budget_mb` must be > 0, got {memory_budget_mb!r}")
    check_int("sink_tokens", sink_tokens, 1)
    if not (isinstance(sparsity_eps, (int, float)) and 0 < sparsity_eps <= 1):
        raise ValueError(f"`sparsity_eps` must be in (0, 1], got {sparsity_eps!r}")


def layer_selected(layer: str, patterns: Sequence[str] | None) -> bool:
    """Whether a layer (``name``, or a shared module's ``name#i``) is selected by regexes fully
    matching its module name (None selects every layer)."""
    return patterns is None or any(re.fullmatch(p, layer.split("#")[0]) for p in patterns)


def _check_token_classes(classes: Any) -> dict[str, list[str]] | None:
    if classes is None:
        return None
    if not (isinstance(classes, Mapping) and classes) or not all(
        isinstance(v, Sequence) and not isinstance(v, str) for v in classes.values()
    ):
        raise ValueError(f"`token_classes` must be a non-empty mapping class -> list of tokens, got {classes!r}")
    return {str(k): [str(t) for t in v] for k, v in classes.items()}


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
    store.store(group="attnmonitor", name="alarms", node=AlarmsConfig)
    store.store(group="attnmonitor", name="qk_clip", node=QKClipConfig)
