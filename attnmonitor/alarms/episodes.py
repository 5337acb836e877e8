"""Firing episodes: a head's alarm starts, may escalate, and clears; repeats in between are counted,
not reported again."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from attnmonitor.alarms.rules import SEVERITIES


@dataclass(frozen=True)
class Firing:
    """One head for which one rule fired at one step.

    Attributes:
        severity: ``"info"``, ``"warning"`` or ``"critical"``.
        value: the head's value of ``statistic`` at ``step``.
        since: the step its episode started (``step`` for a new one).
        change: ``"started"``, ``"escalated"`` (to a higher severity), ``"firing"`` (still, as before)
            or ``"cleared"`` (quiet again: ``severity`` is the episode's highest).
    """

    rule: str
    severity: str
    statistic: str
    layer: str
    head: int
    value: float
    step: int
    since: int
    change: str

    @property
    def new(self) -> bool:
        """Whether this firing starts an episode or raises its severity (actions are taken on these)."""
        return self.change in ("started", "escalated")


@dataclass
class Episode:
    """A head's current run of firings of one rule."""

    since: int
    severity: int  # highest so far, 1 + index in SEVERITIES
    last: int  # the last step it fired


class Episodes:
    """The open episode of every (rule, layer, head).

    Args:
        quiet_steps: ``{rule: steps}`` an episode must stay quiet before it clears (a head whose
            growth pauses for a capture or two is still the same episode); 0 where not given.
    """

    def __init__(self, quiet_steps: Mapping[str, int] | None = None) -> None:
        self.open: dict[tuple[str, str, int], Episode] = {}
        self.quiet_steps = dict(quiet_steps or {})

    def update(self, rule: str, statistic: str, layer: str, grades: Mapping[int, tuple[int, float]], step: int) -> list[Firing]:
        """Advance the episodes of ``rule`` in ``layer`` from this capture's ``{head: (severity, value)}``
        (every observed head; severity 0: quiet). Returns a firing per head that fires or clears."""
        firings = []
        for head, (severity, value) in grades.items():
            key = (rule, layer, head)
            episode = self.open.get(key)
            if severity == 0:
                if episode is not None and step - episode.last >= self.quiet_steps.get(rule, 0):
                    del self.open[key]
                    firings.append(
                        Firing(rule, SEVERITIES[episode.severity - 1], statistic, layer, head, value, step, episode.since, "cleared")
                    )
                continue
            if episode is None:
                change, episode = "started", self.open.setdefault(key, Episode(step, severity, step))
            elif severity > episode.severity:
                change, episode.severity = "escalated", severity
            else:
                change = "firing"
            episode.last = step
            firings.append(Firing(rule, SEVERITIES[severity - 1], statistic, layer, head, value, step, episode.since, change))
        return firings

    def state_dict(self) -> list[dict[str, Any]]:
        return [{"rule": r, "layer": layer, "head": h, **asdict(e)} for (r, layer, h), e in self.open.items()]

    def load_state_dict(self, state: list[Mapping[str, Any]]) -> None:
        self.open = {
            (e["rule"], e["layer"], int(e["head"])): Episode(int(e["since"]), int(e["severity"]), int(e.get("last", e["since"])))
            for e in state
        }
