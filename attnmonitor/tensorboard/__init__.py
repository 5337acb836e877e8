"""Publishing: tags, scalar dictionaries, rendered figures and tables, and the example analyses behind them."""

from attnmonitor.tensorboard.example import ExampleAnalysis, analyse_example, interpretation_table, role_changes
from attnmonitor.tensorboard.render import attention_heatmaps, head_atlas, role_atlas, statistics_table

__all__ = [
    "ExampleAnalysis",
    "analyse_example",
    "attention_heatmaps",
    "head_atlas",
    "interpretation_table",
    "role_atlas",
    "role_changes",
    "statistics_table",
]
