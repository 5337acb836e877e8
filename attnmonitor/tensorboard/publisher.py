"""``WriterPublisher``: what the engine publishes, to a TensorBoard ``SummaryWriter`` or the writers of
:mod:`attnmonitor.loggers` (the plain loop's publisher)."""

from __future__ import annotations

from typing import Any

import torch

from attnmonitor.loggers import combine
from attnmonitor.metrics.state import global_rank
from attnmonitor.schedule import due
from attnmonitor.tensorboard.writer import write_scalars


class WriterPublisher:
    """Scalars and figures to a writer on global rank zero (no writer elsewhere); keeps the scalars of
    the publication for the caller (another logger, a progress bar).

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter``, a writer of :mod:`attnmonitor.loggers`, or
            a list of them (None: scalars are only returned).
        device: device of the cross-process reduction.
        every_n_steps: the loop logs the regularizer's means at the steps it captures.
    """

    step_offset = 0

    def __init__(self, writer: Any, device: torch.device, every_n_steps: int) -> None:
        self.device, self.every_n_steps = device, every_n_steps
        if isinstance(writer, (list, tuple)):
            writer = combine(writer)
        self.writer = writer if global_rank() == 0 else None
        self.figures_missing = None if writer is not None else "no writer was passed to `log()` / `log_eval()`."
        self.scalars: dict[str, float] = {}

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        self.scalars.update(scalars)
        for writer in getattr(self.writer, "writers", [self.writer]):
            if hasattr(writer, "_get_file_writer"):  # a SummaryWriter
                write_scalars(writer, scalars, step)
            elif writer is not None:
                writer.log_scalars(scalars, step)

    def logs_at(self, step: int) -> bool:
        return due(step, self.every_n_steps)
