"""Training-health alarms: per-head rules over the captured statistics, graded ``info`` / ``warning`` /
``critical``, reported once per episode, with an action per severity.

Rules (:mod:`attnmonitor.alarms.rules`): ``logit_growth`` (a head's ``max_logit`` growing
geometrically, sustained over a layer's heads: critical), ``entropy_collapse`` (a head sharpening:
info; while its logits keep growing: warning), ``sink_jump`` (info). Values are the statistics
already reduced across processes, so every process takes the same decisions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from attnmonitor.alarms.episodes import Episodes, Firing
from attnmonitor.alarms.history import LayerHistory
from attnmonitor.alarms.report import lines, logger
from attnmonitor.alarms.rules import SEVERITIES, AlarmRule, EntropyCollapseConfig, LogitGrowthConfig, SinkJumpConfig
from attnmonitor.checks import as_config, check_int

__all__ = [
    "ALARM_ACTIONS",
    "SEVERITIES",
    "Actions",
    "AlarmRule",
    "AlarmsConfig",
    "AttentionAlarms",
    "EntropyCollapseConfig",
    "Firing",
    "LogitGrowthConfig",
    "SinkJumpConfig",
    "act",
    "alarm_tag",
]

ALARM_ACTIONS = ("log", "warn", "checkpoint", "stop")
"""``log``: counted in the scalars and the TensorBoard text only; ``warn``: also one line on the
console (the ``attnmonitor`` logger); ``checkpoint``: also save a checkpoint; ``stop``: also save,
then stop training cleanly. Checkpoints and stops are taken once per episode."""


def _default_actions() -> dict[str, Any]:
    return {"info": "log", "warning": "warn", "critical": "checkpoint"}


@dataclass
class AlarmsConfig:
    """Training-health alarms over the per-head statistics of training captures; a rule set to None is off.

    Attributes:
        logit_growth: :class:`~attnmonitor.alarms.rules.LogitGrowthConfig` (or mapping).
        entropy_collapse: :class:`~attnmonitor.alarms.rules.EntropyCollapseConfig` (or mapping).
        sink_jump: :class:`~attnmonitor.alarms.rules.SinkJumpConfig` (or mapping).
        actions: ``{severity: action}`` for ``info``, ``warning`` and ``critical``; an action is one of
            :data:`ALARM_ACTIONS` or a callable receiving the list of new firings (severities not
            given keep their default: ``log``, ``warn``, ``checkpoint``).
        every_n_steps: extra captures for the alarms alone, of only the statistics the rules read
            (nothing logged but the alarms); None: the alarms look at the monitor's regular captures
            only. Growth is measured per step, so any interval works; the defaults were validated
            at 10.
    """

    logit_growth: LogitGrowthConfig | None = field(default_factory=LogitGrowthConfig)
    entropy_collapse: EntropyCollapseConfig | None = field(default_factory=EntropyCollapseConfig)
    sink_jump: SinkJumpConfig | None = field(default_factory=SinkJumpConfig)
    actions: dict[str, Any] = field(default_factory=_default_actions)
    every_n_steps: int | None = 10

    def __post_init__(self) -> None:
        self.logit_growth = as_config(self.logit_growth, LogitGrowthConfig, "alarms.logit_growth")
        self.entropy_collapse = as_config(self.entropy_collapse, EntropyCollapseConfig, "alarms.entropy_collapse")
        self.sink_jump = as_config(self.sink_jump, SinkJumpConfig, "alarms.sink_jump")
        if not isinstance(self.actions, Mapping):
            raise ValueError(f"`alarms.actions` must be a mapping {{severity: action}}, got {self.actions!r}")
        unknown = sorted(set(self.actions) - set(SEVERITIES))
        if unknown:
            raise ValueError(f"`alarms.actions` got unknown severities {unknown}; accepted: {list(SEVERITIES)}")
        self.actions = {**_default_actions(), **self.actions}
        for severity, action in self.actions.items():
            if not (callable(action) or action in ALARM_ACTIONS):
                raise ValueError(f"`alarms.actions.{severity}` must be one of {list(ALARM_ACTIONS)} or a callable, got {action!r}")
        check_int("alarms.every_n_steps", self.every_n_steps, 1, optional=True)

    @property
    def rules(self) -> dict[str, AlarmRule]:
        """``{name: rule}`` of the rules that are on."""
        candidates = (self.logit_growth, self.entropy_collapse, self.sink_jump)
        return {rule.name: rule for rule in candidates if rule is not None}


TAG_GROUP = "attn_train_alarm"


def alarm_tag(rule: str) -> str:
    """Scalar tag of the number of heads for which a rule fires at warning or above, at a capture."""
    return f"{TAG_GROUP}/{rule}"


SEVERITY_TAG = f"{TAG_GROUP}/severity"
"""Scalar tag of the highest severity at a capture: 0 quiet, 1 info, 2 warning, 3 critical."""


@dataclass(frozen=True)
class Actions:
    """What the engine asks the training loop to do after a step; each adapter translates it.

    Attributes:
        checkpoint: save a checkpoint now (an episode whose action is ``"checkpoint"`` or ``"stop"`` began).
        stop: then stop training cleanly (one whose action is ``"stop"`` began).
        firings: the firings of the step (new, continuing and cleared).
    """

    checkpoint: bool = False
    stop: bool = False
    firings: tuple[Firing, ...] = ()


def act(
    firings: Sequence[Firing],
    actions: Mapping[str, Any],
    hints: Mapping[str, str],
    log: Callable[[int, str], None] | None = None,
    already_open: Collection[str] = (),
) -> Actions:
    """Report the firings (one line per rule and severity; ``warn`` and above on the console) and call
    each callable action once with its new firings; returns the checkpoint / stop requested by
    episodes that started or escalated now, for the adapter to carry out, unless an episode of that
    severity was already open (one checkpoint per spell of trouble, not per head)."""
    if not firings:
        return Actions()
    emit = log if log is not None else (lambda level, message: logger().log(level, message))
    for severity, line in lines(firings, hints):
        emit(logging.WARNING if actions[severity] != "log" else logging.DEBUG, line)
    new = [f for f in firings if f.new]
    for action in {id(a): a for a in actions.values() if callable(a)}.values():
        mine = [f for f in new if actions[f.severity] is action]
        if mine:
            action(mine)
    requested = {actions[f.severity] for f in new if isinstance(actions[f.severity], str) and f.severity not in already_open}
    stop = "stop" in requested
    if stop:
        emit(
            logging.WARNING,
            f"attnmonitor: an alarm with action 'stop' fired at step {firings[0].step}: training stops after a checkpoint is saved.",
        )
    return Actions(checkpoint=stop or "checkpoint" in requested, stop=stop, firings=tuple(firings))


class AttentionAlarms:
    """The rules of an :class:`AlarmsConfig`, each layer's recent history and the open episodes.

    Args:
        config: the rules (a rule set to None is off) and the action of each severity.
    """

    def __init__(self, config: AlarmsConfig) -> None:
        self.config = config
        self.rules = config.rules
        self.statistics = tuple(dict.fromkeys(s for rule in self.rules.values() for s in rule.reads))
        """The statistics the rules read."""
        self.hints = {name: rule.hint for name, rule in self.rules.items()}
        self._keep = 2 * max((rule.span_steps for rule in self.rules.values()), default=0)
        self._history: dict[str, LayerHistory] = {}
        self.episodes = Episodes({name: rule.span_steps for name, rule in self.rules.items()})
        self.open_before: set[str] = set()
        """Severities of the episodes open before the last :meth:`check` (their actions were taken)."""
        self.charted: set[str] = set()
        """Rules that fired at warning or above: their count is logged from then on."""

    def check(self, step: int, layers: Sequence[str], values: Mapping[str, Tensor]) -> list[Firing]:
        """Grade every head of the ``{statistic: [L, H]}`` of a capture at optimizer ``step`` (NaN: not
        observed) with every rule, then add the capture to the history. Returns the firings (new,
        continuing and cleared), by rule, layer and head."""
        firings = []
        self.open_before = {SEVERITIES[e.severity - 1] for e in self.episodes.open.values()}
        grids = {s: grid.detach().float().cpu() for s, grid in values.items() if s in self.statistics}
        for row, layer in enumerate(layers):
            now = {s: g[row] for s, g in grids.items()}
            history = self._history.setdefault(layer, LayerHistory())
            for name, rule in self.rules.items():
                if not all(s in now for s in rule.reads):
                    continue
                value = now[rule.value_of]
                severity = rule.grade(history, now, step)
                observed = (~value.isnan()).nonzero().flatten().tolist()
                grades = {h: (int(severity[h]), float(value[h])) for h in observed}
                firings += self.episodes.update(name, rule.value_of, layer, grades, step)
            if now:
                history.append(step, now, self._keep)
        return firings

    def scalars(self, firings: Sequence[Firing]) -> dict[str, float]:
        """The highest severity (one compact chart), and ``{alarm tag: heads firing at warning or above}``
        for each rule from its first such firing on (no flat-zero charts before the attention ones)."""
        firing = [f for f in firings if f.change != "cleared"]
        warned = [f.rule for f in firing if f.severity != "info"]
        self.charted |= set(warned)
        scalars = {alarm_tag(name): float(warned.count(name)) for name in self.rules if name in self.charted}
        scalars[SEVERITY_TAG] = float(max((SEVERITIES.index(f.severity) + 1 for f in firing), default=0))
        return scalars

    def state_dict(self) -> dict[str, Any]:
        history = {layer: h.state_dict() for layer, h in self._history.items()}
        return {"history": history, "episodes": self.episodes.state_dict(), "charted": sorted(self.charted)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._history = {}
        for layer, saved in state.get("history", {}).items():
            self._history[layer] = history = LayerHistory()
            history.load_state_dict(saved)
        self.episodes.load_state_dict([e for e in state.get("episodes", []) if e["rule"] in self.rules])
        self.charted = {rule for rule in state.get("charted", []) if rule in self.rules}
