"""Where the Hugging Face adapter publishes: ``Trainer.log``, and figures to its TensorBoard, W&B and
MLflow integrations."""

from __future__ import annotations

from typing import Any

from transformers import Trainer
from transformers.integrations import MLflowCallback, TensorBoardCallback, WandbCallback

from attnmonitor.loggers import MLflowWriter, WandbWriter, combine

EVAL_PREFIX = "eval_"
"""Prefix of evaluation scalars in the Trainer's logs (as its own ``eval_loss``): TensorBoard shows ``eval/attn_val/...``."""


FIGURE_CALLBACKS = (TensorBoardCallback, WandbCallback, MLflowCallback)


def figure_writer(callback: Any) -> Any:
    """The writer of figures for a ``report_to`` integration once it started its run, else None."""
    if isinstance(callback, TensorBoardCallback):
        return callback.tb_writer
    if isinstance(callback, WandbCallback) and callback._initialized and callback._wandb.run is not None:
        return WandbWriter(callback._wandb.run, step_key="train/global_step")
    if isinstance(callback, MLflowCallback) and callback._initialized and callback._ml_flow.active_run() is not None:
        return MLflowWriter(callback._ml_flow.MlflowClient(), callback._ml_flow.active_run().info.run_id)
    return None


class TrainerPublisher:
    """Scalars through ``Trainer.log`` (its ``log_history`` and every ``report_to`` integration, on every
    process as the Trainer does); figures to its ``tensorboard``, ``wandb`` and ``mlflow`` integrations
    on the main process.

    Args:
        trainer: the Trainer.
        prefix: prepended to every scalar's key (:data:`EVAL_PREFIX` for evaluation scalars).
    """

    step_offset = 1
    """The Trainer counts optimizer steps from 1 (``state.global_step`` after the step)."""

    def __init__(self, trainer: Trainer, prefix: str = "") -> None:
        self.trainer, self.prefix = trainer, prefix
        self.device = trainer.args.device
        missing = not any(isinstance(cb, FIGURE_CALLBACKS) for cb in trainer.callback_handler.callbacks)
        self.figures_missing = (
            "`report_to` has none of 'tensorboard', 'wandb', 'mlflow' (the integrations that take figures)." if missing else None
        )

    @property
    def writer(self) -> Any:
        """The writer of the Trainer's figure-taking integrations on the main process, else None."""
        if not self.trainer.state.is_world_process_zero:
            return None
        return combine([figure_writer(cb) for cb in self.trainer.callback_handler.callbacks])

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """``Trainer.log`` (at ``state.global_step``, which is ``step``), leaving the Trainer's own
        decision to log at this step (``control.should_log``) as it was."""
        control = self.trainer.control
        should_log = control.should_log
        self.trainer.log({self.prefix + tag: value for tag, value in scalars.items()})
        control.should_log = self.trainer.control.should_log = should_log

    def logs_at(self, step: int) -> bool:
        """The Trainer's own decision to log at this step (``logging_steps``)."""
        return bool(self.trainer.control.should_log)
