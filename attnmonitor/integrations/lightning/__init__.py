"""The monitor as a Lightning callback (:class:`AttentionMonitor`), and a progress bar showing its mean entropy."""

from attnmonitor.integrations.lightning.callback import AttentionMonitor
from attnmonitor.integrations.lightning.publisher import AttentionProgressBar, LightningPublisher

__all__ = ["AttentionMonitor", "AttentionProgressBar", "LightningPublisher"]
