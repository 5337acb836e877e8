"""Training health: what a training step's synced statistics decide, the same on every process.

The alarms compare each head with its own history; QK-clip rescales the query and key projections
of heads whose ``max_logit`` exceeded ``tau``.
"""

from __future__ import annotations

from typing import Any

from attnmonitor.alarms import AttentionAlarms, Firing, alarm_tag
from attnmonitor.alarms.report import lines
from attnmonitor.config import MonitorOptions
from attnmonitor.interventions.qk_clip import QKClip
from attnmonitor.metrics.state import Synced
from attnmonitor.tensorboard import tags


class TrainingHealth:
    """The alarms (with their history) and QK-clip of a monitor.

    Args:
        options: the monitor's options (``alarms``, ``qk_clip``).
    """

    def __init__(self, options: MonitorOptions) -> None:
        self.alarms = AttentionAlarms(options.alarms) if options.alarms is not None else None
        """The training-health rules and their history (None: alarms off)."""
        self.qk_clip: QKClip | None = None
        """The QK-clip of the attached model (None: off)."""
        self.firings: list[Firing] = []
        """The alarms that fired at the last check."""
        needs = (*(self.alarms.statistics if self.alarms is not None else ()), *(("max_logit",) if options.qk_clip else ()))
        self.statistics = tuple(dict.fromkeys(needs))
        """The statistics the alarms and QK-clip read (what a light capture collects)."""

    def check(self, step: int, synced: Synced, writer: Any, *, alarms: bool = True) -> dict[str, float]:
        """Run the alarms (when ``alarms``) and QK-clip on a training step's synced statistics; their
        scalars, and the firings as text where ``writer`` is set (global rank zero)."""
        scalars: dict[str, float] = {}
        self.firings = []
        if self.alarms is not None and alarms:
            self.firings = self.alarms.check(step, synced.layers, synced.values)
            scalars.update(self.alarms.scalars(self.firings))
            if writer is not None:
                for rule in dict.fromkeys(f.rule for f in self.firings):
                    reported = lines([f for f in self.firings if f.rule == rule], self.alarms.hints)
                    if reported:
                        writer.add_text(alarm_tag(rule), "\n".join(f"- {line}" for _, line in reported), step)
        if self.qk_clip is not None:
            grid = synced.values["max_logit"].cpu()  # one device-to-host copy for every layer
            maxima = {layer: grid[row, :heads] for row, (layer, heads) in enumerate(synced.heads.items())}
            scalars[tags.regularization("qk_clipped_heads")] = float(self.qk_clip.apply(maxima))
        return scalars

    def state_dict(self) -> dict[str, Any]:
        return {"alarms": self.alarms.state_dict()} if self.alarms is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.alarms is not None and "alarms" in state:
            self.alarms.load_state_dict(state["alarms"])
