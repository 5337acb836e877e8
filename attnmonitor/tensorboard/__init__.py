"""Rendering attention figures and tables for TensorBoard."""

from attnmonitor.tensorboard.render import attention_heatmaps, head_atlas, statistics_table

__all__ = ["attention_heatmaps", "head_atlas", "statistics_table"]
