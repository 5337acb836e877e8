"""Shared timing helpers of the benchmarks: wall time of optimizer steps after a warm-up."""

from __future__ import annotations

import tempfile
import time

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger

WARMUP_STEPS = 20


class StepTimer(L.Callback):
    """Wall time from the start of step ``WARMUP_STEPS`` to the end of training."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == WARMUP_STEPS and not hasattr(self, "start"):
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.seconds = time.perf_counter() - self.start


def seconds_per_step(model: L.LightningModule, datamodule: L.LightningDataModule, steps: int, callbacks: list) -> float:
    """Train ``model`` for ``steps`` optimizer steps (TensorBoard logs in a temporary folder)."""
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
    return timer.seconds / (steps - WARMUP_STEPS)
