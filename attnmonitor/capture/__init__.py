"""Discovery of attention modules, hook lifecycle, interception and attention records."""

from attnmonitor.capture.capture import AttentionCapture
from attnmonitor.capture.discovery import Targets, attention_like_modules, auto_targets, resolve_targets
from attnmonitor.capture.records import AttentionRecord

__all__ = ["AttentionCapture", "AttentionRecord", "Targets", "attention_like_modules", "auto_targets", "resolve_targets"]
