"""attnmonitor: watch and regularize how every attention head distributes its attention while a model trains.

Top-level names are imported on first use (PEP 562): ``from attnmonitor import AttentionCapture``
does not import Lightning, matplotlib, TensorBoard or transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from attnmonitor.capture import AttentionCapture
    from attnmonitor.config import ClipConfig, HeatmapConfig, MonitorOptions, RegularizerConfig
    from attnmonitor.engine import MonitorEngine
    from attnmonitor.functional.statistics import STATISTICS
    from attnmonitor.integrations.lightning import AttentionMonitor
    from attnmonitor.regularization.regularizer import AttentionRegularizer

_LAZY = {
    "AttentionCapture": "attnmonitor.capture",
    "AttentionMonitor": "attnmonitor.integrations.lightning",
    "AttentionRegularizer": "attnmonitor.regularization.regularizer",
    "ClipConfig": "attnmonitor.config",
    "HeatmapConfig": "attnmonitor.config",
    "MonitorEngine": "attnmonitor.engine",
    "MonitorOptions": "attnmonitor.config",
    "RegularizerConfig": "attnmonitor.config",
    "STATISTICS": "attnmonitor.functional.statistics",
}

__all__ = [
    "STATISTICS",
    "AttentionCapture",
    "AttentionMonitor",
    "AttentionRegularizer",
    "ClipConfig",
    "HeatmapConfig",
    "MonitorEngine",
    "MonitorOptions",
    "RegularizerConfig",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'attnmonitor' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
