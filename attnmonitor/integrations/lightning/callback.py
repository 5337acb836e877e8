"""``AttentionMonitor``: the Lightning adapter of :class:`attnmonitor.engine.MonitorEngine`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from attnmonitor.alarms import Actions
from attnmonitor.alarms.report import logger
from attnmonitor.config import MonitorOptions, as_options
from attnmonitor.engine import MonitorEngine
from attnmonitor.integrations.lightning.loss import TrainingStepWrapper
from attnmonitor.integrations.lightning.publisher import LightningPublisher
from attnmonitor.tensorboard import tags
from attnmonitor.tensorboard.writer import write_hparams


class AttentionMonitor(Callback):
    """Log how every attention layer and head distributes its attention, while training.

    Training captures every ``every_n_steps`` optimizer steps (every micro-batch of that step under
    gradient accumulation); validation captures the first ``val_batches`` batches of each run.
    Statistics are reduced exactly across processes and logged to every logger as
    ``attn_<train|val>/<statistic>`` (mean over layers and heads) and ``.../<statistic>/<layer>``;
    with a TensorBoard, W&B, MLflow or CSV logger also head atlases, histograms, heatmaps and tables.
    With a regularizer, the penalty is added to the loss ``training_step`` returns (the monitor
    wraps it during ``fit``); the model itself is never changed.

    Args:
        options: a :class:`~attnmonitor.config.MonitorOptions` (or None); keyword arguments set or
            override its fields (see :class:`~attnmonitor.config.MonitorOptions`).

    Raises:
        ValueError: for an invalid option (named in the message, with what is accepted); at
            ``setup``, before training starts, for options that need the model (``targets``, ``layers``).

    Example:
        >>> monitor = AttentionMonitor(capture={"statistics": ["entropy", "sink_mass"]}, schedule={"every_n_steps": 10})
        >>> monitor.options.schedule.every_n_steps
        10
    """

    def __init__(self, options: MonitorOptions | None = None, /, **kwargs: Any) -> None:
        self.options = as_options(options, kwargs)
        self.engine = MonitorEngine(self.options)
        self._wrapper = TrainingStepWrapper(self.engine.penalty.penalty)
        self._publisher: LightningPublisher | None = None

    @property
    @override
    def state_key(self) -> str:
        # what tells two monitors of one Trainer apart; not the intervals, so a resume may change them
        return self._generate_state_key(targets=repr(self.options.capture.targets))

    def penalty(self) -> Tensor:
        """The regularizer's penalty for the attention computed since the last call (0-dim tensor).

        Added to the loss automatically under automatic optimization; under manual optimization add
        it yourself: ``self.manual_backward(loss + monitor.penalty())``.
        """
        return self.engine.penalty.penalty()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._publisher = LightningPublisher(trainer)
        self.engine.attach(pl_module)
        if self.engine.penalty.enabled:
            self._wrapper.attach(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.engine.detach()
        self._wrapper.detach()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def on_init_end(self, *args: Any, **kwargs: Any) -> None:
        """The first event a Hugging Face ``Trainer`` sends its callbacks: this one is Lightning's."""
        raise TypeError(
            "attnmonitor: `AttentionMonitor` is the Lightning callback; a Hugging Face Trainer takes "
            "`attnmonitor.integrations.transformers.AttentionMonitorCallback` (with `AttentionMonitorTrainer`)."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_steps == 0:
            rank_zero_warn("attnmonitor: `max_steps=0`: no training step will run, so nothing is captured.", category=RuntimeWarning)
        elif unreached := self.engine.schedule.unreached(trainer.max_steps, start=trainer.global_step):
            rank_zero_warn(unreached, category=RuntimeWarning)
        options = {"attnmonitor": self.options.loggable()}
        for each in trainer.loggers:
            each.log_hyperparams(options)
        publisher = self._publisher
        if publisher is not None and publisher.tensorboard is not None and trainer.is_global_zero:
            # after Lightning logged the module's own: all of them, compared by the monitor's means
            statistics = self.options.capture.statistics
            metrics = [tags.statistic(stage, name) for stage in ("train", "val") for name in statistics]
            writer = publisher.tensorboard.experiment
            write_hparams(writer, {**publisher.tensorboard.hparams, **options}, metrics)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.engine.start_train_batch(trainer.global_step, batch)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self._publisher is not None, "setup() creates the publisher"
        self._carry_out(trainer, self.engine.end_train_batch(trainer.global_step, self._publisher))

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
        if not trainer.sanity_checking and self._publisher is not None:
            # the step Lightning's own `self.log` uses now (inside `fit`: the last trained step)
            step = int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))
            self.engine.end_eval(step, self._publisher)

    def _carry_out(self, trainer: pl.Trainer, actions: Actions) -> None:
        """An alarm checkpoint under the log directory; a clean stop. Every process takes the same decisions."""
        if actions.checkpoint:
            step = actions.firings[0].step
            path = Path(trainer.log_dir or trainer.default_root_dir) / "alarm_checkpoints" / f"step={step}.ckpt"
            trainer.save_checkpoint(path)
            if trainer.is_global_zero:
                logger().warning(f"attnmonitor: alarm checkpoint saved to {path}")
        if actions.stop:
            trainer.should_stop = True
