"""Steering attention: penalties added to the loss and exact clipping of attention weights."""

from attnmonitor.config import ClipConfig, RegularizerConfig
from attnmonitor.regularization.steering import AttentionSteering

__all__ = ["AttentionSteering", "ClipConfig", "RegularizerConfig"]
