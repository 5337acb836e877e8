"""The monitor's framework-independent core: when to capture, the statistic state, what to publish.

A training-loop adapter (the Lightning callback, or your own loop) drives one :class:`MonitorEngine`:

    engine.attach(model)
    for each training micro-batch:   engine.start_train_batch(step, batch); forward/backward; ...
                                     finished = engine.end_train_batch(step_after_the_batch)
                                     if finished is not None: engine.publish("train", finished, publisher, ...)
    for each evaluation batch:       engine.start_eval_batch(index, batch); forward; engine.end_eval_batch()
    after evaluation:                engine.publish("val", step, publisher, images=True, heatmaps=...)
    engine.detach()

Statistics are computed on every process; the reduction across processes is exact (sums and counts)
and every process takes part in it; figures and text are written where ``publisher.writer`` is set
(global rank zero).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from attnmonitor.alarms import AttentionAlarms, Firing, alarm_tag
from attnmonitor.batch import batch_tensor, example_ids, token_strings
from attnmonitor.capture import AttentionCapture
from attnmonitor.capture.accumulator import StatisticsAccumulator
from attnmonitor.capture.calls import CROSS
from attnmonitor.config import MonitorOptions, layer_selected
from attnmonitor.functional.statistics import POSITION_STATISTICS
from attnmonitor.metrics.state import AttentionStatistics, gather_layers
from attnmonitor.regularization.qk_clip import QKClip
from attnmonitor.regularization.regularizer import AttentionRegularizer
from attnmonitor.tensorboard import ExampleAnalysis, analyse_example, role_changes, tags
from attnmonitor.tensorboard.worker import FigureWorker
from attnmonitor.tensorboard.writer import (
    alignment_scalars,
    example_scalars,
    statistic_scalars,
    write_atlases,
    write_example,
    write_heatmap,
)

STAGES = ("train", "val")


def due(step: int, every: int) -> bool:
    """Whether optimizer step ``step`` (counted from 0) is one in ``every``: steps ``every - 1``,
    ``2 every - 1``, ..., the steps Lightning logs with ``log_every_n_steps=every``."""
    return (step + 1) % every == 0


class Publisher(Protocol):
    """Where an adapter sends what the engine publishes."""

    device: torch.device
    """Device of the cross-process reduction (the process's own device)."""
    writer: Any
    """A TensorBoard ``SummaryWriter`` on the process that writes figures (global rank zero), else None."""

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        """Log scalars at ``step`` to the training loop's loggers."""


@dataclass
class StageData:
    """What one stage (train or val) captured since its last publication."""

    accumulator: StatisticsAccumulator
    ids: Tensor | None = None  # [L] token ids of the example (batch element 0)
    query_ids: Tensor | None = None  # [L] the decoder's ids, for cross-attention labels

    def keep_ids(self, batch: Any, options: MonitorOptions) -> None:
        """Keep the token ids of the batch's element 0 (the example's labels)."""
        self.ids = example_ids(batch, options.input_key)
        self.query_ids = example_ids(batch, options.decoder_input_key, positional=False)

    def labels(self, tokenizer: Any, start: int = 0, length: int | None = None, queries: bool = False) -> list[str] | None:
        """Token strings of the kept ids (``queries``: the decoder's) from ``start``, or None."""
        ids = self.query_ids if queries else self.ids
        if ids is None:
            return None
        return token_strings(ids[start:] if length is None else ids[start : start + length], tokenizer)


class MonitorEngine:
    """Capture schedule, statistic state and publishing of the attention monitor.

    Args:
        options: every option (see :class:`attnmonitor.config.MonitorOptions`).
    """

    def __init__(self, options: MonitorOptions) -> None:
        self.options = options
        self.regularizer = AttentionRegularizer(options.regularizer, options.clip)
        self.capture: AttentionCapture | None = None
        self._example_tokens = options.heatmaps.max_tokens if options.heatmaps is not None else 0
        """Tokens of the examples kept on the captures that draw heatmaps or analyses (0: none)."""
        self.layers: list[str] = []
        """Layers captured so far (on any process), in forward order."""
        self.stages = {stage: StageData(StatisticsAccumulator(options.statistics)) for stage in STAGES}
        self.alarms = AttentionAlarms(options.alarms) if options.alarms is not None else None
        """The training-health rules and their history (None: alarms off)."""
        self.qk_clip: QKClip | None = None
        """The QK-clip of the model checked last, the attached one (None: off)."""
        light = (*(self.alarms.statistics if self.alarms is not None else ()), *(("max_logit",) if options.qk_clip else ()))
        if light:  # light captures: only the statistics the alarms and QK-clip read
            self.stages["light"] = StageData(StatisticsAccumulator(tuple(dict.fromkeys(light))))
        self.firings: list[Firing] = []
        """The alarms that fired at the last training publication (an adapter acts on them)."""
        self._window_light = False  # the step being captured is a light one (only the alarms or QK-clip asked for it)
        self._light_finished: int | None = None  # the finished step to publish, when it was a light capture
        self.last_train_step = -1
        """Last optimizer step whose training capture was published (saved in checkpoints)."""
        self.latest: dict[str, float] = {}
        """The scalars of the last publication of each stage (for progress bars)."""
        self.figures = FigureWorker()
        """Draws and writes figures off the training thread."""
        self._window_step: int | None = None  # optimizer step being captured
        self._roles: dict[str, Tensor] = {}
        self._heads: dict[str, int] = {}  # {layer: heads} of the last computed capture, on every process
        self._states: dict[str, AttentionStatistics] = {}  # per stage, reused while the layer grid keeps its shape
        self._warned: set[str] = set()

    # lifecycle ----------------------------------------------------------------------------
    def check(self, model: nn.Module) -> AttentionCapture:
        """A capture of ``model``, not attached yet, with every option that needs the model checked.

        Raises:
            ValueError: if ``targets`` selects no module, a ``layers`` option matches none, or QK-clip
                cannot tell the query and key projections of an attention module.
        """
        options = self.options
        capture = AttentionCapture(
            model, options.targets, statistics=options.statistics,
            example_tokens=self._example_tokens,
            regularizer=self.regularizer if self.regularizer.active else None, pool_shared=options.pool_shared,
            memory_budget_mb=options.memory_budget_mb, sink_tokens=options.sink_tokens,
            sparsity_eps=options.sparsity_eps, sample_rows=options.sample_rows,
        )
        if options.qk_clip is not None:  # projections it cannot tell: an error now
            self.qk_clip = QKClip(options.qk_clip, model, capture.targets)
        for option, config in (("heatmaps", options.heatmaps), ("regularizer", options.regularizer), ("clip", options.clip)):
            patterns = getattr(config, "layers", None)
            if patterns is not None and not any(layer_selected(name, patterns) for name in capture.target_names):
                raise ValueError(f"`{option}.layers`={patterns} matches none of the attention layers (modules) {capture.target_names}")
        return capture

    def attach(self, model: nn.Module) -> AttentionCapture:
        """Hook ``model`` (idempotent; see :meth:`check` for the errors)."""
        if self.capture is None:
            capture = self.check(model)  # also makes the model's QK-clip
            capture.enabled = False
            self.capture = capture.attach()
        self.regularizer.regularizing = False
        return self.capture

    def detach(self) -> None:
        """Finish the pending figures and remove every hook (idempotent)."""
        self.finish()
        if self.capture is not None:
            self.capture.remove()
            self.capture = None
        self._window_step = None

    # schedule -----------------------------------------------------------------------------
    def start_train_batch(self, step: int, batch: Any) -> None:
        """Before the forward of a training micro-batch of optimizer step ``step``."""
        capture = self._require_capture()
        self.regularizer.begin_step(step)
        self._prepare(capture, batch)
        regular = due(step, self.options.every_n_steps)
        if not (regular or self._alarms_due(step) or self.qk_clip is not None) or step <= self.last_train_step:
            capture.enabled = False  # the regularizer's state may have changed: a compiled model follows it
            return
        stage = "train" if regular else "light"  # only the statistics the alarms and QK-clip read
        capture.accumulator = self.stages[stage].accumulator
        atlases, heatmaps = self.train_images(step)
        capture.example_tokens = self._example_tokens if regular and (heatmaps or (atlases and self.options.analyses)) else 0
        if self._window_step != step:  # first micro-batch of this optimizer step
            capture.reset()
            self._window_step = step
            self._window_light = not regular
            if regular:
                self.stages["train"].keep_ids(batch, self.options)
        capture.enabled = True

    def end_train_batch(self, step: int) -> int | None:
        """After a training micro-batch; ``step`` is the optimizer step count now. Returns the captured
        step once its optimizer step is done (publish it), else None."""
        self._require_capture().enabled = False
        if self._window_step is None or step == self._window_step:
            return None
        finished, self._window_step = self._window_step, None
        self._light_finished = finished if self._window_light else None
        self.last_train_step = finished
        return finished

    def _alarms_due(self, step: int) -> bool:
        """Whether the alarms look at step ``step``: every regular capture, and every ``alarms.every_n_steps``."""
        if self.alarms is None:
            return False
        every = self.alarms.config.every_n_steps
        return due(step, self.options.every_n_steps) or (every is not None and due(step, every))

    def train_images(self, step: int) -> tuple[bool, bool]:
        """Whether a finished training capture at ``step`` draws atlases, and heatmaps."""
        every = self.options.heatmaps.every_n_steps if self.options.heatmaps is not None else None
        return due(step, self.options.atlas_every_n_steps), every is not None and due(step, every)

    def start_eval_batch(self, index: int, batch: Any) -> None:
        """Before the forward of evaluation batch ``index`` (the first ``val_batches`` are captured)."""
        if index >= self.options.val_batches:
            return
        capture = self._require_capture()
        capture.accumulator = self.stages["val"].accumulator
        capture.example_tokens = self._example_tokens
        if index == 0:
            capture.reset()
            self.stages["val"].keep_ids(batch, self.options)
        self._prepare(capture, batch)
        capture.enabled = True

    def end_eval_batch(self) -> None:
        capture = self._require_capture()
        capture.enabled = False
        capture.accumulator = self.stages["train"].accumulator

    # publishing ---------------------------------------------------------------------------
    def publish(self, stage: str, step: int, publisher: Publisher, *, images: bool, heatmaps: bool) -> None:
        """Reduce the stage's capture across processes and publish it; never raises (warns instead).

        Scalars are logged now; figures are drawn and written by a background worker from data
        already on the CPU, so the step goes on (:meth:`finish` waits for them).
        """
        self.firings = []
        try:
            if stage == "train" and self._light_finished is not None:
                captured, self._light_finished = self._light_finished, None
                self._publish_light(step, captured, publisher)
                return
            computed = self._compute(stage, publisher.device)
            if computed is None:
                self._warn(f"nothing-{stage}", f"attnmonitor: no attention was captured at {stage} step {step}; nothing logged.")
                return
            values, observed = computed
            scalars = statistic_scalars(stage, self.layers, values, observed, self.options.per_head)
            if stage == "train":
                scalars.update(self._check_alarms(step, values, publisher))
                scalars.update(self._clip(values))
            scalars.update(alignment_scalars(stage, self.stages[stage].accumulator.alignment))
            skipped = sum(self._require_capture().skipped.values())
            if skipped:  # captures skipped since the start (non-finite attention, ...), each warned once per layer
                scalars[tags.skipped()] = float(skipped)
            analysis = self._example_analysis(stage) if images and self.options.analyses else None
            publisher.log_scalars({**scalars, **(analysis[0] if analysis else {})}, step)
            self.latest.update(scalars)
            if publisher.writer is not None and (images or heatmaps):
                job = self._figure_job(publisher.writer, stage, step, values, observed, images, heatmaps, analysis)
                self.figures.submit(job, f"{stage} step {step}")
        except Exception as err:  # the monitor never stops training
            self._warn(f"publish-{type(err).__name__}", f"attnmonitor: logging {stage} attention failed at step {step}: {err!r}")

    def _publish_light(self, step: int, captured: int, publisher: Publisher) -> None:
        """A light capture of optimizer step ``captured``, logged at ``step``: the alarms (when due) and
        QK-clip, and their scalars, nothing else."""
        computed = self._compute("light", publisher.device)
        if computed is not None:
            scalars = self._check_alarms(step, computed[0], publisher) if self._alarms_due(captured) else {}
            publisher.log_scalars({**scalars, **self._clip(computed[0])}, step)

    def _clip(self, values: dict[str, Tensor]) -> dict[str, float]:
        """QK-clip from the step's synced ``max_logit`` (the same on every process); its scalar."""
        if self.qk_clip is None:
            return {}
        maxima = {layer: values["max_logit"][row, :heads] for row, (layer, heads) in enumerate(self._heads.items())}
        return {tags.regularization("qk_clipped_heads"): float(self.qk_clip.apply(maxima))}

    def _check_alarms(self, step: int, values: dict[str, Tensor], publisher: Publisher) -> dict[str, float]:
        """Apply the rules (the same decisions on every process); their scalars, and text on rank zero."""
        if self.alarms is None:
            return {}
        self.firings = self.alarms.check(step, self.layers, values)
        if publisher.writer is not None:
            for rule in dict.fromkeys(f.rule for f in self.firings):
                lines = [f"- {f.message()}" for f in self.firings if f.rule == rule]
                publisher.writer.add_text(alarm_tag(rule), "\n".join(lines), step)
        return self.alarms.counts(self.firings)

    def finish(self) -> None:
        """Wait until every figure is drawn and written (end of training)."""
        self.figures.close()

    def _compute(self, stage: str, device: torch.device) -> tuple[dict[str, Tensor], Tensor] | None:
        """Synced ``{statistic: [L, H]}`` means, or maxima for ``max_logit`` (NaN where a layer does not
        define a statistic) and bool ``[L, H]`` observed cells; None when no process captured anything."""
        accumulator = self.stages[stage].accumulator
        heads = gather_layers(accumulator.heads(), self.layers)
        self.layers, self._heads = list(heads), heads
        if not any(heads.values()):
            return None
        sums, counts = accumulator.grid(heads, device=device)
        state = self._states.get(stage)
        if state is None or state.counts.shape != counts.shape or state.counts.device != counts.device:
            state = self._states[stage] = AttentionStatistics(accumulator.statistics, *counts.shape).to(device)
        state.reset()
        state.update(sums, counts, accumulator.max_grid(heads, device=device))  # max_logit: reduced with max
        values, rows = state.synced()
        kinds = self._require_capture().kinds
        cross = torch.tensor([kinds.get(layer) == CROSS for layer in self.layers], device=rows.device)
        for name in POSITION_STATISTICS & set(values):  # not defined for cross-attention
            values[name] = values[name].masked_fill(cross.unsqueeze(1), float("nan"))
        return values, rows > 0

    def _figure_job(
        self, writer: Any, stage: str, step: int, values: dict[str, Tensor], observed: Tensor, images: bool, heatmaps: bool,
        analysis: tuple[dict[str, float], ExampleAnalysis, list[str]] | None,
    ) -> Callable[[], None]:
        """Everything the figures need, copied to the CPU now; returns the job that draws and writes them."""
        layers, observed = list(self.layers), observed.cpu()
        values = {name: value.detach().cpu() for name, value in values.items()}
        maps = self._heatmap_inputs(stage) if heatmaps else []

        def job() -> None:
            if images:
                write_atlases(writer, stage, step, layers, values, observed)
            for layer, probs, keys, queries, cross in maps:
                write_heatmap(writer, stage, step, layer, probs, keys, queries, cross=cross)
            if analysis is not None:
                write_example(writer, stage, step, analysis[1], analysis[2])
            writer.flush()

        return job

    def _heatmap_inputs(self, stage: str) -> list[tuple[str, Tensor, list[str] | None, list[str] | None, bool]]:
        """``(layer, probs, key labels, query labels, cross)`` of each example layer drawn."""
        data, kinds = self.stages[stage], self._require_capture().kinds
        patterns = self.options.heatmaps.layers if self.options.heatmaps is not None else None
        maps = []
        for layer, example in data.accumulator.examples.items():
            if example.probs is None or not layer_selected(layer, patterns):
                continue
            cross = kinds.get(layer) == CROSS
            t_q, t_k = example.probs.shape[-2:]
            keys = data.labels(self.options.tokenizer, example.key_start, t_k)
            queries = data.labels(self.options.tokenizer, example.start, t_q, queries=cross)
            maps.append((layer, example.probs, keys, queries, cross))
        return maps

    def _example_analysis(self, stage: str) -> tuple[dict[str, float], ExampleAnalysis, list[str]] | None:
        """Analyses of the stage's example: ``(scalars, result, role changes)``, or None without an example."""
        data = self.stages[stage]
        classes = None if self.options.token_classes is None else {k: frozenset(v) for k, v in self.options.token_classes.items()}
        result = analyse_example(
            self.layers, data.accumulator.examples, data.labels(self.options.tokenizer), sink_tokens=self.options.sink_tokens,
            top_k=self.options.top_k, classes=classes, kinds=self._require_capture().kinds,
            query_tokens=data.labels(self.options.tokenizer, queries=True),
        )
        if result.roles is None:
            return None
        changes = role_changes(self._roles.get(stage), result.roles, result.layers)
        scalars = example_scalars(stage, result)
        scalars[tags.role_changes(stage)] = float(len(changes)) if stage in self._roles else 0.0
        self._roles[stage] = result.roles
        return scalars, result, changes

    # helpers ------------------------------------------------------------------------------
    def _prepare(self, capture: AttentionCapture, batch: Any) -> None:
        capture.query_mask = batch_tensor(batch, self.options.query_mask_key)
        capture.alignments = batch_tensor(batch, self.options.alignment_key)
        if isinstance(batch, Mapping):
            for option, consequence in (("input_key", "labels fall back to positions"), ("query_mask_key", "it masks nothing")):
                key = getattr(self.options, option)
                if key is not None and key not in batch:
                    self._warn(
                        f"missing-{option}",
                        f"attnmonitor: `{option}`={key!r} is not a key of the batch, whose keys are {sorted(map(str, batch))}: "
                        f"{consequence}. Set `{option}` to the right key.",
                    )

    def _require_capture(self) -> AttentionCapture:
        if self.capture is None:
            raise RuntimeError("attnmonitor: the monitor is not attached to a model (call attach(model) first)")
        return self.capture

    def _warn(self, key: str, message: str) -> None:
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        if key not in self._warned and rank == 0:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
