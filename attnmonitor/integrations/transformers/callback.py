"""``AttentionMonitorCallback``: the Hugging Face ``Trainer`` adapter of :class:`attnmonitor.engine.MonitorEngine`."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import DefaultFlowCallback, PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from attnmonitor.config import MonitorOptions, as_options
from attnmonitor.engine import MonitorEngine
from attnmonitor.integrations.transformers.publisher import EVAL_PREFIX, TrainerPublisher

STATE_FILE = "attnmonitor_state.json"
"""The monitor's state in a checkpoint folder."""


class AttentionMonitorCallback(TrainerCallback):
    """Log how every attention layer and head distributes its attention while a Hugging Face ``Trainer`` trains.

    The same options, statistics and figures as :class:`attnmonitor.AttentionMonitor` (Lightning):
    training captures every ``every_n_steps`` optimizer steps (all micro-batches of that step under
    gradient accumulation), at the Trainer's steps ``every_n_steps, 2·every_n_steps, ...``
    (``state.global_step``, the steps it logs with ``logging_steps=every_n_steps``); each evaluation
    of the Trainer captures its first ``val_batches`` batches. Scalars go through ``Trainer.log``:
    into ``state.log_history`` and every ``report_to`` integration (TensorBoard shows them as
    ``train/attn_train/...`` and ``eval/attn_val/...``); atlases, heatmaps and tables go to the
    writer of the Trainer's ``TensorBoardCallback``. Under distributed training the statistics are
    reduced exactly across processes (sums and counts). Hooks exist only during ``train()``.

    The callback needs its Trainer: use :class:`~attnmonitor.integrations.transformers.AttentionMonitorTrainer`
    (or :class:`~attnmonitor.integrations.transformers.AttentionMonitorMixin` with your Trainer
    class), which binds it and adds the regularizer's penalty to the loss; or call
    :meth:`bind` on a plain ``Trainer`` (no regularizer then). The monitor's state (alarm history,
    last published step) is saved into each checkpoint folder (``attnmonitor_state.json``) and restored
    when ``train(resume_from_checkpoint=...)`` resumes from a checkpoint under ``output_dir``.

    Args:
        options: a :class:`~attnmonitor.config.MonitorOptions` (or None); keyword arguments set or
            override its fields (``every_n_steps``, ``statistics``, ``heatmaps``, ``regularizer``, ``clip``, ...).

    Raises:
        ValueError: for an invalid option (named in the message); at the start of ``train()``, for
            ``targets``/``layers`` options that match no module of the model.

    Example:
        >>> monitor = AttentionMonitorCallback(schedule={"every_n_steps": 10}, capture={"statistics": ["entropy", "sink_mass"]})
        >>> monitor.options.schedule.every_n_steps
        10
    """

    def __init__(self, options: MonitorOptions | None = None, /, **kwargs: Any) -> None:
        self.options = as_options(options, kwargs)
        self.engine = MonitorEngine(self.options)
        self.trainer: Trainer | None = None
        self._publishers: dict[str, TrainerPublisher] = {}
        self._hook: RemovableHandle | None = None
        self._train_step: int | None = None  # optimizer step whose micro-batches are running
        self._eval_index = 0  # batches of the evaluation running
        self._eval_open = False  # an evaluation batch is being captured

    def bind(self, trainer: Trainer) -> AttentionMonitorCallback:
        """Connect the monitor to ``trainer``; returns the monitor.

        Adds it to the trainer's callbacks (right after ``DefaultFlowCallback``, before the reporting
        callbacks, so that its figures are written before they close their writers), and logs
        through ``trainer.log``.

        Raises:
            ValueError: if ``trainer`` is not a ``transformers.Trainer``, or the monitor has a
                regularizer and the trainer cannot add its penalty to the loss (not an
                :class:`~attnmonitor.integrations.transformers.AttentionMonitorMixin`).
        """
        if not isinstance(trainer, Trainer):
            raise ValueError(f"`trainer` must be a transformers.Trainer, got {type(trainer).__name__}")
        if self.engine.penalty.enabled and not getattr(trainer, "adds_attention_penalty", False):
            raise ValueError(
                f"the monitor's regularizer needs a Trainer that adds its penalty to the loss, got {type(trainer).__name__}: "
                "use attnmonitor.integrations.transformers.AttentionMonitorTrainer, or subclass your Trainer with "
                "AttentionMonitorMixin (`class MyTrainer(AttentionMonitorMixin, Trainer)`)."
            )
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        flow = next((i for i, cb in enumerate(callbacks) if isinstance(cb, DefaultFlowCallback)), -1)
        callbacks.insert(flow + 1, self)
        for callback in callbacks:
            if isinstance(callback, (ProgressCallback, PrinterCallback)) and not getattr(callback, "_attnmonitor_quiet", False):
                callback.on_log = _console_without_attention(callback.on_log)
                callback._attnmonitor_quiet = True  # bound again (a second monitor, a rebind): wrapped once
        self.trainer = trainer
        return self

    def penalty(self) -> Tensor:
        """The regularizer's penalty for the attention computed since the last call (0-dim tensor).

        :class:`~attnmonitor.integrations.transformers.AttentionMonitorMixin` adds it to the loss;
        call it yourself only in a ``compute_loss`` of your own that does not call the mixin's.
        """
        return self.engine.penalty.penalty()

    def close(self) -> None:
        """Wait for pending figures and remove every hook (idempotent; done at the end of ``train()``)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self.engine.detach()
        self._train_step, self._eval_open, self._eval_index = None, False, 0

    # training events ----------------------------------------------------------------------
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module | None = None, **kwargs: Any
    ) -> None:
        if self.trainer is None:
            raise RuntimeError(
                "attnmonitor: AttentionMonitorCallback is not bound to its Trainer. Use AttentionMonitorTrainer (or "
                "AttentionMonitorMixin) from attnmonitor.integrations.transformers, or call `monitor.bind(trainer)`."
            )
        if model is None:
            raise RuntimeError("attnmonitor: the Trainer passed no model to its callbacks")
        if state.is_world_process_zero and (unreached := self.engine.schedule.unreached(state.max_steps, start=state.global_step)):
            warnings.warn(unreached, RuntimeWarning, stacklevel=2)
        self.engine.attach(model)
        if self._hook is None:
            self._hook = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._publishers = {"train": TrainerPublisher(self.trainer), "val": TrainerPublisher(self.trainer, EVAL_PREFIX)}
        if state.global_step > 0:  # resumed from a checkpoint
            self._resume(Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / STATE_FILE)

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._train_step = state.global_step

    def on_substep_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._end_micro_batch(state, control)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._end_micro_batch(state, control)
        self._train_step = None

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if state.is_world_process_zero and folder.is_dir():
            (folder / STATE_FILE).write_text(json.dumps(self.engine.state_dict()))

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self.close()

    # evaluation events --------------------------------------------------------------------
    def on_prediction_step(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._eval_open:
            self.engine.end_eval_batch()
            self._eval_open = False
        self._eval_index += 1

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._eval_index = 0
        if self._publishers:
            self.engine.end_eval(state.global_step, self._publishers["val"])

    def on_predict(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._eval_index = 0  # not published: the next evaluation starts afresh

    # helpers ------------------------------------------------------------------------------
    def _before_forward(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Forward pre-hook of the model: the batch is the forward's keyword arguments (positional ones without)."""
        batch = kwargs if kwargs else args
        try:
            if self._train_step is not None:
                if module.training:
                    self.engine.start_train_batch(self._train_step, batch)
            elif not module.training and not self._eval_open and self._eval_index < self.options.schedule.val_batches:
                self.engine.start_eval_batch(self._eval_index, batch)
                self._eval_open = True
        except Exception as err:  # the monitor never stops training
            warnings.warn(f"attnmonitor: preparing the capture of a batch failed: {err!r}", RuntimeWarning, stacklevel=2)

    def _end_micro_batch(self, state: TrainerState, control: TrainerControl) -> None:
        """After a training micro-batch (the step's last one: ``state.global_step`` has moved on).
        ``checkpoint`` asks the Trainer to save now, ``stop`` to save and stop."""
        if self.engine.capture is None or not self._publishers:
            return
        actions = self.engine.end_train_batch(state.global_step, self._publishers["train"])
        control.should_save |= actions.checkpoint
        control.should_training_stop |= actions.stop

    def _resume(self, path: Path) -> None:
        if path.is_file():
            self.engine.load_state_dict(json.loads(path.read_text()))
        elif self.trainer is not None and self.trainer.state.is_world_process_zero:
            message = f"attnmonitor: resumed at a checkpoint without the monitor's state ({path} not found): the alarms start afresh."
            warnings.warn(message, RuntimeWarning, stacklevel=2)


_ATTENTION_KEY = re.compile(r"^(eval_|test_)?attn_")


def _console_without_attention(on_log: Any) -> Any:
    """A console printer's ``on_log`` that leaves the monitor's scalars out (they stay in the logs,
    ``state.log_history`` and the reporting integrations) and prints nothing for a dict of them alone."""

    def quiet_on_log(args: TrainingArguments, state: TrainerState, control: TrainerControl, logs: Any = None, **kwargs: Any) -> Any:
        if not logs:
            return on_log(args, state, control, logs=logs, **kwargs)
        shown = {key: value for key, value in logs.items() if not _ATTENTION_KEY.search(key)}
        if set(shown) <= {"epoch", "step"} and len(shown) < len(logs):
            return None
        result = on_log(args, state, control, logs=shown, **kwargs)
        if "total_flos" not in shown:  # the printer's own edit of the logs
            logs.pop("total_flos", None)
        return result

    return quiet_on_log
