"""torchmetrics ``Metric`` classes over :mod:`attnmonitor.functional`: per-(layer, head) sums (maxima) and counts."""

from attnmonitor.metrics.state import HeadStatisticGrid, gather_layers
from attnmonitor.metrics.statistic import (
    AttentionDistance,
    AttentionEffectiveSupport,
    AttentionEntropy,
    AttentionMaxLogit,
    AttentionMaxWeight,
    AttentionNextTokenWeight,
    AttentionNormalizedEntropy,
    AttentionPrevTokenWeight,
    AttentionSelfWeight,
    AttentionSinkMass,
    AttentionSparsity,
    AttentionStatistic,
)

__all__ = [
    "AttentionDistance",
    "AttentionEffectiveSupport",
    "AttentionEntropy",
    "AttentionMaxLogit",
    "AttentionMaxWeight",
    "AttentionNextTokenWeight",
    "AttentionNormalizedEntropy",
    "AttentionPrevTokenWeight",
    "AttentionSelfWeight",
    "AttentionSinkMass",
    "AttentionSparsity",
    "AttentionStatistic",
    "HeadStatisticGrid",
    "gather_layers",
]
