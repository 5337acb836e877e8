"""The monitor's options: one group per concern (capture, schedule, batch keys, dashboards, the
interventions, alarms), each a dataclass checked at construction; their Hydra registration.

``None`` turns an optional group off everywhere (``heatmaps``, ``regularizer``, ``clip``, ``qk_clip``,
``alarms`` and each alarm rule). A group given with values that do nothing (a regularizer whose
weights are 0, clipping bounds ``[0, 1]``, ``qk_clip.tau`` None: what the Hydra YAML lists, so that
``regularizer.entropy_weight=0.1`` can be overridden on the command line) becomes None. The flat
keyword names of earlier releases (``every_n_steps=10``) still work, with a ``FutureWarning`` that
names their new place (``schedule.every_n_steps``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from attnmonitor.alarms import AlarmsConfig, EntropyCollapseConfig, LogitGrowthConfig, SinkJumpConfig
from attnmonitor.checks import as_config, check_bool, check_int, check_layers, check_number

__all__ = [
    "AlarmsConfig",
    "AttentionMonitorConfig",
    "BatchKeys",
    "CaptureConfig",
    "ClipConfig",
    "DashboardConfig",
    "EntropyCollapseConfig",
    "HeatmapConfig",
    "LogitGrowthConfig",
    "MonitorOptions",
    "QKClipConfig",
    "RegularizerConfig",
    "ScheduleConfig",
    "SinkJumpConfig",
    "as_options",
    "register_configs",
]


def _statistics() -> list[str]:
    from attnmonitor.functional.statistics import STATISTICS

    return list(STATISTICS)


@dataclass
class CaptureConfig:
    """What is captured and how (the keyword arguments of :class:`attnmonitor.AttentionCapture`).

    Attributes:
        targets: attention modules: ``"auto"``, regexes fully matching module names, or a predicate
            ``(name, module) -> bool``.
        statistics: names from :data:`attnmonitor.STATISTICS`.
        memory_budget_mb: largest probability chunk materialised per attention call.
        sink_tokens: keys counted by ``sink_mass``, from the first real token of each sequence.
        sparsity_eps: a key is sparse when its weight is below ``sparsity_eps / n_i``.
        sample_rows: evaluate at most this many random query rows per call on the chunked path.
        pool_shared: one layer for a module called several times per forward (not ``name#i``).
        head_shard: ``[index, count]`` for tensor parallelism without DTensor (Megatron-style column-parallel
            query/key/value): this process computes the ``index``-th of ``count`` equal slices of every
            attention layer's heads, in order. None: read from DTensor parameters, or every head is here.
        context_parallel: how each process's positions map to the sequence under context parallelism
            (``"contiguous"`` or ``"head_tail"``, see :mod:`attnmonitor.capture.context_parallel`): keys are
            gathered over ``context_parallel_group`` on captured calls. None: every process holds whole sequences.
        context_parallel_group: the context-parallel process group or 1-D ``DeviceMesh`` (Python only;
            None: every process).
    """

    targets: Any = "auto"
    statistics: Any = field(default_factory=_statistics)  # a name or a list (Any: Hydra takes `statistics=entropy` too)
    memory_budget_mb: float = 256.0
    sink_tokens: int = 1
    sparsity_eps: float = 0.1
    sample_rows: int | None = None
    pool_shared: bool = False
    head_shard: list[int] | None = None
    context_parallel: str | None = None
    context_parallel_group: Any = None

    def __post_init__(self) -> None:
        from attnmonitor.functional.statistics import check_statistics

        targets = self.targets
        if isinstance(targets, str) and targets != "auto":
            check_layers("capture.targets", targets)  # a regex: compiled now, not at the first forward
        elif isinstance(targets, Sequence) and not isinstance(targets, str) and all(isinstance(t, str) for t in targets):
            self.targets = check_layers("capture.targets", targets)
        elif not (targets == "auto" or callable(targets)):
            accepted = '"auto", a regex, a list of regexes or a predicate (name, module) -> bool'
            raise ValueError(f"`capture.targets` must be {accepted}, got {targets!r}")
        self.statistics = list(check_statistics(self.statistics, option="capture.statistics"))
        check_number("capture.memory_budget_mb", self.memory_budget_mb, 0.0)
        if self.memory_budget_mb <= 0:
            raise ValueError(f"`capture.memory_budget_mb` must be > 0, got {self.memory_budget_mb!r}")
        check_int("capture.sink_tokens", self.sink_tokens, 1)
        eps = self.sparsity_eps
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps <= 1):
            raise ValueError(f"`capture.sparsity_eps` must be in (0, 1], got {eps!r}")
        check_int("capture.sample_rows", self.sample_rows, 1, optional=True)
        check_bool("capture.pool_shared", self.pool_shared)
        if self.head_shard is not None:
            shard = self.head_shard
            if not (
                isinstance(shard, (list, tuple)) and len(shard) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
            ):
                raise ValueError(f"`capture.head_shard` must be [index, count] (two ints) or None, got {shard!r}")
            if not 0 <= shard[0] < shard[1]:
                raise ValueError(f"`capture.head_shard` needs 0 <= index < count, got {list(shard)}")
            self.head_shard = list(shard)
        from attnmonitor.capture.context_parallel import LAYOUTS

        if self.context_parallel is not None and self.context_parallel not in LAYOUTS:
            raise ValueError(f"`capture.context_parallel` must be one of {list(LAYOUTS)} or None, got {self.context_parallel!r}")


@dataclass
class ScheduleConfig:
    """When the monitor captures (optimizer steps; see :mod:`attnmonitor.schedule`).

    Attributes:
        every_n_steps: training capture interval (all micro-batches of a step).
        atlas_every_n_steps: training interval of head atlases, histograms and the per-head table.
        val_batches: validation batches captured per validation run (0 disables).
    """

    every_n_steps: int = 50
    atlas_every_n_steps: int = 500
    val_batches: int = 1

    def __post_init__(self) -> None:
        check_int("schedule.every_n_steps", self.every_n_steps, 1)
        check_int("schedule.atlas_every_n_steps", self.atlas_every_n_steps, 1)
        check_int("schedule.val_batches", self.val_batches, 0)


@dataclass
class BatchKeys:
    """Where the monitor finds things in a mapping batch.

    Attributes:
        input_key: the token ids (heatmap labels); tuple batches use item 0.
        query_mask_key: None: padding from each attention call's own mask; or the key of a ``[B, L]``
            mask (1 = real token) also applied to self-attention rows, for single-sequence models whose
            attention does not mask padding.
        decoder_input_key: the decoder's ids, labelling cross-attention queries.
        alignment_key: ``[B, Lq]`` ground-truth key positions (negative: none), for alignment accuracy.
    """

    input_key: str = "input_ids"
    query_mask_key: str | None = None
    decoder_input_key: str = "decoder_input_ids"
    alignment_key: str = "alignments"

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            optional = f.name == "query_mask_key"
            if not (isinstance(value, str) or (value is None and optional)):
                raise ValueError(f"`batch.{f.name}` must be a string (a batch key){' or None' if optional else ''}, got {value!r}")


@dataclass
class HeatmapConfig:
    """Attention heatmaps of one example: an image per head of every layer drawn.

    Attributes:
        every_n_steps: training heatmaps every this many optimizer steps (a multiple of the
            monitor's ``every_n_steps`` is best); None for validation heatmaps only.
        max_tokens: largest number of tokens shown per side, each labelled (up to 24 the image fits a
            card of TensorBoard's Images tab at its own size; more need its "actual size" toggle).
        layers: regexes (full match) selecting the layers drawn; None for all.
    """

    every_n_steps: int | None = 500
    max_tokens: int = 24
    layers: Any = None  # a regex or a list of them (Any: Hydra takes `layers=blocks\.0\..*` too)

    def __post_init__(self) -> None:
        if self.every_n_steps is not None and not (isinstance(self.every_n_steps, int) and self.every_n_steps >= 1):
            raise ValueError(f"`heatmaps.every_n_steps` must be an int >= 1 or None, got {self.every_n_steps!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 2):
            raise ValueError(f"`heatmaps.max_tokens` must be an int >= 2, got {self.max_tokens!r}")
        self.layers = check_layers("heatmaps.layers", self.layers)


@dataclass
class DashboardConfig:
    """What is drawn besides the scalars.

    Attributes:
        per_head: also log one scalar per head.
        heatmaps: :class:`HeatmapConfig` (or a mapping of its fields); None: no heatmaps.
        tokenizer: ids -> token strings for labels: a tokenizer (``convert_ids_to_tokens``) or a callable.
        analyses: run the example analyses whenever atlases are drawn.
        top_k: keys listed per query in the interpretation table.
        token_classes: ``{class: [tokens]}`` for attention shares (default: function vs content words).
    """

    per_head: bool = False
    heatmaps: HeatmapConfig | None = field(default_factory=HeatmapConfig)
    tokenizer: Any = None
    analyses: bool = True
    top_k: int = 5
    token_classes: dict[str, list[str]] | None = None

    def __post_init__(self) -> None:
        check_bool("dashboards.per_head", self.per_head)
        check_bool("dashboards.analyses", self.analyses)
        check_int("dashboards.top_k", self.top_k, 1)
        tokenizer = self.tokenizer
        if tokenizer is not None and not (callable(tokenizer) or hasattr(tokenizer, "convert_ids_to_tokens")):
            raise ValueError(f"`dashboards.tokenizer` must be a tokenizer or a callable ids -> strings, got {type(tokenizer).__name__}")
        self.heatmaps = as_config(self.heatmaps, HeatmapConfig, "dashboards.heatmaps")
        self.token_classes = _check_token_classes(self.token_classes)


@dataclass
class RegularizerConfig:
    """Attention penalty added to the training loss: ``λ_H · R_H + λ_S · R_S``.

    ``R_H`` is the mean over valid query rows of ``(H_i − t_i)^2``; ``R_S`` the mean Gini impurity
    ``1 − Σ_j A_ij^2`` (see :mod:`attnmonitor.functional.regularization`).

    The penalty is off when the monitor's ``regularizer`` is None (a weight of 0 turns its term off).

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
    layers: Any = None  # a regex or a list of them (Any: Hydra takes `layers=blocks\.0\..*` too)
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
                f"`regularizer.entropy_target` must be in [0, {upper}] for target_unit={self.target_unit!r}, got {self.entropy_target!r}"
            )
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 0):
            raise ValueError(f"`regularizer.warmup_steps` must be an int >= 0, got {self.warmup_steps!r}")
        self.layers = check_layers("regularizer.layers", self.layers)

    @property
    def enabled(self) -> bool:
        return self.entropy_weight > 0 or self.sparsity_weight > 0


@dataclass
class ClipConfig:
    """Exact clipping of attention weights to ``[min, max]`` (rows still sum to 1), inside the forward.

    Clipping is off when the monitor's ``clip`` is None (bounds ``[0, 1]`` clip nothing either).

    Attributes:
        min: lower bound, ``0 <= min <= max``.
        max: upper bound, ``<= 1``.
        training_only: clip only modules in training mode (False: also in eval/inference).
        layers: regexes (full match) of the layers clipped; None for all.
    """

    min: float = 0.0
    max: float = 1.0
    training_only: bool = True
    layers: Any = None  # a regex or a list of them (Any: Hydra takes `layers=blocks\.0\..*` too)

    def __post_init__(self) -> None:
        if not (isinstance(self.min, (int, float)) and isinstance(self.max, (int, float)) and 0 <= self.min <= self.max <= 1):
            raise ValueError(f"`clip` needs 0 <= min <= max <= 1, got min={self.min!r}, max={self.max!r}")
        self.layers = check_layers("clip.layers", self.layers)

    @property
    def enabled(self) -> bool:
        return self.min > 0 or self.max < 1


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
    QK-clip is off when the monitor's ``qk_clip`` is None.

    Attributes:
        tau: the largest logit allowed, > 0 (Kimi K2 uses 100); None: off.
        projections: ``{qualified name of a fused projection: [query rows, key rows]}`` for layouts not
            recognised (each a ``[start, stop]`` pair, a slice or a tensor of row indices, head by head
            along the output features); empty: recognised layouts only.
        layers: regexes (full match) of the layers clipped; None for all.
    """

    tau: float | None = 100.0
    projections: dict[str, Any] = field(default_factory=dict)
    layers: Any = None  # a regex or a list of them (Any: Hydra takes `layers=blocks\.0\..*` too)

    def __post_init__(self) -> None:
        check_number("qk_clip.tau", self.tau, 0.0, optional=True, above_low=True)
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
        self.layers = check_layers("qk_clip.layers", self.layers)


GROUPS: dict[str, type] = {
    "capture": CaptureConfig,
    "schedule": ScheduleConfig,
    "batch": BatchKeys,
    "dashboards": DashboardConfig,
    "regularizer": RegularizerConfig,
    "clip": ClipConfig,
    "qk_clip": QKClipConfig,
    "alarms": AlarmsConfig,
}
"""The option groups, in :class:`MonitorOptions` order."""

FLAT_NAMES = {f.name: group for group in ("capture", "schedule", "batch", "dashboards") for f in fields(GROUPS[group])}
"""``{flat option name of earlier releases: its group}``."""


@dataclass
class MonitorOptions:
    """Every option of the attention monitor, by group, checked at once; shared by every adapter.

    Attributes:
        capture: :class:`CaptureConfig`: targets, statistics, memory budget, sinks, sparsity, sampling.
        schedule: :class:`ScheduleConfig`: capture, atlas and validation intervals.
        batch: :class:`BatchKeys`: batch keys of ids, masks, decoder ids and alignments.
        dashboards: :class:`DashboardConfig`: per-head scalars, heatmaps, tokenizer, analyses.
        regularizer: :class:`RegularizerConfig`: entropy/sparsity penalty on the loss; None: off.
        clip: :class:`ClipConfig`: exact clipping of the attention weights; None: off.
        qk_clip: :class:`QKClipConfig` (e.g. ``{"tau": 100}``): rescale the query and key projections
            of heads whose ``max_logit`` exceeds ``tau`` after each optimizer step; None: off.
        alarms: :class:`AlarmsConfig`: per-head training-health alarms; None: off.

    Each group also takes a mapping of its fields.

    Raises:
        ValueError: naming the first invalid option, the accepted values and the value received.

    Example:
        >>> options = MonitorOptions(schedule={"every_n_steps": 10}, regularizer={"entropy_weight": 0.1})
        >>> options.schedule.every_n_steps, options.regularizer.entropy_weight, options.clip
        (10, 0.1, None)
    """

    capture: CaptureConfig = field(default_factory=CaptureConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    batch: BatchKeys = field(default_factory=BatchKeys)
    dashboards: DashboardConfig = field(default_factory=DashboardConfig)
    regularizer: RegularizerConfig | None = None
    clip: ClipConfig | None = None
    qk_clip: QKClipConfig | None = None
    alarms: AlarmsConfig | None = None

    def __post_init__(self) -> None:
        for name, cls in GROUPS.items():
            value = as_config(getattr(self, name), cls, name)
            if value is None and name in FLAT_NAMES.values():
                value = cls()
            setattr(self, name, value)
        if self.regularizer is not None and not self.regularizer.enabled:
            self.regularizer = None  # no penalty term: off
        if self.clip is not None and not self.clip.enabled:
            self.clip = None  # bounds [0, 1] clip nothing: off
        if self.qk_clip is not None and self.qk_clip.tau is None:
            self.qk_clip = None
        statistics = self.capture.statistics
        needs = {f"alarms.{rule.name}": rule.reads for rule in (self.alarms.rules.values() if self.alarms else ())}
        if self.qk_clip is not None:
            needs["qk_clip"] = ("max_logit",)
            if self.capture.head_shard is not None:
                raise ValueError(
                    "`qk_clip` with `capture.head_shard` (tensor parallelism without DTensor) is not supported: QK-clip "
                    "cannot tell which rows of the local projections hold which head; use DTensor parallelism, or set `qk_clip` to None"
                )
        if self.alarms is not None:
            every, option = (self.alarms.every_n_steps, "alarms.every_n_steps")
            if every is None:
                every, option = (self.schedule.every_n_steps, "schedule.every_n_steps")
            for rule in self.alarms.rules.values():
                if every > rule.span // 4:
                    raise ValueError(
                        f"`alarms.{rule.name}.span` ({rule.span} steps) needs a capture every {rule.span // 4} steps or more often; "
                        f"`{option}` is {every}: lower it or raise the span"
                    )
        for option, read in needs.items():
            for statistic in read:
                if statistic not in statistics:
                    raise ValueError(
                        f"`{option}` reads the statistic {statistic!r}, which is not among `capture.statistics` {statistics}: "
                        f"add it, or set `{option}` to None"
                    )

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
    """``options`` (or the defaults) with ``overrides`` set, checked. A group given in ``overrides``
    replaces the group of ``options``; a flat name of earlier releases (``every_n_steps``) sets that
    field of its group, with a ``FutureWarning`` naming the new place.

    Raises:
        ValueError: on an unknown option (the message lists the accepted ones) or an invalid value.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     options = as_options(None, {"every_n_steps": 10})
        >>> options.schedule.every_n_steps, caught[0].category.__name__, str(caught[0].message)[:47]
        (10, 'FutureWarning', '`every_n_steps` is now `schedule.every_n_steps`')
    """
    if options is not None and not isinstance(options, MonitorOptions):
        raise ValueError(f"`options` must be a MonitorOptions or None, got {type(options).__name__}")
    unknown = sorted(set(overrides) - set(GROUPS) - set(FLAT_NAMES))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown}; accepted options are {list(GROUPS)} (groups; see MonitorOptions)")
    base = {} if options is None else {name: getattr(options, name) for name in GROUPS}
    groups = {**base, **{name: value for name, value in overrides.items() if name in GROUPS}}
    flat = {name: value for name, value in overrides.items() if name in FLAT_NAMES}
    for name, value in flat.items():
        group = FLAT_NAMES[name]
        warnings.warn(
            f'`{name}` is now `{group}.{name}`: pass {group}={{"{name}": ...}} (the flat name will be removed in the next release)',
            FutureWarning,
            stacklevel=3,
        )
        current = groups.get(group)
        if current is not None and not isinstance(current, Mapping):
            current = {f.name: getattr(current, f.name) for f in fields(current)}
        groups[group] = {**(current or {}), name: value}
    return MonitorOptions(**groups)


def _check_token_classes(classes: Any) -> dict[str, list[str]] | None:
    if classes is None:
        return None
    if not (isinstance(classes, Mapping) and classes) or not all(
        isinstance(v, Sequence) and not isinstance(v, str) for v in classes.values()
    ):
        raise ValueError(f"`dashboards.token_classes` must be a non-empty mapping class -> list of tokens, got {classes!r}")
    return {str(k): [str(t) for t in v] for k, v in classes.items()}


def register_configs() -> None:
    """Register the structured configs in Hydra's ConfigStore (group ``attnmonitor``)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(group="attnmonitor", name="attention_monitor", node=AttentionMonitorConfig)
    for name, cls in GROUPS.items():
        store.store(group="attnmonitor", name=name, node=cls)
    store.store(group="attnmonitor", name="heatmaps", node=HeatmapConfig)
