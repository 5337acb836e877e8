"""Figures to a Weights & Biases run."""

from __future__ import annotations

from typing import Any

import numpy as np


class WandbWriter:
    """Images as ``wandb.Image``, histograms as ``wandb.Histogram``, Markdown tables as ``wandb.Html``,
    each logged with the training step under ``step_key``, as the framework logs its scalars.

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
        """Markdown, rendered to HTML as TensorBoard renders it."""
        import wandb
        from tensorboard.plugin_util import markdown_to_safe_html

        self._log({tag: wandb.Html(markdown_to_safe_html(text_string))}, global_step)

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """The plain loop's scalars (the Lightning and Hugging Face loggers log their own)."""
        self._log(dict(scalars), step)

    def flush(self) -> None:
        """W&B sends in the background: nothing to do."""
