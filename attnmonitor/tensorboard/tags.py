"""Every tag the monitor logs, in one place.

TensorBoard groups charts by the first path component, so each kind of chart has its own group:

- ``attn_<stage>/``: per statistic, the mean over layers and heads (``max_logit``: the maximum);
  atlases, the table;
- ``attn_<stage>_layers/``: per statistic and layer, mean (``max_logit``: maximum) over its heads
  (``attn_<stage>_heads/``: per head;
  ``attn_<stage>_hist/``: histograms of a layer's heads);
- ``attn_<stage>_heatmap/``: each head's attention over the example's tokens;
- ``attn_<stage>_example/``: analyses of the example (the batch row with the most distinct tokens);
- ``attn_reg/``: the regularizer's terms and clipping; ``attn_health/``: skipped captures.

``<stage>`` is ``train`` or ``val``; the alarms' group, ``attn_train_alarm/``, sorts after the training
means. The custom-scalar layout (:func:`custom_scalar_layout`) has a chart per statistic and layer,
train and validation on it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence


def statistic(stage: str, name: str, layer: str | None = None, head: int | None = None) -> str:
    """Mean over layers and heads (``attn_<stage>/<statistic>``; maximum for ``max_logit``), a layer's
    (over its heads), or a head's."""
    if layer is None:
        return f"attn_{stage}/{name}"
    if head is None:
        return f"attn_{stage}_layers/{name}/{layer}"
    return f"attn_{stage}_heads/{name}/{layer}/head_{head}"


def atlas(stage: str, name: str) -> str:
    """Image: layers x heads grid of one statistic."""
    return f"attn_{stage}/atlas/{name}"


def histogram(stage: str, name: str, layer: str) -> str:
    """Histogram of one layer's per-head values of a statistic."""
    return f"attn_{stage}_hist/{name}/{layer}"


def heatmap(stage: str, layer: str, head: int) -> str:
    """Image: one head's attention over the example's tokens (a card per head, in its own group)."""
    return f"attn_{stage}_heatmap/{layer}/head_{head}"


def table(stage: str) -> str:
    """Text: every statistic per (layer, head)."""
    return f"attn_{stage}/table"


def alignment(stage: str, layer: str | None = None) -> str:
    """Alignment accuracy of a layer, or (no layer) of the best-aligned layer."""
    return statistic(stage, "alignment_accuracy", layer)


def example(stage: str, analysis: str, layer: str | None = None) -> str:
    """``attn_<stage>_example/<analysis>[/<layer>]``: analyses of the example (the batch row with the most distinct tokens)."""
    return f"attn_{stage}_example/{analysis}" + (f"/{layer}" if layer is not None else "")


def roles(stage: str) -> str:
    """Image: head-role atlas of the example."""
    return example(stage, "roles")


def roles_table(stage: str) -> str:
    """Text: head roles and their changes."""
    return example(stage, "roles_table")


def role_changes(stage: str) -> str:
    """Scalar: number of heads whose role changed since the last capture."""
    return example(stage, "role_changes")


def interpretation(stage: str, layer: str) -> str:
    """Text: each query's top-k keys, entropy and self weight."""
    return example(stage, "interpretation", layer)


def rollout(stage: str) -> str:
    """Image: attention rollout through the first sequence's self-attention layers."""
    return example(stage, "rollout")


def similarity_atlas(stage: str) -> str:
    """Image: per-head correlation of cosine similarity and attention."""
    return example(stage, "similarity_correlation")


def projector(stage: str) -> str:
    """Embedding projector tag (no slashes: TensorBoard uses it as a folder name)."""
    return f"attn_{stage}_outputs"


def skipped() -> str:
    """Scalar: captures skipped since the start (non-finite attention, ...)."""
    return "attn_health/skipped_captures"


def regularization(term: str) -> str:
    """``attn_reg/<term>``: ``entropy``, ``sparsity``, ``penalty``, ``clip_fraction``."""
    return f"attn_reg/{term}"


def custom_scalar_layout(layers_by_statistic: Mapping[str, Sequence[str]]) -> dict[str, dict[str, list]]:
    """TensorBoard custom-scalar layout (``SummaryWriter.add_custom_scalars``): the means over layers and
    heads, one chart per statistic, first; then one category per statistic with a chart per layer,
    each holding that layer's train and validation curves (two lines, not a bundle of look-alikes).

    Args:
        layers_by_statistic: ``{statistic: layers that log it}``, in display order.
    """
    means = {name: ["Multiline", [f"^attn_(train|val)/{name}$"]] for name in layers_by_statistic}
    layout = {"attention, mean over layers and heads": means}
    for name, layers in layers_by_statistic.items():
        charts = {layer: ["Multiline", [f"^attn_(train|val)_layers/{name}/{re.escape(layer)}$"]] for layer in layers}
        layout[f"{name} by layer (train and val)"] = charts
    return layout
