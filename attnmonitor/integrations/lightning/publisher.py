"""Where the Lightning adapter publishes: every logger of the Trainer (scalars to each; figures to
TensorBoard, W&B, MLflow and CSV loggers), and the progress bar."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from typing_extensions import override

from attnmonitor.loggers import CSVWriter, MLflowWriter, WandbWriter, combine
from attnmonitor.schedule import due
from attnmonitor.tensorboard import tags
from attnmonitor.tensorboard.writer import write_scalars

FIGURE_LOGGERS = (TensorBoardLogger, WandbLogger, MLFlowLogger, CSVLogger)


def figure_writer(logger: Logger) -> Any:
    """The writer of figures for a Lightning logger, or None for a logger that takes no figures."""
    if isinstance(logger, TensorBoardLogger):
        return logger.experiment
    if isinstance(logger, WandbLogger):
        return WandbWriter(logger.experiment, step_key="trainer/global_step")
    if isinstance(logger, MLFlowLogger):
        return MLflowWriter(logger.experiment, logger.run_id)
    if isinstance(logger, CSVLogger):
        return CSVWriter(logger.log_dir)
    return None


class LightningPublisher:
    """Scalars to every logger of a Trainer (as ``LearningRateMonitor`` does, so ``log_every_n_steps``
    cannot drop them) and to its callback metrics; figures to each of its TensorBoard, W&B, MLflow and CSV loggers on global rank zero."""

    step_offset = 0

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.device: torch.device = trainer.strategy.root_device
        self.tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        taking = [lg for lg in trainer.loggers if isinstance(lg, FIGURE_LOGGERS)]
        self.writer: Any = combine([figure_writer(lg) for lg in taking]) if trainer.is_global_zero else None
        names = [type(lg).__name__ for lg in trainer.loggers]
        self.figures_missing = (
            None if taking else f"none of the trainer's loggers {names} takes figures (TensorBoard, Wandb, MLFlow or CSV loggers do)."
        )

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """To every logger, and to ``trainer.callback_metrics`` / ``logged_metrics`` (every process: the
        values are already reduced), where ``EarlyStopping`` and ``ModelCheckpoint`` look."""
        metrics = {tag: torch.tensor(value) for tag, value in scalars.items()}
        self.trainer.callback_metrics.update(metrics)
        self.trainer.logged_metrics.update(metrics)
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # one event for all of them (its prefix applied)
                if self.trainer.is_global_zero:
                    write_scalars(logger.experiment, _add_prefix(scalars, logger._prefix, logger.LOGGER_JOIN_CHAR), step)
            else:
                logger.log_metrics(scalars, step=step)

    def logs_at(self, step: int) -> bool:
        """Lightning's own rule for ``self.log`` values (``log_every_n_steps``)."""
        return due(step, self.trainer.log_every_n_steps or None) or self.trainer.should_stop


class AttentionProgressBar(TQDMProgressBar):
    """Lightning's progress bar, with the monitor's last captured mean normalised entropy (``attn H``)
    beside the loss; a run bounded by ``max_steps`` shows its optimizer steps out of ``max_steps``
    (``Step 120/800``) instead of batches per epoch."""

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.max_steps <= 0:
            super().on_train_epoch_start(trainer, *args)
            return
        bar = self.train_progress_bar
        if bar.total != trainer.max_steps:  # the first epoch: one bar for the whole run
            bar.reset(total=trainer.max_steps)
            bar.initial = trainer.global_step  # a resumed run starts where it stopped
            bar.n = trainer.global_step
        bar.set_description(f"Step (epoch {trainer.current_epoch})")

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.max_steps <= 0:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        step = trainer.global_step
        if self._should_update(step, trainer.max_steps):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
            self.train_progress_bar.refresh()

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        from attnmonitor.integrations.lightning.callback import AttentionMonitor

        metrics = super().get_metrics(trainer, pl_module)
        monitor = next((c for c in trainer.callbacks if isinstance(c, AttentionMonitor)), None)  # type: ignore[attr-defined]
        value = None if monitor is None else monitor.engine.latest.get(tags.statistic("train", "normalized_entropy"))
        if value is not None:
            metrics["attn H"] = f"{value:.3f}"
        return metrics
