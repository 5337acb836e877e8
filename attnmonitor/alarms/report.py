"""What a person reads about the alarms: one line per rule, severity and capture, through the
``attnmonitor`` logger (written above a tqdm progress bar, never glued onto it)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

from attnmonitor.alarms.episodes import Firing
from attnmonitor.alarms.rules import SEVERITIES

LOGGER_NAME = "attnmonitor"


class _ProgressBarSafeHandler(logging.StreamHandler):
    """Writes through ``tqdm.write`` (where tqdm is installed), so a progress bar is redrawn below."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:
            self.handleError(record)


def logger(console: bool = False) -> logging.Logger:
    """The ``attnmonitor`` logger. Where logging is not configured (no root handler), or with
    ``console`` (the main job: Hydra's console handler would glue lines onto the progress bar), it
    gets a progress-bar-safe handler of its own and stops propagating, as Lightning does for its logger."""
    log = logging.getLogger(LOGGER_NAME)
    if not log.handlers and (console or not logging.getLogger().handlers):
        log.addHandler(_ProgressBarSafeHandler())
        log.propagate = False
    return log


def _heads(firings: Sequence[Firing]) -> str:
    by_layer: dict[str, list[Firing]] = {}
    for f in firings:
        by_layer.setdefault(f.layer, []).append(f)
    parts = []
    for layer, fs in by_layer.items():
        heads = ", ".join(str(f.head) for f in fs)
        values = ", ".join(f"{f.value:.3g}" for f in fs)
        parts.append(f"{layer} head{'s' if len(fs) > 1 else ''} {heads} ({values})")
    return "; ".join(parts)


def lines(firings: Sequence[Firing], hints: Mapping[str, str]) -> list[tuple[str, str]]:
    """``(severity, line)`` for every rule and severity with heads that started or escalated at this
    capture, and for every rule whose warning or critical episodes cleared; heads still firing as
    before are only counted."""
    out = []
    for rule in dict.fromkeys(f.rule for f in firings):
        mine = [f for f in firings if f.rule == rule]
        still = [f for f in mine if f.change == "firing" and f.severity != "info"]
        for severity in reversed(SEVERITIES):
            new = [f for f in mine if f.new and f.severity == severity]
            if not new:
                continue
            step, statistic = new[0].step, new[0].statistic
            line = f"attnmonitor alarm [{severity}] {rule} at step {step}: {statistic} of {_heads(new)}"
            if still:
                line += f"; {len(still)} more head{'s' if len(still) > 1 else ''} still firing (since step {min(f.since for f in still)})"
            if severity != "info" and hints.get(rule):
                line += f". {hints[rule][0].upper()}{hints[rule][1:]}"
            out.append((severity, line))
        cleared = [f for f in mine if f.change == "cleared" and f.severity != "info"]
        if cleared:
            since, highest = min(f.since for f in cleared), max(SEVERITIES.index(f.severity) for f in cleared)
            out.append(
                (
                    SEVERITIES[highest],
                    f"attnmonitor alarm {rule} cleared at step {cleared[0].step}: {_heads(cleared)} (firing since step {since})",
                )
            )
    return out
