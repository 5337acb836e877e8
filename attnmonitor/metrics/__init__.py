"""torchmetrics ``Metric`` classes over :mod:`attnmonitor.functional`: per-(layer, head) sums and counts."""

from attnmonitor.metrics.state import AttentionStatistics, gather_layers
from attnmonitor.metrics.statistic import (
    AttentionDistance,
    AttentionEffectiveSupport,
    AttentionEntropy,
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
    "AttentionMaxWeight",
    "AttentionNextTokenWeight",
    "AttentionNormalizedEntropy",
    "AttentionPrevTokenWeight",
    "AttentionSelfWeight",
    "AttentionSinkMass",
    "AttentionSparsity",
    "AttentionStatistic",
    "AttentionStatistics",
    "gather_layers",
]
