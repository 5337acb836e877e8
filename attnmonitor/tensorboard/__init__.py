"""Publishing: tags, scalar dictionaries, rendered figures and tables, written to TensorBoard."""

from attnmonitor.tensorboard.render import attention_heatmap, head_atlas, role_atlas, statistics_table

__all__ = ["attention_heatmap", "head_atlas", "role_atlas", "statistics_table"]
