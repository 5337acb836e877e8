"""Which optimizer steps the monitor captures, and what each capture draws: pure functions of the step.

Steps are optimizer steps counted from 0. A step is *due* every ``n`` steps at ``n − 1, 2n − 1, ...``,
the steps Lightning logs with ``log_every_n_steps=n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

CaptureKind = Literal["train", "light"]
"""``"train"``: every statistic, logged; ``"light"``: only what the alarms and QK-clip read."""


def due(step: int, every: int | None) -> bool:
    """Whether ``step`` (counted from 0) is one in ``every`` (None: never).

    Example:
        >>> [step for step in range(10) if due(step, 3)]
        [2, 5, 8]
    """
    return every is not None and (step + 1) % every == 0


@dataclass(frozen=True)
class Schedule:
    """The monitor's calendar.

    Attributes:
        every_n_steps: regular captures (every statistic, logged).
        atlas_every_n_steps: regular captures that also draw head atlases, histograms and tables.
        heatmap_every_n_steps: regular captures that also draw heatmaps (None: never in training).
        alarm_every_n_steps: light captures for the alarms (None: the alarms read regular captures only).
        alarms: whether alarms are on (they read every regular capture).
        qk_clip: whether QK-clip is on (it needs every step's ``max_logit``: every step is captured).

    Example:
        >>> schedule = Schedule(every_n_steps=4, atlas_every_n_steps=8, alarm_every_n_steps=2, alarms=True)
        >>> [(step, schedule.capture(step)) for step in range(8) if schedule.capture(step)]
        [(1, 'light'), (3, 'train'), (5, 'light'), (7, 'train')]
        >>> schedule.atlases(7), schedule.atlases(3)
        (True, False)
    """

    every_n_steps: int
    atlas_every_n_steps: int
    heatmap_every_n_steps: int | None = None
    alarm_every_n_steps: int | None = None
    alarms: bool = False
    qk_clip: bool = False

    def capture(self, step: int) -> CaptureKind | None:
        """What step ``step`` captures: ``"train"`` (regular), ``"light"`` (alarms or QK-clip only), or None."""
        if due(step, self.every_n_steps):
            return "train"
        if self.qk_clip or self.alarms_due(step):
            return "light"
        return None

    def alarms_due(self, step: int) -> bool:
        """Whether the alarms look at step ``step``: every regular capture, and every ``alarm_every_n_steps``."""
        return self.alarms and (due(step, self.every_n_steps) or due(step, self.alarm_every_n_steps))

    def atlases(self, step: int) -> bool:
        """Whether a regular capture at ``step`` draws atlases, histograms and the per-head table."""
        return due(step, self.every_n_steps) and due(step, self.atlas_every_n_steps)

    def heatmaps(self, step: int) -> bool:
        """Whether a regular capture at ``step`` draws heatmaps."""
        return due(step, self.every_n_steps) and due(step, self.heatmap_every_n_steps)

    def unreached(self, max_steps: int, start: int = 0) -> str | None:
        """A warning naming the intervals that no step of a ``max_steps`` run (from step ``start``, when
        resumed) reaches (training is then not captured, or draws nothing), with the values that
        would; None when every one is reached.

        Example:
            >>> print(Schedule(every_n_steps=5, atlas_every_n_steps=200).unreached(12))
            attnmonitor: no atlases in this 12-step run: `schedule.atlas_every_n_steps=200` (use at most 12).
        """
        if max_steps <= start:
            return None
        first = [step for step in range(start, max_steps) if self.capture(step) == "train"]
        problems = []
        if not first:
            problems.append(f"no training step of this {max_steps}-step run is captured: `schedule.every_n_steps={self.every_n_steps}`")
        for what, option, interval, hit in (
            ("atlases", "schedule.atlas_every_n_steps", self.atlas_every_n_steps, self.atlases),
            ("heatmaps", "dashboards.heatmaps.every_n_steps", self.heatmap_every_n_steps, self.heatmaps),
        ):
            if interval is not None and first and not any(hit(step) for step in first):
                problems.append(f"no {what} in this {max_steps}-step run: `{option}={interval}`")
            elif interval is not None and not first:
                problems.append(f"no {what}: `{option}={interval}`")
        if not problems:
            return None
        return "attnmonitor: " + "; ".join(f"{p} (use at most {max_steps})" for p in problems) + "."
