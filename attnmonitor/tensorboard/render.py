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
    label_width = 0.06 * max(len(name) for name in layers) + 0.2  # inches for the layer names
    width, height = label_width + 1.2 + 0.45 * n_heads, 0.9 + 0.35 * n_layers
    fig = Figure(figsize=(width, height), dpi=90)
    ax = fig.add_axes((label_width / width, 0.45 / height, 0.45 * n_heads / width, 0.35 * n_layers / height))
    image = ax.imshow(grid, cmap="viridis", aspect="auto", interpolation="nearest")
    colorbar_axes = fig.add_axes(((label_width + 0.45 * n_heads + 0.1) / width, 0.45 / height, 0.12 / width, 0.35 * n_layers / height))
    fig.colorbar(image, cax=colorbar_axes)
    colorbar_axes.tick_params(labelsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("head", fontsize=8, labelpad=1)
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers), labels=list(layers))
    ax.tick_params(labelsize=7)
    if n_layers * n_heads <= 144:
        for (row, col), value in np.ndenumerate(grid.filled(np.nan)):
            if not math.isnan(value):
                ax.text(col, row, f"{value:.2g}", ha="center", va="center", fontsize=6, color="w")
    return _rgb(fig)


def attention_heatmaps(
    probs: Tensor, tokens: Sequence[str] | None, title: str, query_tokens: Sequence[str] | None = None
) -> np.ndarray:
    """Each head's ``[T, T]`` attention of one example, tiled side by side, with token labels when given.

    Args:
        probs: ``[H, T, T]`` probabilities (rows: queries, columns: keys).
        tokens: ``T`` key labels, or None for positions.
        title: figure title (the layer).
        query_tokens: ``T`` query labels (default: ``tokens``, as in self-attention).

    Returns:
        ``[height, width, 3]`` uint8 image.
    """
    heads, t, _ = probs.shape
    gap = 1
    mosaic = np.full((t, heads * (t + gap) - gap), np.nan)  # one axes for all heads: far cheaper to draw
    for h in range(heads):
        mosaic[:, h * (t + gap) : h * (t + gap) + t] = probs[h].float().cpu().numpy()
    side = max(2.0, 0.11 * t)
    width, height = max(0.9 + side * heads, 5.0), side + 0.9  # wide enough for the title
    fig = Figure(figsize=(width, height), dpi=90)
    ax = fig.add_axes((0.6 / width, 0.55 / height, side * heads / width, side / height))
    ax.imshow(mosaic, cmap="magma", vmin=0.0, vmax=max(float(probs.max()), 1e-6), interpolation="nearest", aspect="auto")
    fig.suptitle(f"{title}: rows (queries) attend to columns (keys)", fontsize=8)
    labels = list(tokens) if tokens is not None else [str(i) for i in range(t)]
    row_labels = list(query_tokens) if query_tokens is not None else (labels if tokens is not None else [f"q{i}" for i in range(t)])
    step = 1 if t <= 64 else math.ceil(t / 64)
    ax.set_xticks([])
    ax.set_yticks([])
    # plain text labels (a matplotlib tick costs ~1 ms, a text ~0.2 ms); key labels under the first head only
    for i in range(0, t, step):
        ax.text(-1, i, row_labels[i], ha="right", va="center", fontsize=4.5)
        ax.text(i, t, labels[i], ha="center", va="top", fontsize=4.5, rotation=90)
    for h in range(heads):
        ax.text(h * (t + gap) + t / 2, -0.8, f"head {h}", ha="center", va="bottom", fontsize=6)
    return _rgb(fig)


def statistics_table(values: dict[str, Tensor], observed: Tensor, layers: Sequence[str]) -> str:
    """Markdown table, one row per (layer, head) with data, one column per statistic (NaN, a statistic
    the layer does not define, is shown as "–")."""
    names = list(values)
    lines = ["| layer | head | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for row, layer in enumerate(layers):
        for head in range(observed.shape[1]):
            if observed[row, head]:
                cells = " | ".join(_cell(float(values[n][row, head])) for n in names)
                lines.append(f"| {layer} | {head} | {cells} |")
    return "\n".join(lines)


def _cell(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.4g}"


def role_atlas(roles: Tensor, names: Sequence[str], layers: Sequence[str], title: str) -> np.ndarray:
    """Layers x heads grid of categorical head roles, each cell labelled with its role.

    Args:
        roles: ``[L, H]`` indices into ``names``.
        names: role names.
        layers: ``L`` row labels.
    """
    from matplotlib.colors import ListedColormap
    from matplotlib import colormaps

    grid = roles.cpu().numpy()
    n_layers, n_heads = grid.shape
    label_width = 0.06 * max(len(name) for name in layers) + 0.2
    width, height = label_width + 0.3 + 0.75 * n_heads, 0.9 + 0.35 * n_layers
    fig = Figure(figsize=(width, height), dpi=90)
    ax = fig.add_axes((label_width / width, 0.45 / height, 0.75 * n_heads / width, 0.35 * n_layers / height))
    palette = ListedColormap(colormaps["tab10"].colors[: len(names)])
    ax.imshow(grid, cmap=palette, vmin=-0.5, vmax=len(names) - 0.5, aspect="auto", interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("head", fontsize=8, labelpad=1)
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(n_layers), labels=list(layers))
    ax.tick_params(labelsize=7)
    for (row, col), value in np.ndenumerate(grid):
        ax.text(col, row, names[value].replace("_token", "").replace("previous", "prev"), ha="center", va="center", fontsize=6)
    return _rgb(fig)
