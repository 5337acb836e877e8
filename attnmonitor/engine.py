"""The monitor's framework-independent core, the only place that decides what to capture, publish, clip and do.

The adapters (:mod:`attnmonitor.integrations`) only translate their training loop's events into these
calls, and the returned :class:`~attnmonitor.alarms.Actions` into their framework's terms:

    engine.attach(model)
    for each training micro-batch:   engine.start_train_batch(step, batch); forward/backward
                                     actions = engine.end_train_batch(step_count_now, publisher)
    for each evaluation batch:       engine.start_eval_batch(index, batch); forward; engine.end_eval_batch()
    after evaluation:                engine.end_eval(step, publisher)
    engine.detach()

A training step is over when ``end_train_batch`` sees the optimizer step count move past it; then its
capture is published, QK-clip applied, the alarms run, and the regularizer's means logged when the
loop logs. Statistics are computed on every process; the reduction across processes is exact (sums
and counts) and every process takes part in it; figures and text are written where
``publisher.writer`` is set (global rank zero).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Protocol

import torch
from torch import nn

from attnmonitor.alarms import Actions, act
from attnmonitor.alarms.report import logger
from attnmonitor.batch import batch_tensor
from attnmonitor.capture import AttentionCapture
from attnmonitor.capture.calls import CROSS
from attnmonitor.checks import layer_selected
from attnmonitor.config import MonitorOptions
from attnmonitor.dashboards import Dashboards
from attnmonitor.health import TrainingHealth
from attnmonitor.interventions.qk_clip import QKClip
from attnmonitor.metrics.state import StageStatistics, global_rank
from attnmonitor.regularization.penalty import PenaltyTracker
from attnmonitor.regularization.regularizer import AttentionRegularizer
from attnmonitor.schedule import CaptureKind, Schedule
from attnmonitor.tensorboard import tags
from attnmonitor.tensorboard.writer import ScalarLayout, alignment_scalars, statistic_scalars


class Publisher(Protocol):
    """Where an adapter sends what the engine publishes."""

    device: torch.device
    """Device of the cross-process reduction (the process's own device)."""
    writer: Any
    """A TensorBoard ``SummaryWriter`` on the process that writes figures (global rank zero), else None."""
    step_offset: int
    """Added to a 0-based optimizer step to get the loop's own step number (the HF Trainer counts from 1)."""
    figures_missing: str | None
    """Why figures cannot be written on any process (no TensorBoard writer), or None."""

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Log scalars at ``step`` to the training loop's loggers."""

    def logs_at(self, step: int) -> bool:
        """Whether the training loop logs at the end of optimizer step ``step`` (0-based)."""


class MonitorEngine:
    """Capture schedule, statistic state, publishing, QK-clip, alarms and the regularizer's penalty.

    Args:
        options: every option (see :class:`attnmonitor.config.MonitorOptions`).
    """

    def __init__(self, options: MonitorOptions) -> None:
        self.options = options
        self.regularizer = AttentionRegularizer(options.regularizer, options.clip)
        self.penalty = PenaltyTracker(self.regularizer)
        """The regularizer's penalty: every adapter adds ``penalty.penalty()`` to its loss."""
        self.health = TrainingHealth(options)
        """The alarms and QK-clip."""
        heatmaps = options.dashboards.heatmaps
        self.schedule = Schedule(
            options.schedule.every_n_steps,
            options.schedule.atlas_every_n_steps,
            heatmaps.every_n_steps if heatmaps is not None else None,
            options.alarms.every_n_steps if options.alarms is not None else None,
            options.alarms is not None,
            options.qk_clip is not None,
        )
        statistics = options.capture.statistics
        self.stages = {"train": StageStatistics(statistics), "val": StageStatistics(statistics)}
        if self.health.statistics:  # light captures: only the statistics the alarms and QK-clip read
            self.stages["light"] = StageStatistics(self.health.statistics)
        self.dashboards = Dashboards(options)
        self.capture: AttentionCapture | None = None
        self.layers: list[str] = []
        """Layers captured so far (on any process), in forward order."""
        self.last_train_step = -1
        """Last optimizer step whose training capture was published (saved in checkpoints)."""
        self.latest: dict[str, float] = {}
        """The scalars of the last publication of each stage (for progress bars)."""
        self.layout = ScalarLayout()
        """TensorBoard's custom-scalar charts, one per statistic and layer logged so far."""
        self._running: int | None = None  # optimizer step whose micro-batches are running
        self._capturing: tuple[int, CaptureKind] | None = None  # the step being captured, and how
        self._example_tokens = heatmaps.max_tokens if heatmaps is not None else 0
        self._warned: set[str] = set()

    # lifecycle ----------------------------------------------------------------------------
    def check(self, model: nn.Module) -> None:
        """Check every option that needs the model, without hooking it.

        Raises:
            ValueError: if ``targets`` selects no module, a ``layers`` option matches none, or QK-clip
                cannot tell the query and key projections of an attention module.
        """
        self._build(model)

    def attach(self, model: nn.Module) -> AttentionCapture:
        """Hook ``model`` (idempotent; see :meth:`check` for the errors)."""
        if self.capture is None:
            capture, self.health.qk_clip = self._build(model)
            self.capture = capture.attach()
            self.penalty.end_batch()  # nothing is collected until a training batch starts
        return self.capture

    def detach(self) -> None:
        """Finish the pending figures and remove every hook (idempotent)."""
        self.dashboards.close()
        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        self._running = self._capturing = None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: the last published step and the alarms' history."""
        return {"last_train_step": self.last_train_step, **self.health.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_train_step = int(state["last_train_step"])
        self.health.load_state_dict(dict(state))

    # training -----------------------------------------------------------------------------
    def start_train_batch(self, step: int, batch: Any) -> None:
        """Before the forward of a training micro-batch of optimizer step ``step`` (0-based)."""
        capture = self._require_capture()
        self.regularizer.begin_step(step)
        self._running = step
        kind = self.schedule.capture(step) if step > self.last_train_step else None
        if kind is None:
            capture.stop()  # the regularizer's state may have changed: a compiled model follows it
            return
        if self._capturing != (step, kind):  # first micro-batch of this optimizer step
            self.stages[kind].accumulator.reset()
            self._capturing = (step, kind)
            if kind == "train":
                capture.example_row = self.dashboards.keep_example("train", batch)
        examples = kind == "train" and (self.schedule.heatmaps(step) or (self.schedule.atlases(step) and self.options.dashboards.analyses))
        self._start(capture, self.stages[kind], batch, examples)

    def end_train_batch(self, step: int, publisher: Publisher) -> Actions:
        """After a training micro-batch; ``step`` is the optimizer step count now. Once the running
        optimizer step is over (``step`` moved past it): publish its capture, apply QK-clip, run the
        alarms and log the regularizer's means; returns what the training loop must do."""
        self._require_capture().stop()
        self.penalty.end_batch()
        if self._running is None or step == self._running:
            return Actions()
        finished, self._running = self._running, None
        actions = Actions()
        if self._capturing is not None and self._capturing[0] == finished:
            kind = self._capturing[1]
            self._capturing, self.last_train_step = None, finished
            actions = self._publish_train(finished, kind, publisher)
        if self.penalty.logs and publisher.logs_at(finished):
            scalars = self.penalty.scalars()
            if scalars:
                publisher.log_scalars(scalars, finished + publisher.step_offset)
        return actions

    # evaluation ---------------------------------------------------------------------------
    def start_eval_batch(self, index: int, batch: Any) -> None:
        """Before the forward of evaluation batch ``index`` (the first ``val_batches`` are captured)."""
        if index >= self.options.schedule.val_batches:
            return
        capture = self._require_capture()
        if index == 0:
            self.stages["val"].accumulator.reset()
            capture.example_row = self.dashboards.keep_example("val", batch)
        self._start(capture, self.stages["val"], batch, examples=True)

    def end_eval_batch(self) -> None:
        self._require_capture().stop()

    def end_eval(self, step: int, publisher: Publisher) -> Actions:
        """After an evaluation: publish what its first ``val_batches`` batches captured, at ``step``."""
        if self.capture is not None and self.options.schedule.val_batches:  # every process: the reduction is collective
            self._publish("val", step, publisher, atlases=True, heatmaps=self.options.dashboards.heatmaps is not None)
        return Actions()

    # publishing ---------------------------------------------------------------------------
    def _publish_train(self, captured: int, kind: CaptureKind, publisher: Publisher) -> Actions:
        """Publish the capture of optimizer step ``captured`` (a light one: only the alarms and QK-clip);
        QK-clip; the alarms when due; what they ask for."""
        atlases, heatmaps = self.schedule.atlases(captured), self.schedule.heatmaps(captured)
        alarms_due = self.schedule.alarms_due(captured)
        self._publish(kind, captured + publisher.step_offset, publisher, atlases=atlases, heatmaps=heatmaps, alarms=alarms_due)
        rules = self.health.alarms
        if rules is None:
            return Actions()
        return act(self.health.firings, rules.config.actions, rules.hints, self._log, rules.open_before)

    def _publish(self, stage: str, step: int, publisher: Publisher, *, atlases: bool, heatmaps: bool, alarms: bool = False) -> None:
        """Reduce the stage's capture across processes and publish it; a training one also runs the
        alarms (when ``alarms``) and QK-clip. Never raises (warns instead).

        Scalars are logged now; figures are drawn and written by a background worker from data
        already on the CPU, so the step goes on (:meth:`detach` waits for them).
        """
        self.health.firings = []
        try:
            capture = self._require_capture()
            cross = {layer for layer, kind in capture.kinds.items() if kind == CROSS}
            synced = self.stages[stage].sync(self.layers, publisher.device, cross)
            if synced is None:
                if stage != "light":
                    self._warn(f"attnmonitor: no attention was captured at {stage} step {step}; nothing logged.", key=f"nothing-{stage}")
                return
            self.layers = synced.layers
            if stage == "light":
                publisher.log_scalars(self.health.check(step, synced, publisher.writer, alarms=alarms), step)
                return
            scalars = statistic_scalars(stage, synced.layers, synced.values, synced.observed, self.options.dashboards.per_head)
            if stage == "train":
                scalars.update(self.health.check(step, synced, publisher.writer))
            scalars.update(alignment_scalars(stage, self.stages[stage].accumulator.alignment))
            if any(capture.skipped.values()):  # captures skipped since the start (non-finite attention, ...), each warned once per layer
                scalars[tags.skipped()] = float(sum(capture.skipped.values()))
            examples = self.stages[stage].accumulator.examples
            analysis = (
                self.dashboards.analyse(stage, synced, examples, capture.kinds) if atlases and self.options.dashboards.analyses else None
            )
            publisher.log_scalars({**scalars, **(analysis[0] if analysis else {})}, step)
            self.latest.update(scalars)
            if publisher.writer is not None:
                self.layout.update(publisher.writer, synced.layers, synced.values, synced.observed)
            if (atlases or heatmaps) and publisher.figures_missing is not None:
                self._warn(f"attnmonitor: images skipped: {publisher.figures_missing}", key="no-writer")
            if publisher.writer is not None and (atlases or heatmaps):
                figures = dict(atlases=atlases, heatmaps=heatmaps, examples=examples, kinds=capture.kinds, analysis=analysis)
                self.dashboards.submit(publisher.writer, stage, step, synced, **figures)
        except Exception as err:  # the monitor never stops training
            self._warn(f"attnmonitor: logging {stage} attention failed at step {step}: {err!r}", key=f"publish-{type(err).__name__}")

    # helpers ------------------------------------------------------------------------------
    def _build(self, model: nn.Module) -> tuple[AttentionCapture, QKClip | None]:
        options = self.options
        regularizer = self.regularizer if self.regularizer.active else None
        capture = AttentionCapture(model, **vars(options.capture), example_tokens=self._example_tokens, regularizer=regularizer)
        capture.stop()
        qk_clip = QKClip(options.qk_clip, model, capture.targets) if options.qk_clip is not None else None
        for option, config in (
            ("dashboards.heatmaps", options.dashboards.heatmaps),
            ("regularizer", options.regularizer),
            ("clip", options.clip),
            ("qk_clip", options.qk_clip),
        ):
            patterns = getattr(config, "layers", None)
            if patterns is not None and not any(layer_selected(name, patterns) for name in capture.target_names):
                raise ValueError(f"`{option}.layers`={patterns} matches none of the attention layers (modules) {capture.target_names}")
        return capture, qk_clip

    def _start(self, capture: AttentionCapture, stage: StageStatistics, batch: Any, examples: bool) -> None:
        """Collect the next forward's statistics into ``stage``, with the batch's masks and alignments."""
        keys = self.options.batch
        if isinstance(batch, Mapping):
            for option, consequence in (("input_key", "labels fall back to positions"), ("query_mask_key", "it masks nothing")):
                key = getattr(keys, option)
                if key is not None and key not in batch:
                    self._warn(
                        f"attnmonitor: `batch.{option}`={key!r} is not a key of the batch, whose keys are {sorted(map(str, batch))}: "
                        f"{consequence}. Set `batch.{option}` to the right key.",
                        key=f"missing-{option}",
                    )
        capture.start(
            stage.accumulator,
            example_tokens=self._example_tokens if examples else 0,
            query_mask=batch_tensor(batch, keys.query_mask_key),
            alignments=batch_tensor(batch, keys.alignment_key),
        )

    def _require_capture(self) -> AttentionCapture:
        if self.capture is None:
            raise RuntimeError("attnmonitor: the monitor is not attached to a model (call attach(model) first)")
        return self.capture

    def _log(self, level: int, message: str) -> None:
        """Log on global rank zero, through the ``attnmonitor`` logger."""
        if global_rank() == 0:
            logger().log(level, message)

    def _warn(self, message: str, key: str | None = None) -> None:
        """Warn on global rank zero; with a ``key``, once per key."""
        if global_rank() != 0 or key in self._warned:
            return
        if key is not None:
            self._warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
