"""``AttentionMonitor``: the Lightning adapter of :class:`attnmonitor.engine.MonitorEngine`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from attnmonitor.alarms import act
from attnmonitor.config import MonitorOptions, as_options
from attnmonitor.engine import MonitorEngine
from attnmonitor.regularization.lightning import LossInjection
from attnmonitor.tensorboard import tags
from attnmonitor.tensorboard.writer import write_hparams, write_scalars


class AttentionMonitor(Callback):
    """Log how every attention layer and head distributes its attention, while training.

    Training captures every ``every_n_steps`` optimizer steps (every micro-batch of that step under
    gradient accumulation); validation captures the first ``val_batches`` batches of each run.
    Statistics are reduced exactly across processes and logged to every logger as
    ``attn/<train|val>/<statistic>`` (mean over layers and heads) and ``.../<statistic>/<layer>``;
    with a ``TensorBoardLogger`` also head atlases, histograms, heatmaps and a per-head table.
    With a regularizer, the penalty is added to the loss ``training_step`` returns (the monitor
    wraps it during ``fit``); the model itself is never changed.

    Args:
        options: a :class:`~attnmonitor.config.MonitorOptions` (or None); keyword arguments set or
            override its fields (``targets``, ``statistics``, ``every_n_steps``, ``heatmaps``,
            ``tokenizer``, ``regularizer``, ``clip``, ...: see :class:`~attnmonitor.config.MonitorOptions`).

    Raises:
        ValueError: for an invalid option (named in the message, with what is accepted); at
            ``setup``, before training starts, for options that need the model (``targets``, ``layers``).

    Example:
        >>> monitor = AttentionMonitor(statistics=["entropy", "sink_mass"], every_n_steps=10)
        >>> monitor.options.every_n_steps
        10
    """

    def __init__(self, options: MonitorOptions | None = None, /, **kwargs: Any) -> None:
        self.options = as_options(options, kwargs)
        self.engine = MonitorEngine(self.options)
        self._injection = LossInjection(self.engine.regularizer)
        self._publisher: LightningPublisher | None = None
        self._warned_no_writer = False

    @property
    @override
    def state_key(self) -> str:
        options = self.options
        return self._generate_state_key(targets=repr(options.targets), statistics=options.statistics, every_n_steps=options.every_n_steps)

    def penalty(self) -> Tensor:
        """The regularizer's penalty for the attention computed since the last call (0-dim tensor).

        Added to the loss automatically under automatic optimization; under manual optimization add
        it yourself: ``self.manual_backward(loss + monitor.penalty())``.
        """
        return self._injection.penalty()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._publisher = LightningPublisher(trainer)
        if self.engine.capture is None:
            self.engine.attach(pl_module)
            self._injection.attach(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.engine.detach()
        self._injection.detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    @override
    def state_dict(self) -> dict[str, Any]:
        alarms = self.engine.alarms
        return {"last_train_step": self.engine.last_train_step, **({"alarms": alarms.state_dict()} if alarms else {})}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.last_train_step = int(state_dict["last_train_step"])
        if self.engine.alarms is not None and "alarms" in state_dict:
            self.engine.alarms.load_state_dict(state_dict["alarms"])

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_steps == 0:
            rank_zero_warn("attnmonitor: `max_steps=0`: no training step will run, so nothing is captured.", category=RuntimeWarning)
        options = {"attnmonitor": self.options.loggable()}
        for logger in trainer.loggers:
            logger.log_hyperparams(options)
        writer = self._publisher.writer if self._publisher is not None else None
        if writer is not None:  # after Lightning logged the module's own: all of them, compared by the monitor's means
            logger = next(lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger))
            metrics = [tags.statistic(stage, name) for stage in ("train", "val") for name in self.options.statistics]
            write_hparams(writer, {**logger.hparams, **options}, metrics)
            writer.add_custom_scalars(tags.custom_scalar_layout(self.options.statistics))

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.engine.start_train_batch(trainer.global_step, batch)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        finished = self.engine.end_train_batch(trainer.global_step)
        self._injection.log(pl_module)
        if finished is not None:
            self._publish("train", finished, *self.engine.train_images(finished))
            if self.engine.firings:
                self._act_on_alarms(trainer, finished)

    @override
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if not trainer.sanity_checking and dataloader_idx == 0:
            self.engine.start_eval_batch(batch_idx, batch)

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.engine.end_eval_batch()

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self.options.val_batches:
            self._publish("val", _log_step(trainer), True, self.options.heatmaps is not None)

    def _act_on_alarms(self, trainer: pl.Trainer, step: int) -> None:
        """Warn about every firing; call the callables; save a checkpoint for ``"checkpoint"`` and
        ``"stop"``, then stop for ``"stop"``. Every process takes the same decisions (synced statistics)."""
        actions = act(self.engine.firings, lambda message: rank_zero_warn(message, category=RuntimeWarning))
        if actions:
            path = Path(trainer.log_dir or trainer.default_root_dir) / "alarm_checkpoints" / f"step={step}.ckpt"
            trainer.save_checkpoint(path)
            rank_zero_warn(f"attnmonitor: alarm checkpoint saved to {path}", category=RuntimeWarning)
        if "stop" in actions:
            trainer.should_stop = True
            rank_zero_warn(f"attnmonitor: an alarm with action 'stop' fired at step {step}: training stops.", category=RuntimeWarning)

    def _publish(self, stage: str, step: int, images: bool, heatmaps: bool) -> None:
        publisher = self._publisher
        assert publisher is not None, "setup() creates the publisher"
        if (images or heatmaps) and not publisher.has_tensorboard and not self._warned_no_writer:
            self._warned_no_writer = True
            names = [type(lg).__name__ for lg in publisher.trainer.loggers]
            message = f"attnmonitor: images skipped: no TensorBoardLogger among the trainer's loggers {names}."
            rank_zero_warn(message, category=RuntimeWarning)
        self.engine.publish(stage, step, publisher, images=images, heatmaps=heatmaps)


def _log_step(trainer: pl.Trainer) -> int:
    """The step Lightning's own ``self.log`` uses now (validation inside ``fit``: the last trained step)."""
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


class LightningPublisher:
    """Scalars to every logger of a Trainer (as ``LearningRateMonitor`` does, so ``log_every_n_steps``
    cannot drop them); figures to its ``TensorBoardLogger`` on global rank zero."""

    def __init__(self, trainer: pl.Trainer) -> None:
        self.trainer = trainer
        self.device: torch.device = trainer.strategy.root_device
        writer = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        self.has_tensorboard = writer is not None
        self.writer = writer if trainer.is_global_zero else None

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):  # one event for all of them (its prefix applied)
                if self.trainer.is_global_zero:
                    write_scalars(logger.experiment, _add_prefix(scalars, logger._prefix, logger.LOGGER_JOIN_CHAR), step)
            else:
                logger.log_metrics(scalars, step=step)


class AttentionProgressBar(TQDMProgressBar):
    """Lightning's progress bar, with the monitor's last captured mean normalised entropy (``attn H``)
    beside the loss."""

    @override
    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        monitor = next((c for c in trainer.callbacks if isinstance(c, AttentionMonitor)), None)  # type: ignore[attr-defined]
        value = None if monitor is None else monitor.engine.latest.get(tags.statistic("train", "normalized_entropy"))
        if value is not None:
            metrics["attn H"] = f"{value:.3f}"
        return metrics
