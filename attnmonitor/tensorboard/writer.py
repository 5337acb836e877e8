"""What the monitor publishes: scalar dictionaries for any logger, and figures, histograms and text
for a TensorBoard ``SummaryWriter``. Tags come from :mod:`attnmonitor.tensorboard.tags`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from attnmonitor.analysis.example import ExampleAnalysis
from attnmonitor.functional.analyses import ROLES
from attnmonitor.functional.statistics import MAX_STATISTICS
from attnmonitor.tensorboard import tags
from attnmonitor.tensorboard.render import attention_heatmap, head_atlas, role_atlas, statistics_table


def write_scalars(writer: Any, scalars: Mapping[str, float], step: int) -> None:
    """Write ``scalars`` at ``step`` as ONE event holding every value (readers see one series per
    tag, as with ``add_scalar``, which writes an event per scalar at several times the cost)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value)) for tag, value in scalars.items()])
    writer._get_file_writer().add_summary(summary, global_step=step)


def statistic_scalars(
    stage: str, layers: Sequence[str], values: Mapping[str, Tensor], observed: Tensor, per_head: bool = False
) -> dict[str, float]:
    """Means over layers and heads, per layer, and (``per_head``) per head, of every statistic; for
    the statistics reduced with max (``max_logit``), maxima over layers and heads and per layer.

    Args:
        values: ``{statistic: [L, H]}`` means (maxima), NaN where a layer does not define the statistic
            or saw no value.
        observed: bool ``[L, H]`` cells with data.
    """
    scalars: dict[str, float] = {}
    for name, grid in values.items():
        defined = observed & ~grid.isnan()
        if not defined.any():
            continue
        reduce = torch.amax if name in MAX_STATISTICS else torch.mean
        scalars[tags.statistic(stage, name)] = float(reduce(grid[defined]))
        for row, layer in enumerate(layers):
            heads = defined[row]
            if heads.any():
                scalars[tags.statistic(stage, name, layer)] = float(reduce(grid[row][heads]))
                if per_head:
                    for h in heads.nonzero().flatten().tolist():
                        scalars[tags.statistic(stage, name, layer, h)] = float(grid[row, h])
    return scalars


class ScalarLayout:
    """TensorBoard's custom-scalar layout (:func:`tags.custom_scalar_layout`) of the statistics and
    layers logged so far, written again to each ``SummaryWriter`` among a publisher's writers when a
    chart is added (TensorBoard shows the latest layout)."""

    def __init__(self) -> None:
        self.charts: dict[str, list[str]] = {}

    def update(self, writer: Any, layers: Sequence[str], values: Mapping[str, Tensor], observed: Tensor) -> None:
        """Add a chart per (statistic, layer) defined in ``values`` (``[L, H]``, NaN: undefined)."""
        added = False
        for name, grid in values.items():
            defined = (observed & ~grid.isnan()).any(1).tolist()
            for layer, logged in zip(layers, defined, strict=True):
                if logged and layer not in self.charts.setdefault(name, []):
                    self.charts[name].append(layer)
                    added = True
        if added:
            layout = tags.custom_scalar_layout({name: found for name, found in self.charts.items() if found})
            for each in getattr(writer, "writers", [writer]):
                if hasattr(each, "add_custom_scalars"):
                    each.add_custom_scalars(layout)


def alignment_scalars(stage: str, counts: Mapping[str, Tensor]) -> dict[str, float]:
    """Alignment accuracy per layer from ``{layer: [correct, counted]}``, and that of the best layer."""
    accuracy = {layer: float(c[0] / c[1]) for layer, c in counts.items() if c[1] > 0}
    if not accuracy:
        return {}
    return {tags.alignment(stage): max(accuracy.values()), **{tags.alignment(stage, k): v for k, v in accuracy.items()}}


def example_scalars(stage: str, result: ExampleAnalysis) -> dict[str, float]:
    """The example analyses' per-layer scalars."""
    return {tags.example(stage, analysis, layer): value for (analysis, layer), value in result.scalars.items()}


BOUNDED = frozenset({"normalized_entropy", "max_weight", "sparsity", "self_weight", "prev_token_weight", "next_token_weight", "sink_mass"})
"""Statistics in [0, 1]: their atlases use a fixed colour scale, comparable across steps."""


def write_atlases(writer: Any, stage: str, step: int, layers: Sequence[str], values: Mapping[str, Tensor], observed: Tensor) -> None:
    """One layers x heads atlas image per statistic, a histogram per layer, and the per-head table.

    Statistics in [0, 1] are drawn on a fixed [0, 1] scale, the others (``max_logit``: logits) on a
    scale fitted to the step's values; a statistic that no layer defines (NaN everywhere: the
    next-token weight of causal attention) gets no atlas and no table column, and the table says so.

    Args:
        values: ``{statistic: [L, H]}`` means, NaN where a layer does not define the statistic
            (drawn blank); observed: bool ``[L, H]`` cells with data.
    """
    rows = observed.any(1).cpu()
    seen_layers = [layer for layer, seen in zip(layers, rows.tolist(), strict=True) if seen]
    shown: dict[str, Tensor] = {}
    for name, grid in values.items():
        grid = grid.cpu()[rows]
        seen = observed.cpu()[rows] & ~grid.isnan()
        if not seen.any():
            continue
        shown[name] = grid
        value_range = (0.0, 1.0) if name in BOUNDED else None
        image = head_atlas(grid, seen, seen_layers, f"{stage} {name}", value_range)
        writer.add_image(tags.atlas(stage, name), image, step, dataformats="HWC")
        for layer, heads, mask in zip(seen_layers, grid, seen, strict=True):
            if mask.any():
                writer.add_histogram(tags.histogram(stage, name, layer), heads[mask], step)
    table = statistics_table(shown, observed.cpu()[rows], seen_layers)
    if hidden := [name for name in values if name not in shown]:
        table += f"\n\nNot shown: {', '.join(hidden)} (no layer defines it here, e.g. causal attention never sees the next token)."
    writer.add_text(tags.table(stage), table, step)


def write_heatmap(
    writer: Any,
    stage: str,
    step: int,
    layer: str,
    probs: Tensor,
    tokens: Sequence[str] | None,
    query_tokens: Sequence[str] | None = None,
    cross: bool = False,
) -> None:
    """One image per head of a layer on the example, ``probs`` ``[H, Tq, Tk]``, on the colour scale of the
    layer's largest weight; keys labelled by ``tokens`` (None: positions), queries by ``query_tokens``
    (``tokens`` for self-attention; positions for cross-attention)."""
    if query_tokens is None:
        query_tokens = [f"q{i}" for i in range(probs.shape[1])] if cross else tokens
    kind = "cross-attention" if cross else "self-attention"
    vmax = float(probs.max())
    for head, head_probs in enumerate(probs):
        title = f"{stage} {layer} head {head} ({kind})"
        image = attention_heatmap(head_probs, tokens, query_tokens, title, vmax=vmax)
        writer.add_image(tags.heatmap(stage, layer, head), image, step, dataformats="HWC")


def write_example(writer: Any, stage: str, step: int, result: ExampleAnalysis, changes: Sequence[str]) -> None:
    """Role atlas and table, similarity atlas, interpretation tables, rollout and (validation) projector."""
    assert result.roles is not None and result.similarity is not None
    writer.add_image(tags.roles(stage), role_atlas(result.roles, ROLES, result.layers, f"{stage} head roles"), step, dataformats="HWC")
    heads = result.roles.shape[1]
    table = ["| layer | " + " | ".join(f"head {h}" for h in range(heads)) + " |", "|---|" + "---|" * heads]
    for layer, row in zip(result.layers, result.roles, strict=True):
        table.append(f"| {layer} | " + " | ".join(ROLES[r] for r in row.tolist()) + " |")
    table += ["", "Changes since the last capture: " + ("; ".join(changes) if changes else "none")]
    writer.add_text(tags.roles_table(stage), "\n".join(table), step)
    observed = torch.ones_like(result.similarity, dtype=torch.bool)
    image = head_atlas(result.similarity, observed, result.layers, f"{stage} corr(cos similarity, attention)")
    writer.add_image(tags.similarity_atlas(stage), image, step, dataformats="HWC")
    for layer, text in result.interpretation.items():
        writer.add_text(tags.interpretation(stage, layer), text, step)
    if result.rollout is not None:
        title = f"{stage} attention rollout through {len(result.rollout_layers)} layers"
        tokens = result.rollout_tokens
        image = attention_heatmap(result.rollout, tokens, tokens, f"{title} (mean over heads, + identity)")
        writer.add_image(tags.rollout(stage), image, step, dataformats="HWC")
    if result.embedding is not None and stage == "val" and hasattr(writer, "add_embedding"):  # TensorBoard's projector, validation only
        vectors, metadata = result.embedding
        writer.add_embedding(vectors, metadata=metadata, metadata_header=["token", "layer"], tag=tags.projector(stage), global_step=step)


def write_hparams(writer: Any, params: Mapping[str, Any], metrics: Sequence[str]) -> None:
    """The HParams tab's entry for this run: ``params`` (nested mappings flattened with ``/``) and the
    names of the scalars it compares runs by (their values are the logged scalars themselves)."""
    from torch.utils.tensorboard.summary import hparams

    flat = {key: value if isinstance(value, (bool, int, float, str)) else str(value) for key, value in _flatten(params).items()}
    experiment, start, end = hparams(flat, {name: 0.0 for name in metrics})
    file_writer = writer._get_file_writer()
    for summary in (experiment, start, end):
        file_writer.add_summary(summary)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}/"))
        else:
            flat[name] = value
    return flat
