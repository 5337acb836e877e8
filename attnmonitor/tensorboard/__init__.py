"""Rendering attention figures and tables for TensorBoard, and the probe-example analyses behind them."""

from attnmonitor.tensorboard.probe import ProbeAnalysis, analyse_probe, interpretation_table, role_changes
from attnmonitor.tensorboard.render import attention_heatmaps, head_atlas, role_atlas, statistics_table

__all__ = [
    "ProbeAnalysis",
    "analyse_probe",
    "attention_heatmaps",
    "head_atlas",
    "interpretation_table",
    "role_atlas",
    "role_changes",
    "statistics_table",
]
