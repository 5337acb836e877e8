"""attnmonitor: watch and steer how every attention head distributes its attention while a model trains."""

from attnmonitor.callback import AttentionMonitor
from attnmonitor.capture import AttentionCapture
from attnmonitor.config import HeatmapConfig
from attnmonitor.functional import STATISTICS

__all__ = ["STATISTICS", "AttentionCapture", "AttentionMonitor", "HeatmapConfig"]
__version__ = "0.1.0"
