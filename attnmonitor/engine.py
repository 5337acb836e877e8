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

from attnmonitor.alarms import Actions, AttentionAlarms, act, alarm_tag
from attnmonitor.batch import batch_tensor
from attnmonitor.capture import AttentionCapture
from attnmonitor.capture.calls import CROSS
from attnmonitor.config import MonitorOptions, layer_selected
from attnmonitor.dashboards import Dashboards
from attnmonitor.interventions.qk_clip import QKClip
from attnmonitor.metrics.state import StageStatistics, Synced
from attnmonitor.regularization.penalty import PenaltyTracker
from attnmonitor.regularization.regularizer import AttentionRegularizer
from attnmonitor.schedule import CaptureKind, Schedule
from attnmonitor.tensorboard import tags
from attnmonitor.tensorboard.writer import alignment_scalars, statistic_scalars


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
        self.alarms = AttentionAlarms(options.alarms) if options.alarms is not None else None
        """The training-health rules and their history (None: alarms off)."""
        heatmaps = options.heatmaps
        self.schedule = Schedule(
            options.every_n_steps, options.atlas_every_n_steps, heatmaps.every_n_steps if heatmaps is not None else None,
            options.alarms.every_n_steps if options.alarms is not None else None, options.alarms is not None, options.qk_clip is not None,
        )
        light = (*(self.alarms.statistics if self.alarms is not None else ()), *(("max_logit",) if options.qk_clip else ()))
        self.stages = {"train": StageStatistics(options.statistics), "val": StageStatistics(options.statistics)}
        if light:  # light captures: only the statistics the alarms and QK-clip read
            self.stages["light"] = StageStatistics(tuple(dict.fromkeys(light)))
        self.dashboards = Dashboards(options)
        self.capture: AttentionCapture | None = None
        self.qk_clip: QKClip | None = None
        """The QK-clip of the attached model (None: off)."""
        self.layers: list[str] = []
        """Layers captured so far (on any process), in forward order."""
        self.firings: list[Any] = []
        """The alarms that fired at the last training publication."""
        self.last_train_step = -1
        """Last optimizer step whose training capture was published (saved in checkpoints)."""
        self.latest: dict[str, float] = {}
        """The scalars of the last publication of each stage (for progress bars)."""
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
            capture, self.qk_clip = self._build(model)
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
        return {"last_train_step": self.last_train_step, **({"alarms": self.alarms.state_dict()} if self.alarms else {})}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.last_train_step = int(state["last_train_step"])
        if self.alarms is not None and "alarms" in state:
            self.alarms.load_state_dict(state["alarms"])

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
                self.dashboards.keep_example("train", batch)
        examples = kind == "train" and (self.schedule.heatmaps(step) or (self.schedule.atlases(step) and self.options.analyses))
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
        if index >= self.options.val_batches:
            return
        capture = self._require_capture()
        if index == 0:
            self.stages["val"].accumulator.reset()
            self.dashboards.keep_example("val", batch)
        self._start(capture, self.stages["val"], batch, examples=True)

    def end_eval_batch(self) -> None:
        self._require_capture().stop()

    def end_eval(self, step: int, publisher: Publisher) -> Actions:
        """After an evaluation: publish what its first ``val_batches`` batches captured, at ``step``."""
        if self.capture is not None and self.options.val_batches:  # every process: the reduction is collective
            self._publish("val", step, publisher, atlases=True, heatmaps=self.options.heatmaps is not None)
        return Actions()

    # publishing ---------------------------------------------------------------------------
    def _publish_train(self, captured: int, kind: CaptureKind, publisher: Publisher) -> Actions:
        """Publish the capture of optimizer step ``captured``; QK-clip; the alarms when due."""
        step, self.firings = captured + publisher.step_offset, []
        if kind == "light":  # the alarms (when due) and QK-clip, and their scalars, nothing else
            synced = self._sync("light", publisher)
            scalars = {} if synced is None else self._clip(synced)
            if synced is not None and self.schedule.alarms_due(captured):
                scalars.update(self._check_alarms(step, synced, publisher))
            if scalars:
                publisher.log_scalars(scalars, step)
        else:
            atlases, heatmaps = self.schedule.atlases(captured), self.schedule.heatmaps(captured)
            scalars = self._publish("train", step, publisher, atlases=atlases, heatmaps=heatmaps)
        return act(self.firings, self._warner())

    def _publish(self, stage: str, step: int, publisher: Publisher, *, atlases: bool, heatmaps: bool) -> dict[str, float] | None:
        """Reduce the stage's capture across processes and publish it; never raises (warns instead).

        Scalars are logged now; figures are drawn and written by a background worker from data
        already on the CPU, so the step goes on (:meth:`detach` waits for them).
        """
        self.firings = []
        try:
            synced = self._sync(stage, publisher)
            if synced is None:
                self._warn(f"nothing-{stage}", f"attnmonitor: no attention was captured at {stage} step {step}; nothing logged.")
                return None
            scalars = statistic_scalars(stage, synced.layers, synced.values, synced.observed, self.options.per_head)
            if stage == "train":
                scalars.update(self._check_alarms(step, synced, publisher))
                scalars.update(self._clip(synced))
            scalars.update(alignment_scalars(stage, self.stages[stage].accumulator.alignment))
            skipped = sum(self._require_capture().skipped.values())
            if skipped:  # captures skipped since the start (non-finite attention, ...), each warned once per layer
                scalars[tags.skipped()] = float(skipped)
            examples, kinds = self.stages[stage].accumulator.examples, self._require_capture().kinds
            analysis = self.dashboards.analyse(stage, synced, examples, kinds) if atlases and self.options.analyses else None
            publisher.log_scalars({**scalars, **(analysis[0] if analysis else {})}, step)
            self.latest.update(scalars)
            if (atlases or heatmaps) and publisher.figures_missing is not None:
                self._warn("no-writer", f"attnmonitor: images skipped: {publisher.figures_missing}")
            if publisher.writer is not None and (atlases or heatmaps):
                self.dashboards.submit(
                    publisher.writer, stage, step, synced, atlases=atlases, heatmaps=heatmaps, examples=examples, kinds=kinds,
                    analysis=analysis,
                )
            return scalars
        except Exception as err:  # the monitor never stops training
            self._warn(f"publish-{type(err).__name__}", f"attnmonitor: logging {stage} attention failed at step {step}: {err!r}")
            return None

    def _sync(self, stage: str, publisher: Publisher) -> Synced | None:
        kinds = self._require_capture().kinds
        synced = self.stages[stage].sync(self.layers, publisher.device, {layer for layer, kind in kinds.items() if kind == CROSS})
        if synced is not None:
            self.layers = synced.layers
        return synced

    def _clip(self, synced: Synced) -> dict[str, float]:
        """QK-clip from the step's synced ``max_logit`` (the same on every process); its scalar."""
        if self.qk_clip is None:
            return {}
        maxima = {layer: synced.values["max_logit"][row, :heads] for row, (layer, heads) in enumerate(synced.heads.items())}
        return {tags.regularization("qk_clipped_heads"): float(self.qk_clip.apply(maxima))}

    def _check_alarms(self, step: int, synced: Synced, publisher: Publisher) -> dict[str, float]:
        """Apply the rules (the same decisions on every process); their scalars, and text on rank zero."""
        if self.alarms is None:
            return {}
        self.firings = self.alarms.check(step, synced.layers, synced.values)
        if publisher.writer is not None:
            for rule in dict.fromkeys(f.rule for f in self.firings):
                lines = [f"- {f.message()}" for f in self.firings if f.rule == rule]
                publisher.writer.add_text(alarm_tag(rule), "\n".join(lines), step)
        return self.alarms.counts(self.firings)

    # helpers ------------------------------------------------------------------------------
    def _build(self, model: nn.Module) -> tuple[AttentionCapture, QKClip | None]:
        options = self.options
        capture = AttentionCapture(
            model, options.targets, statistics=options.statistics, example_tokens=self._example_tokens,
            regularizer=self.regularizer if self.regularizer.active else None, pool_shared=options.pool_shared,
            memory_budget_mb=options.memory_budget_mb, sink_tokens=options.sink_tokens,
            sparsity_eps=options.sparsity_eps, sample_rows=options.sample_rows,
        )
        capture.stop()
        qk_clip = QKClip(options.qk_clip, model, capture.targets) if options.qk_clip is not None else None
        for option, config in (("heatmaps", options.heatmaps), ("regularizer", options.regularizer), ("clip", options.clip)):
            patterns = getattr(config, "layers", None)
            if patterns is not None and not any(layer_selected(name, patterns) for name in capture.target_names):
                raise ValueError(f"`{option}.layers`={patterns} matches none of the attention layers (modules) {capture.target_names}")
        return capture, qk_clip

    def _start(self, capture: AttentionCapture, stage: StageStatistics, batch: Any, examples: bool) -> None:
        """Collect the next forward's statistics into ``stage``, with the batch's masks and alignments."""
        options = self.options
        if isinstance(batch, Mapping):
            for option, consequence in (("input_key", "labels fall back to positions"), ("query_mask_key", "it masks nothing")):
                key = getattr(options, option)
                if key is not None and key not in batch:
                    self._warn(
                        f"missing-{option}",
                        f"attnmonitor: `{option}`={key!r} is not a key of the batch, whose keys are {sorted(map(str, batch))}: "
                        f"{consequence}. Set `{option}` to the right key.",
                    )
        capture.start(
            stage.accumulator, example_tokens=self._example_tokens if examples else 0,
            query_mask=batch_tensor(batch, options.query_mask_key), alignments=batch_tensor(batch, options.alignment_key),
        )

    def _require_capture(self) -> AttentionCapture:
        if self.capture is None:
            raise RuntimeError("attnmonitor: the monitor is not attached to a model (call attach(model) first)")
        return self.capture

    def _warner(self) -> Any:
        """``warn(message)`` on global rank zero, nothing elsewhere."""
        return (lambda message: warnings.warn(message, RuntimeWarning, stacklevel=4)) if _rank() == 0 else (lambda message: None)

    def _warn(self, key: str, message: str) -> None:
        """Warn once per ``key``, on global rank zero."""
        if key not in self._warned and _rank() == 0:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def _rank() -> int:
    distributed = torch.distributed
    return distributed.get_rank() if distributed.is_available() and distributed.is_initialized() else 0
