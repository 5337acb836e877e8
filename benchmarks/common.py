"""Shared timing helpers of the benchmarks: wall time of optimizer steps after a warm-up."""

from __future__ import annotations

import tempfile
import time

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

WARMUP_STEPS = 20


class StepTimer(L.Callback):
    """Wall-clock start of every training batch, and the end of training."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.starts.append(time.perf_counter())

    def durations(self) -> list[float]:
        """Seconds of each step (from its start to the next one's: its callbacks included)."""
        return [b - a for a, b in zip(self.starts, self.starts[1:], strict=False)]


def step_durations(model: L.LightningModule, datamodule: L.LightningDataModule, steps: int, callbacks: list) -> list[float]:
    """Seconds of each optimizer step of ``model`` trained ``steps`` steps (TensorBoard logs in a
    temporary folder)."""
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            max_steps=steps,
            limit_val_batches=0,
            logger=TensorBoardLogger(logs),
            callbacks=[timer, *callbacks],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, datamodule=datamodule)
    return timer.durations()


def seconds_per_step(model: L.LightningModule, datamodule: L.LightningDataModule, steps: int, callbacks: list) -> float:
    """Mean seconds per optimizer step after ``WARMUP_STEPS`` (see :func:`step_durations`)."""
    durations = step_durations(model, datamodule, steps, callbacks)[WARMUP_STEPS:]
    return sum(durations) / len(durations)
