"""attnmonitor: watch and steer how every attention head distributes its attention while a model trains."""

from attnmonitor.capture import AttentionCapture
from attnmonitor.functional import STATISTICS

__all__ = ["STATISTICS", "AttentionCapture"]
__version__ = "0.1.0"
