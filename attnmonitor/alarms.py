"""Training-health alarms: per-head rules over the captured statistics, each compared with the head's
own recent history.

Rules (:class:`attnmonitor.config.AlarmsConfig`):

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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnmonitor.config import AlarmsConfig, EntropyCollapseConfig, LogitGrowthConfig, SinkJumpConfig

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


Rule = Callable[[Any, Tensor, Tensor, Mapping[str, Tensor]], Tensor]
"""``(rule config, current [H], history [n, H], {statistic: current [H]} of the layer) -> bool [H]``:
heads for which the rule fires."""


def _entropy_collapse(config: EntropyCollapseConfig, current: Tensor, history: Tensor, row: Mapping[str, Tensor]) -> Tensor:
    mean = history.nanmean(0)
    fired = (current < (1 - config.drop) * mean) & (mean - current >= config.min_drop)
    if config.logit_floor is not None:
        fired &= row["max_logit"] > config.logit_floor
    return fired


def _logit_growth(config: LogitGrowthConfig, current: Tensor, history: Tensor, row: Mapping[str, Tensor]) -> Tensor:
    fired = torch.zeros_like(current, dtype=torch.bool)
    if config.ceiling is not None:
        fired |= current > config.ceiling
    if config.rate is not None:
        low = torch.where(history.isnan(), math.inf, history).amin(0)
        fired |= (current > config.floor) & (current > config.rate * low)
    return fired


def _sink_jump(config: SinkJumpConfig, current: Tensor, history: Tensor, row: Mapping[str, Tensor]) -> Tensor:
    return (current - history.nanmean(0)).abs() > config.jump


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


RULES: dict[str, tuple[str, Rule]] = {
    "entropy_collapse": ("normalized_entropy", _entropy_collapse),
    "logit_growth": ("max_logit", _logit_growth),
    "sink_jump": ("sink_mass", _sink_jump),
}
"""``{rule: (statistic it watches, rule)}``."""


def rule_statistics(config: AlarmsConfig) -> dict[str, tuple[str, ...]]:
    """``{rule: statistics it reads}`` of the rules that are on."""
    needs = {}
    for name, (statistic, _) in RULES.items():
        rule_config = getattr(config, name)
        if rule_config is not None:
            extra = ("max_logit",) if getattr(rule_config, "logit_floor", None) is not None else ()
            needs[name] = (statistic, *extra)
    return needs


class AttentionAlarms:
    """The rules of an :class:`~attnmonitor.config.AlarmsConfig` and each head's recent history.

    Args:
        config: the rules (a rule set to None is off).
    """

    def __init__(self, config: AlarmsConfig) -> None:
        self.config = config
        self._rules = {
            name: (statistic, rule, rule_config)
            for name, (statistic, rule) in RULES.items()
            if (rule_config := getattr(config, name)) is not None
        }
        self.statistics = tuple(dict.fromkeys(s for statistics in rule_statistics(config).values() for s in statistics))
        """The statistics the rules read."""
        self._history: dict[tuple[str, str], deque[Tensor]] = {}  # (rule, layer) -> [H] values, oldest first

    def check(self, step: int, layers: Sequence[str], values: Mapping[str, Tensor]) -> list[Firing]:
        """Apply every rule to the ``{statistic: [L, H]}`` of a capture (NaN: not observed), then add
        the capture to the history. Returns the firings, by rule, layer and head."""
        firings = []
        grids = {statistic: grid.detach().float().cpu() for statistic, grid in values.items() if statistic in self.statistics}
        for name, (statistic, fires, rule_config) in self._rules.items():
            grid = grids.get(statistic)
            if grid is None:
                continue
            for row, layer in enumerate(layers):
                current = grid[row]
                history = self._history.setdefault((name, layer), deque(maxlen=rule_config.window))
                if len(history) >= rule_config.warmup and len(history[0]) == len(current):
                    past = torch.stack(list(history))  # [n, H]
                    fired = fires(rule_config, current, past, {s: g[row] for s, g in grids.items()}) & ~current.isnan()
                    for head in fired.nonzero().flatten().tolist():
                        firings.append(Firing(
                            name, statistic, layer, head, float(current[head]), tuple(past[:, head].tolist()), step, rule_config.action
                        ))
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
                window = self._rules[rule][2].window
                self._history[(rule, layer)] = deque((torch.tensor(v) for v in values), maxlen=window)
