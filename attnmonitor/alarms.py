"""Training-health alarms: per-head rules over the captured statistics, each compared with the head's
own recent history.

Rules (:class:`AlarmsConfig`, each an :class:`AlarmRule`):

- ``entropy_collapse``: a head's normalised entropy falls below ``(1 − drop)`` times its mean over the
  last ``window`` captures, by at least ``min_drop`` (heads focused by design stay quiet: their own
  history is low too);
- ``logit_growth``: a head's ``max_logit`` exceeds ``ceiling``, or ``rate`` times its minimum over
  the window (once above ``floor``);
- ``sink_jump``: a head's ``sink_mass`` moves by more than ``jump`` from its mean over the window.

A rule fires only after ``warmup`` captures of history. Values are the statistics already reduced
across processes, so every process takes the same decisions.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnmonitor.checks import as_config, check_int, check_number

ALARM_ACTIONS = ("warn", "checkpoint", "stop")


@dataclass
class AlarmRule:
    """What every alarm rule has: its history, warm-up and action; a rule adds its thresholds and :meth:`fires`.

    Attributes:
        window: captures of history a head is compared with.
        warmup: captures of history needed before the rule may fire (``<= window``).
        action: ``"warn"``, ``"checkpoint"`` (save one at that step), ``"stop"`` (save, then stop
            training cleanly), or a callable receiving the list of firings.
    """

    name: ClassVar[str] = ""
    statistic: ClassVar[str] = ""
    """The statistic the rule watches."""

    window: int = 10
    warmup: int = 5
    action: Any = "warn"

    def __post_init__(self) -> None:
        check_int(f"alarms.{self.name}.window", self.window, 1)
        check_int(f"alarms.{self.name}.warmup", self.warmup, 1)
        if self.warmup > self.window:
            raise ValueError(
                f"`alarms.{self.name}.warmup` ({self.warmup}) must be <= its `window` ({self.window}): the history holds `window` captures"
            )
        if not (callable(self.action) or self.action in ALARM_ACTIONS):
            raise ValueError(f"`alarms.{self.name}.action` must be one of {list(ALARM_ACTIONS)} or a callable, got {self.action!r}")

    @property
    def reads(self) -> tuple[str, ...]:
        """Every statistic the rule reads."""
        return (self.statistic,)

    def fires(self, current: Tensor, history: Tensor, row: Mapping[str, Tensor]) -> Tensor:
        """Bool ``[H]``: heads of a layer for which the rule fires, from the watched statistic's current
        ``[H]`` values, its ``[n, H]`` history (oldest first; NaN: not observed) and ``{statistic: [H]}``
        of every statistic read at this capture."""
        raise NotImplementedError


@dataclass
class EntropyCollapseConfig(AlarmRule):
    """Fires for a head whose normalised entropy falls below ``(1 − drop)`` × its mean over the last
    ``window`` captures, by at least ``min_drop``, while its ``max_logit`` is above ``logit_floor``.

    Attributes:
        drop: relative fall, in (0, 1).
        min_drop: smallest absolute fall (normalised entropy is in [0, 1]).
        logit_floor: the head's ``max_logit`` must also exceed this; None: entropy alone. A head that
            learns a sharp pattern sharpens with moderate logits (the ``reverse`` preset's
            cross-attention falls from 0.99 to 0.06 with ``max_logit`` below 23), a runaway collapse
            with growing ones (``experiment=unstable``: above 100 within 30 steps).
    """

    name: ClassVar[str] = "entropy_collapse"
    statistic: ClassVar[str] = "normalized_entropy"

    drop: float = 0.5
    min_drop: float = 0.1
    logit_floor: float | None = 30.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("alarms.entropy_collapse.drop", self.drop, 0.0, 1.0)
        check_number("alarms.entropy_collapse.min_drop", self.min_drop, 0.0, 1.0)
        check_number("alarms.entropy_collapse.logit_floor", self.logit_floor, float("-inf"), optional=True)

    @property
    def reads(self) -> tuple[str, ...]:
        return (self.statistic, "max_logit") if self.logit_floor is not None else (self.statistic,)

    def fires(self, current: Tensor, history: Tensor, row: Mapping[str, Tensor]) -> Tensor:
        mean = history.nanmean(0)
        fired = (current < (1 - self.drop) * mean) & (mean - current >= self.min_drop)
        if self.logit_floor is not None:
            fired &= row["max_logit"] > self.logit_floor
        return fired


@dataclass
class LogitGrowthConfig(AlarmRule):
    """Fires for a head whose ``max_logit`` exceeds ``ceiling``, or exceeds ``rate`` × its minimum over
    the last ``window`` captures while above ``floor``.

    Attributes:
        ceiling: absolute limit (Kimi K2's QK-Clip caps logits at 100); None: no ceiling.
        rate: growth factor over the window; None: no growth rule.
        floor: the growth rule applies above this value (small logits double harmlessly: in the
            800-step demo run every head stays below 24, while a run whose attention collapses
            passes 400 within 20 steps).
    """

    name: ClassVar[str] = "logit_growth"
    statistic: ClassVar[str] = "max_logit"

    ceiling: float | None = 100.0
    rate: float | None = 2.0
    floor: float = 30.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("alarms.logit_growth.ceiling", self.ceiling, 0.0, optional=True)
        check_number("alarms.logit_growth.rate", self.rate, 1.0, optional=True)
        check_number("alarms.logit_growth.floor", self.floor, 0.0)

    def fires(self, current: Tensor, history: Tensor, row: Mapping[str, Tensor]) -> Tensor:
        fired = torch.zeros_like(current, dtype=torch.bool)
        if self.ceiling is not None:
            fired |= current > self.ceiling
        if self.rate is not None:
            low = torch.where(history.isnan(), math.inf, history).amin(0)
            fired |= (current > self.floor) & (current > self.rate * low)
        return fired


@dataclass
class SinkJumpConfig(AlarmRule):
    """Fires for a head whose ``sink_mass`` moves by more than ``jump`` from its mean over the last
    ``window`` captures.

    Attributes:
        jump: absolute change, in (0, 1].
    """

    name: ClassVar[str] = "sink_jump"
    statistic: ClassVar[str] = "sink_mass"

    jump: float = 0.3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_number("alarms.sink_jump.jump", self.jump, 0.0, 1.0)

    def fires(self, current: Tensor, history: Tensor, row: Mapping[str, Tensor]) -> Tensor:
        return (current - history.nanmean(0)).abs() > self.jump


@dataclass
class AlarmsConfig:
    """Training-health alarms over the per-head statistics of training captures; a rule set to None is off.

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
        check_int("alarms.every_n_steps", self.every_n_steps, 1, optional=True)

    @property
    def rules(self) -> dict[str, AlarmRule]:
        """``{name: rule}`` of the rules that are on."""
        candidates = (self.entropy_collapse, self.logit_growth, self.sink_jump)
        return {rule.name: rule for rule in candidates if rule is not None}


TAG_GROUP = "attn_alarm"


def alarm_tag(rule: str) -> str:
    """Scalar tag of the number of heads a rule fired for at a capture."""
    return f"{TAG_GROUP}/{rule}"


@dataclass(frozen=True)
class Firing:
    """One head for which one rule fired at one step."""

    rule: str
    statistic: str
    layer: str
    head: int
    value: float
    history: tuple[float, ...]  # the head's values at the previous captures of the window, oldest first
    step: int
    action: Any

    def message(self) -> str:
        recent = ", ".join(f"{v:.3g}" for v in self.history)
        return (
            f"attnmonitor alarm [{self.rule}] at step {self.step}: layer '{self.layer}' head {self.head}: "
            f"{self.statistic} = {self.value:.4g} (previous captures: {recent})"
        )


@dataclass(frozen=True)
class Actions:
    """What the engine asks the training loop to do after a step; each adapter translates it.

    Attributes:
        checkpoint: save a checkpoint now (an alarm with action ``"checkpoint"`` or ``"stop"`` fired).
        stop: then stop training cleanly (an alarm with action ``"stop"`` fired).
        firings: the alarms that fired.
    """

    checkpoint: bool = False
    stop: bool = False
    firings: tuple[Firing, ...] = ()


def act(firings: Sequence[Firing], warn: Callable[[str], None]) -> Actions:
    """Warn about every firing (one message) and call each callable action once with its firings;
    returns the other actions requested (``"checkpoint"``, ``"stop"``), for the adapter to carry out."""
    if not firings:
        return Actions()
    warn("\n".join(f.message() for f in firings))
    for action in {id(f.action): f.action for f in firings if callable(f.action)}.values():
        action([f for f in firings if f.action is action])
    requested = {f.action for f in firings if isinstance(f.action, str)}
    stop = "stop" in requested
    if stop:
        warn(f"attnmonitor: an alarm with action 'stop' fired at step {firings[0].step}: training stops after a checkpoint is saved.")
    return Actions(checkpoint=stop or "checkpoint" in requested, stop=stop, firings=tuple(firings))


class AttentionAlarms:
    """The rules of an :class:`AlarmsConfig` and each head's recent history.

    Args:
        config: the rules (a rule set to None is off).
    """

    def __init__(self, config: AlarmsConfig) -> None:
        self.config = config
        self._rules = config.rules
        self.statistics = tuple(dict.fromkeys(s for rule in self._rules.values() for s in rule.reads))
        """The statistics the rules read."""
        self._history: dict[tuple[str, str], deque[Tensor]] = {}  # (rule, layer) -> [H] values, oldest first

    def check(self, step: int, layers: Sequence[str], values: Mapping[str, Tensor]) -> list[Firing]:
        """Apply every rule to the ``{statistic: [L, H]}`` of a capture (NaN: not observed), then add
        the capture to the history. Returns the firings, by rule, layer and head."""
        firings = []
        grids = {statistic: grid.detach().float().cpu() for statistic, grid in values.items() if statistic in self.statistics}
        for name, rule in self._rules.items():
            grid = grids.get(rule.statistic)
            if grid is None:
                continue
            for row, layer in enumerate(layers):
                current = grid[row]
                history = self._history.setdefault((name, layer), deque(maxlen=rule.window))
                if len(history) >= rule.warmup and len(history[0]) == len(current):
                    past = torch.stack(list(history))  # [n, H]
                    fired = rule.fires(current, past, {s: g[row] for s, g in grids.items()}) & ~current.isnan()
                    for head in fired.nonzero().flatten().tolist():
                        firings.append(
                            Firing(
                                name, rule.statistic, layer, head, float(current[head]), tuple(past[:, head].tolist()), step, rule.action
                            )
                        )
                history.append(current)
        return firings

    def counts(self, firings: Sequence[Firing]) -> dict[str, float]:
        """``{alarm tag: number of heads fired}`` for every rule (0 when quiet)."""
        return {alarm_tag(name): float(sum(f.rule == name for f in firings)) for name in self._rules}

    def state_dict(self) -> dict[str, Any]:
        return {f"{rule}|{layer}": [t.tolist() for t in history] for (rule, layer), history in self._history.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._history.clear()
        for key, values in state.items():
            rule, layer = key.split("|", 1)
            if rule in self._rules:
                window = self._rules[rule].window
                self._history[(rule, layer)] = deque((torch.tensor(v) for v in values), maxlen=window)
