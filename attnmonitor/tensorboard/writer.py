"""Writing attention figures, histograms and text to a TensorBoard ``SummaryWriter``.

Tags follow ``attn/<stage>/...`` (see the README's table). Every function renders headless.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from attnmonitor.functional.analyses import ROLES
from attnmonitor.tensorboard.probe import ProbeAnalysis
from attnmonitor.tensorboard.render import attention_heatmaps, head_atlas, role_atlas, statistics_table


def write_atlases(writer: Any, stage: str, step: int, layers: Sequence[str], values: dict[str, Tensor], observed: Tensor) -> None:
    """One layers x heads atlas image per statistic, a histogram per layer, and the per-head table.

    Args:
        values: ``{statistic: [L, H]}`` means, NaN where a layer does not define the statistic
            (drawn blank); observed: bool ``[L, H]`` cells with data.
    """
    rows = observed.any(1).cpu()
    seen_layers = [layer for layer, seen in zip(layers, rows.tolist()) if seen]
    for name, grid in values.items():
        grid = grid.cpu()[rows]
        seen = observed.cpu()[rows] & ~grid.isnan()
        if not seen.any():
            continue
        writer.add_image(f"attn/{stage}/atlas/{name}", head_atlas(grid, seen, seen_layers, f"{stage} {name}"), step, dataformats="HWC")
        for layer, heads, mask in zip(seen_layers, grid, seen):
            if mask.any():
                writer.add_histogram(f"attn/{stage}/hist/{name}/{layer}", heads[mask], step)
    table = statistics_table({n: v.cpu()[rows] for n, v in values.items()}, observed.cpu()[rows], seen_layers)
    writer.add_text(f"attn/{stage}/table", table, step)


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
    """The heads of one layer on the example, ``probs`` ``[H, Tq, Tk]``; keys labelled by ``tokens``,
    queries by ``query_tokens`` (``tokens`` for self-attention; positions for cross-attention)."""
    if query_tokens is None and not cross:
        query_tokens = tokens
    kind = "cross-attention" if cross else "self-attention"
    image = attention_heatmaps(probs, tokens, f"{stage} {layer} ({kind}, example 0)", query_tokens=query_tokens)
    writer.add_image(f"attn/{stage}/heatmap/{layer}", image, step, dataformats="HWC")


def write_probe(
    writer: Any, stage: str, step: int, result: ProbeAnalysis, changes: Sequence[str], tokens: Sequence[str] | None
) -> None:
    """Role atlas and table, similarity atlas, interpretation tables, rollout and (validation) projector."""
    assert result.roles is not None and result.similarity is not None
    writer.add_image(f"attn/{stage}/roles", role_atlas(result.roles, ROLES, result.layers, f"{stage} head roles"), step, dataformats="HWC")
    heads = result.roles.shape[1]
    table = ["| layer | " + " | ".join(f"head {h}" for h in range(heads)) + " |", "|---|" + "---|" * heads]
    table += [f"| {layer} | " + " | ".join(ROLES[r] for r in row.tolist()) + " |" for layer, row in zip(result.layers, result.roles)]
    table += ["", "Changes since the last capture: " + ("; ".join(changes) if changes else "none")]
    writer.add_text(f"attn/{stage}/roles_table", "\n".join(table), step)
    observed = torch.ones_like(result.similarity, dtype=torch.bool)
    image = head_atlas(result.similarity, observed, result.layers, f"{stage} corr(cos similarity, attention)")
    writer.add_image(f"attn/{stage}/atlas/similarity_correlation", image, step, dataformats="HWC")
    for layer, text in result.interpretation.items():
        writer.add_text(f"attn/{stage}/interpretation/{layer}", text, step)
    if result.rollout is not None:
        image = attention_heatmaps(result.rollout[None], result.rollout_tokens, f"{stage} attention rollout")
        writer.add_image(f"attn/{stage}/rollout", image, step, dataformats="HWC")
    if result.embedding is not None and stage == "val":  # the projector only for the fixed probe
        vectors, metadata = result.embedding
        writer.add_embedding(vectors, metadata=metadata, metadata_header=["token", "layer"], tag=f"attn_{stage}_outputs", global_step=step)
