"""Headless rendering of attention figures to RGB arrays (matplotlib's object API on Agg: no pyplot state)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor


def _rgb(fig: Figure) -> np.ndarray:
    """``[H, W, 3]`` uint8 pixels of a figure."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def head_atlas(values: Tensor, observed: Tensor, layers: Sequence[str], title: str) -> np.ndarray:
    """Layers x heads grid of one statistic, colour-mapped with a colour bar.

    Args:
        values: ``[L, H]`` per-head means.
        observed: bool ``[L, H]``: cells with data (others are drawn blank).
        layers: ``L`` row labels.
        title: figure title (the statistic).

    Returns:
        ``[height, width, 3]`` uint8 image.
    """
    grid = np.ma.masked_array(values.detach().float().cpu().numpy(), mask=~observed.cpu().numpy())
    n_layers, n_heads = grid.shape
    fig = Figure(figsize=(1.6 + 0.45 * n_heads, 1.0 + 0.35 * n_layers), dpi=90)
    ax = fig.add_subplot()
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("head", fontsize=8)
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers), labels=list(layers))
    ax.tick_params(labelsize=7)
    if n_layers * n_heads <= 144:
        for (row, col), value in np.ndenumerate(grid.filled(np.nan)):
            if not math.isnan(value):
                ax.text(col, row, f"{value:.2g}", ha="center", va="center", fontsize=6, color="w")
    fig.tight_layout()
    return _rgb(fig)


def attention_heatmaps(probs: Tensor, tokens: Sequence[str] | None, title: str) -> np.ndarray:
    """Each head's ``[T, T]`` attention of one example, tiled, with token labels when given.

    Args:
        probs: ``[H, T, T]`` probabilities (rows: queries, columns: keys).
        tokens: ``T`` labels, or None for positions.
        title: figure title (the layer).

    Returns:
        ``[height, width, 3]`` uint8 image.
    """
    heads, t, _ = probs.shape
    cols = min(heads, 4)
    rows = math.ceil(heads / cols)
    side = max(2.2, 0.16 * t)
    fig = Figure(figsize=(side * cols, side * rows + 0.4), dpi=80)
    fig.suptitle(title, fontsize=10)
    labelled = tokens is not None and t <= 64
    vmax = max(float(probs.max()), 1e-6)  # one colour scale for every head of the layer
    for h in range(heads):
        ax = fig.add_subplot(rows, cols, h + 1)
        ax.imshow(probs[h].float().cpu().numpy(), cmap="magma", vmin=0.0, vmax=vmax)
        ax.set_title(f"head {h}", fontsize=8)
        if labelled:
            assert tokens is not None
            ax.set_xticks(range(t), labels=list(tokens), rotation=90, fontsize=5)
            ax.set_yticks(range(t), labels=list(tokens), fontsize=5)
        else:
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    return _rgb(fig)


def statistics_table(values: dict[str, Tensor], observed: Tensor, layers: Sequence[str]) -> str:
    """Markdown table, one row per (layer, head) with data, one column per statistic."""
    names = list(values)
    lines = ["| layer | head | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row, layer in enumerate(layers):
        for head in range(observed.shape[1]):
            if observed[row, head]:
                cells = " | ".join(f"{float(values[n][row, head]):.4g}" for n in names)
                lines.append(f"| {layer} | {head} | {cells} |")
    return "\n".join(lines)
