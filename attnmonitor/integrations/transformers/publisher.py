"""Where the Hugging Face adapter publishes: ``Trainer.log`` and the writer of its ``TensorBoardCallback``."""

from __future__ import annotations

from typing import Any

from transformers import Trainer
from transformers.integrations import TensorBoardCallback

EVAL_PREFIX = "eval_"
"""Prefix of evaluation scalars in the Trainer's logs (as its own ``eval_loss``): TensorBoard shows ``eval/attn_val/...``."""


class TrainerPublisher:
    """Scalars through ``Trainer.log`` (its ``log_history`` and every ``report_to`` integration, on every
    process as the Trainer does); figures to the writer of its ``TensorBoardCallback`` on the main process.

    Args:
        trainer: the Trainer.
        prefix: prepended to every scalar's key (:data:`EVAL_PREFIX` for evaluation scalars).
    """

    step_offset = 1
    """The Trainer counts optimizer steps from 1 (``state.global_step`` after the step)."""

    def __init__(self, trainer: Trainer, prefix: str = "") -> None:
        self.trainer, self.prefix = trainer, prefix
        self.device = trainer.args.device
        missing = self.tensorboard is None
        self.figures_missing = "the Trainer has no TensorBoardCallback (add 'tensorboard' to `report_to`)." if missing else None

    @property
    def tensorboard(self) -> TensorBoardCallback | None:
        """The Trainer's ``TensorBoardCallback`` (``report_to`` includes ``"tensorboard"``), or None."""
        return next((cb for cb in self.trainer.callback_handler.callbacks if isinstance(cb, TensorBoardCallback)), None)

    @property
    def writer(self) -> Any:
        """The ``SummaryWriter`` of the ``TensorBoardCallback`` on the main process, else None."""
        callback = self.tensorboard
        return callback.tb_writer if callback is not None and self.trainer.state.is_world_process_zero else None

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
