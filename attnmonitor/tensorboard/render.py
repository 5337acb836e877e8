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


def head_atlas(
    values: Tensor, observed: Tensor, layers: Sequence[str], title: str, value_range: tuple[float, float] | None = None
) -> np.ndarray:
    """Layers x heads grid of one statistic, colour-mapped with a colour bar.

    Args:
        values: ``[L, H]`` per-head means.
        observed: bool ``[L, H]``: cells with data (others are drawn blank).
        layers: ``L`` row labels.
        title: figure title (the statistic).
        value_range: fixed ``(min, max)`` of the colour scale, so that atlases of different steps
            compare (quantities in [0, 1]); None scales to the data (stated on the colour bar).

    Returns:
        ``[height, width, 3]`` uint8 image.
    """
    grid = np.ma.masked_array(values.detach().float().cpu().numpy(), mask=~observed.cpu().numpy())
    vmin, vmax = value_range if value_range is not None else (None, None)
    n_layers, n_heads = grid.shape
    label_width = 0.06 * max(len(name) for name in layers) + 0.2  # inches for the layer names
    width, height = label_width + 1.2 + 0.45 * n_heads, 0.9 + 0.35 * n_layers
    fig = Figure(figsize=(width, height), dpi=90)
    ax = fig.add_axes((label_width / width, 0.45 / height, 0.45 * n_heads / width, 0.35 * n_layers / height))
    image = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
    colorbar_axes = fig.add_axes(((label_width + 0.45 * n_heads + 0.1) / width, 0.45 / height, 0.12 / width, 0.35 * n_layers / height))
    fig.colorbar(image, cax=colorbar_axes)
    colorbar_axes.tick_params(labelsize=7)
    colorbar_axes.set_ylabel("fixed scale" if value_range is not None else "scaled to this step", fontsize=6)
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


PANEL_PIXELS, CELL_PIXELS, LABEL_CHARACTERS, DPI = 240, (7, 16), 10, 100
"""A heatmap's matrix spans about ``PANEL_PIXELS`` (cells of 7 to 16 px: 10 px for 24 tokens), so that
with its labels and colour bar the image fits a card of TensorBoard's Images tab (about 350 px in a
1600 px window) at its own size; labels are cut to ``LABEL_CHARACTERS``."""


def attention_heatmap(
    probs: Tensor, keys: Sequence[str] | None, queries: Sequence[str] | None, title: str, vmax: float | None = None
) -> np.ndarray:
    """One head's ``[Tq, Tk]`` attention as a heatmap, every query and key labelled, with a colour bar.

    Args:
        probs: ``[Tq, Tk]`` probabilities (rows: queries, columns: keys).
        keys: ``Tk`` key labels. queries: ``Tq`` query labels (either None: positions).
        title: what the figure shows (layer, head, stage).
        vmax: top of the colour scale, [0, vmax] (default: the largest weight), e.g. shared by the
            heads of a layer.

    Returns:
        ``[height, width, 3]`` uint8 image, about 350 px wide for 24 tokens.
    """
    tq, tk = probs.shape
    cell = min(max(PANEL_PIXELS / max(tq, tk), CELL_PIXELS[0]), CELL_PIXELS[1]) / DPI  # inches
    font = min(7.0, 0.6 * cell * DPI)  # points: about 0.8 of a cell high
    keys = [_short(x) for x in keys[:tk]] if keys is not None else [str(i) for i in range(tk)]
    queries = [_short(x) for x in queries[:tq]] if queries is not None else [str(i) for i in range(tq)]
    label = 0.1 + font / 72 * 0.62 * max(len(x) for x in [*keys, *queries, "0"])  # inches of the longest label
    panel_w, panel_h = cell * tk, cell * tq
    width, height = label + panel_w + 0.55, label + panel_h + 0.3
    fig = Figure(figsize=(width, height), dpi=DPI)
    ax = fig.add_axes((label / width, label / height, panel_w / width, panel_h / height))
    top = float(probs.max()) if vmax is None else vmax
    image = ax.imshow(probs.float().cpu().numpy(), cmap="magma", vmin=0.0, vmax=max(top, 1e-6), interpolation="nearest", aspect="auto")
    ax.set_title(title, fontsize=8, pad=3)
    ax.set_yticks(range(tq), labels=queries, fontsize=font)
    ax.set_xticks(range(tk), labels=keys, fontsize=font, rotation=90)
    ax.tick_params(length=1, pad=1)
    ax.set_ylabel("query", fontsize=7, labelpad=1)
    colorbar = fig.add_axes(((label + panel_w + 0.08) / width, label / height, 0.08 / width, panel_h / height))
    fig.colorbar(image, cax=colorbar)
    colorbar.tick_params(labelsize=6)
    return _rgb(fig)


def _short(token: str) -> str:
    return token if len(token) <= LABEL_CHARACTERS else token[: LABEL_CHARACTERS - 1] + "…"


SHORT_NAMES = {
    "entropy": "H",
    "normalized_entropy": "H/Hmax",
    "max_weight": "max w",
    "sparsity": "sparse",
    "effective_support": "support",
    "distance": "dist",
    "self_weight": "self",
    "prev_token_weight": "prev",
    "next_token_weight": "next",
    "sink_mass": "sink",
    "max_logit": "logit",
}
"""Column headers of the per-head table (its legend gives the full names)."""


def statistics_table(values: dict[str, Tensor], observed: Tensor, layers: Sequence[str]) -> str:
    """Markdown table, one row per (layer, head) with data, one column per statistic under a short
    header (a legend below names them), every value with a fixed number of decimals (NaN, a
    statistic the layer does not define, is shown as "–")."""
    names = list(values)
    header = [SHORT_NAMES.get(n, n) for n in names]
    lines = ["| layer | head | " + " | ".join(header) + " |", "|---|--:|" + "--:|" * len(names)]
    for row, layer in enumerate(layers):
        for head in range(observed.shape[1]):
            if observed[row, head]:
                cells = " | ".join(_cell(float(values[n][row, head])) for n in names)
                lines.append(f"| {layer} | {head} | {cells} |")
    legend = ", ".join(f"{SHORT_NAMES[n]}: {n}" for n in names if n in SHORT_NAMES)
    return "\n".join(lines) + (f"\n\n{legend}" if legend else "")


def _cell(value: float) -> str:
    """A value in at most 7 characters: 3 decimals below 100, none above, powers of ten beyond 10⁵."""
    if math.isnan(value):
        return "–"
    if abs(value) < 100:
        return f"{value:.3f}"
    return f"{value:.0f}" if abs(value) < 1e5 else f"{value:.1e}"


def role_atlas(roles: Tensor, names: Sequence[str], layers: Sequence[str], title: str) -> np.ndarray:
    """Layers x heads grid of categorical head roles, each cell labelled with its role.

    Args:
        roles: ``[L, H]`` indices into ``names``.
        names: role names.
        layers: ``L`` row labels.
    """
    from matplotlib import colormaps
    from matplotlib.colors import ListedColormap

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
