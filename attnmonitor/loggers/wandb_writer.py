"""Figures to a Weights & Biases run."""

from __future__ import annotations

import re
from typing import Any

import numpy as np


class WandbWriter:
    """Images as ``wandb.Image``, histograms as ``wandb.Histogram``, Markdown tables as sortable
    ``wandb.Table`` (numbers as numbers) and the whole text as ``wandb.Html`` under ``<tag>/text``, each
    logged with the training step under ``step_key``, as the framework logs its scalars.

    Args:
        run: a ``wandb`` run (``wandb.init()``, ``WandbLogger.experiment``).
        step_key: the metric holding the step: ``"trainer/global_step"`` (Lightning's ``WandbLogger``),
            ``"train/global_step"`` (Hugging Face); None: W&B's own ``step=`` (the plain loop: steps
            must then increase).
    """

    def __init__(self, run: Any, step_key: str | None = None) -> None:
        self.run, self.step_key = run, step_key

    def _log(self, values: dict[str, Any], step: int) -> None:
        if self.step_key is None:
            self.run.log(values, step=step)
        else:
            self.run.log({**values, self.step_key: step})

    def add_image(self, tag: str, img_tensor: Any, global_step: int, dataformats: str = "HWC") -> None:
        """``img_tensor``: ``[H, W, 3]`` uint8 (the monitor's figures)."""
        import wandb

        self._log({tag: wandb.Image(np.asarray(img_tensor))}, global_step)

    def add_histogram(self, tag: str, values: Any, global_step: int) -> None:
        import wandb

        self._log({tag: wandb.Histogram(np.asarray(values, dtype=np.float64))}, global_step)

    def add_text(self, tag: str, text_string: str, global_step: int) -> None:
        """The Markdown's table (if any) as a ``wandb.Table``, and the text rendered to HTML as
        TensorBoard renders it (under ``<tag>/text`` beside a table, else under ``tag``)."""
        import wandb
        from tensorboard.plugin_util import markdown_to_safe_html

        html = wandb.Html(markdown_to_safe_html(text_string))
        table = markdown_table(text_string)
        if table is None:
            self._log({tag: html}, global_step)
        else:
            columns, rows = table
            self._log({tag: wandb.Table(columns=columns, data=rows), f"{tag}/text": html}, global_step)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """The plain loop's scalars (the Lightning and Hugging Face loggers log their own)."""
        self._log(dict(scalars), step)

    def flush(self) -> None:
        """W&B sends in the background: nothing to do."""


_CELL_SEPARATOR = re.compile(r"(?<!\\)\|")
_ESCAPE = re.compile(r"\\(.)")


def markdown_table(text: str) -> tuple[list[str], list[list[Any]]] | None:
    """``(columns, rows)`` of the first Markdown table in ``text`` (escaped characters restored; a
    column whose cells are all numbers or "–" as floats and None, so that it sorts), or None when it
    has none."""
    lines = [line.strip() for line in text.splitlines()]
    start = next((i for i, line in enumerate(lines[:-1]) if line.startswith("|") and set(lines[i + 1]) <= set("|-: ")), None)
    if start is None:
        return None
    block = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        block.append([_ESCAPE.sub(r"\1", cell.strip()) for cell in _CELL_SEPARATOR.split(line.strip("|"))])
    columns, rows = block[0], block[2:]
    numeric = [all(_number(row[i]) is not _NOT_A_NUMBER for row in rows) for i in range(len(columns))]
    return columns, [[_number(cell) if numeric[i] else cell for i, cell in enumerate(row)] for row in rows]


_NOT_A_NUMBER = object()


def _number(cell: str) -> Any:
    if cell == "–":
        return None
    try:
        return float(cell)
    except ValueError:
        return _NOT_A_NUMBER
