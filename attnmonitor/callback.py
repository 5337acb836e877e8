"""``AttentionMonitor``: the Lightning callback that logs attention statistics while a model trains."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.distributed import ReduceOp

from attnmonitor.capture import AttentionCapture, Targets
from attnmonitor.capture.accumulator import StatisticsAccumulator
from attnmonitor.capture.calls import CROSS
from attnmonitor.config import ClipConfig, HeatmapConfig, RegularizerConfig, as_config
from attnmonitor.functional.statistics import POSITION_STATISTICS, STATISTICS, check_statistics, mean_from_sums
from attnmonitor.metrics import AttentionStatistic
from attnmonitor.regularization import AttentionSteering
from attnmonitor.tensorboard import analyse_probe, role_changes
from attnmonitor.tensorboard.writer import write_atlases, write_heatmap, write_probe

Decoder = Callable[[Sequence[int]], Sequence[str]]


class AttentionMonitor(Callback):
    """Log how every attention layer and head distributes its attention, while training.

    Training captures every ``every_n_steps`` optimizer steps (every micro-batch of that step under
    gradient accumulation); validation captures the first ``val_batches`` batches of each run.
    Statistics are torchmetrics states (exact under DDP), logged to every logger as
    ``attn/<train|val>/<statistic>`` (mean over layers and heads) and ``.../<statistic>/<layer>``;
    with a ``TensorBoardLogger`` also head atlases, histograms, heatmaps and a per-head table.

    Args:
        targets: attention modules: ``"auto"``, regexes fully matching module names, or a predicate.
        statistics: names from :data:`attnmonitor.STATISTICS`.
        every_n_steps: training capture interval in optimizer steps.
        per_head: also log one scalar per head (``.../<statistic>/<layer>/head_<h>``).
        heatmaps: :class:`HeatmapConfig` (or a mapping of its fields); None disables heatmaps.
        decoder: ids -> token strings for heatmap labels (a callable or a tokenizer).
        val_batches: validation batches captured per validation run (0 disables).
        atlas_every_n_steps: training interval of head atlases, histograms and the table.
        input_key: batch key (mapping batches) holding the token ids; tuple batches use item 0.
        query_mask_key: None (default): padding is read from each attention call's own mask. A batch
            key holding a ``[B, L]`` mask (1 = real token) additionally applied to every
            self-attention call with ``L`` queries, for single-sequence models whose attention does
            not mask padding itself (never use it for encoder-decoders).
        decoder_input_key: batch key (mapping batches) of the decoder's token ids, labelling the
            queries of cross-attention heatmaps and tables (positions when absent).
        memory_budget_mb: largest probability chunk materialised per attention call.
        sink_tokens: leading keys counted by ``sink_mass``.
        sparsity_eps: a key is sparse when its weight is below ``sparsity_eps / n_i``.
        sample_rows: evaluate at most this many random query rows per attention call on the chunked
            path (estimates; None: every row).
        pool_shared: report a module called several times per forward (shared across depths) under
            one name instead of ``name#0``, ``name#1``, ...
        regularizer: :class:`RegularizerConfig` (or mapping): an entropy/sparsity penalty added to the
            training loss (automatic optimization) or returned by :meth:`penalty` (manual).
        clip: :class:`ClipConfig` (or mapping): exact clipping of the attention weights the model uses.
        analyses: run the seed's analyses on the probe example whenever atlases are drawn (roles,
            similarity, composition, positional profile, token classes, rollout, embeddings).
        alignment_key: batch key of ``[B, Lq]`` ground-truth key positions (negative: none); when
            present, ``attn/<stage>/alignment_accuracy/<layer>`` is logged.
        top_k: keys listed per query in the interpretation table.
        token_classes: ``{class: [tokens]}`` for the attention-share analysis (default: English
            function words vs content words).

    Raises:
        ValueError: for an invalid option (named in the message); at ``setup`` for targets that
            select no module of the model.

    Example:
        >>> from attnmonitor import AttentionMonitor
        >>> monitor = AttentionMonitor(statistics=["entropy", "sink_mass"], every_n_steps=10)
        >>> trainer = pl.Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)  # doctest: +SKIP
    """

    def __init__(
        self,
        targets: Targets = "auto",
        statistics: Sequence[str] = STATISTICS,
        every_n_steps: int = 50,
        per_head: bool = False,
        heatmaps: HeatmapConfig | Mapping[str, Any] | None = None,
        decoder: Decoder | Any | None = None,
        val_batches: int = 1,
        atlas_every_n_steps: int = 500,
        input_key: str = "input_ids",
        query_mask_key: str | None = None,
        decoder_input_key: str = "decoder_input_ids",
        memory_budget_mb: float = 256.0,
        sink_tokens: int = 1,
        sparsity_eps: float = 0.1,
        sample_rows: int | None = None,
        pool_shared: bool = False,
        regularizer: RegularizerConfig | Mapping[str, Any] | None = None,
        clip: ClipConfig | Mapping[str, Any] | None = None,
        analyses: bool = True,
        alignment_key: str = "alignments",
        top_k: int = 5,
        token_classes: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        _check_int("every_n_steps", every_n_steps, 1)
        _check_int("val_batches", val_batches, 0)
        _check_int("atlas_every_n_steps", atlas_every_n_steps, 1)
        if decoder is not None and not (callable(decoder) or hasattr(decoder, "convert_ids_to_tokens")):
            raise ValueError(f"`decoder` must be a callable ids -> strings or a tokenizer, got {type(decoder).__name__}")
        self.targets = targets
        self.statistics = check_statistics(list(statistics))
        self.every_n_steps = every_n_steps
        self.per_head = bool(per_head)
        self.heatmaps = as_config(HeatmapConfig() if heatmaps is None else heatmaps, HeatmapConfig, "heatmaps")
        self.decoder = decoder
        self.val_batches = val_batches
        self.atlas_every_n_steps = atlas_every_n_steps
        self.input_key, self.query_mask_key, self.decoder_input_key = input_key, query_mask_key, decoder_input_key
        self.capture_options = dict(
            memory_budget_mb=memory_budget_mb, sink_tokens=sink_tokens, sparsity_eps=sparsity_eps, sample_rows=sample_rows
        )
        if not isinstance(pool_shared, bool):
            raise ValueError(f"`pool_shared` must be a bool, got {pool_shared!r}")
        self.pool_shared = pool_shared
        AttentionCapture._check_options(**self.capture_options)
        _check_int("top_k", top_k, 1)
        if token_classes is not None and not (isinstance(token_classes, Mapping) and token_classes):
            raise ValueError(f"`token_classes` must be a non-empty mapping class -> tokens, got {token_classes!r}")
        self.analyses, self.alignment_key, self.top_k = bool(analyses), alignment_key, top_k
        self.token_classes = None if token_classes is None else {k: list(v) for k, v in token_classes.items()}
        self._roles: dict[str, Tensor] = {}
        self.steering = AttentionSteering(regularizer, clip)
        self.last_train_step = -1  # last optimizer step whose training capture was logged
        self._capture: AttentionCapture | None = None
        self._accumulators = {stage: StatisticsAccumulator(self.statistics) for stage in ("train", "val")}
        self._module: pl.LightningModule | None = None
        self._metrics: dict[str, dict[str, AttentionStatistic]] = {}
        self._window_step: int | None = None  # optimizer step being captured
        self._example_ids: dict[str, Tensor | None] = {}
        self._terms: dict[str, Tensor | None] | None = None
        self._last_penalty: Tensor | None = None
        self._warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(targets=repr(self.targets), statistics=self.statistics, every_n_steps=self.every_n_steps)

    # lifecycle ----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._capture is not None:
            return
        heatmap_tokens = self.heatmaps.max_tokens if self.heatmaps is not None else 0
        capture = AttentionCapture(
            pl_module,
            self.targets,
            statistics=self.statistics,
            example_tokens=heatmap_tokens,
            steering=self.steering if self.steering.active else None,
            pool_shared=self.pool_shared,
            **self.capture_options,
        )
        self.layers: list[str] = []
        """Layers captured so far (on any process), in forward order."""
        for option, config in (("heatmaps", self.heatmaps), ("regularizer", self.steering.regularizer), ("clip", self.steering.clip)):
            patterns = getattr(config, "layers", None)
            if patterns is not None and not _matching(capture.target_names, patterns):
                raise ValueError(
                    f"`{option}.layers`={patterns} matches none of the attention layers (modules) {capture.target_names}"
                )
        capture.enabled = False
        self._capture = capture.attach()
        self.steering.regularizing = False
        if self.steering.regularizer is not None and self.steering.regularizer.enabled and pl_module.automatic_optimization:
            self._inject_penalty(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None
        if self._module is not None:
            self._module.__dict__.pop("training_step", None)
            self._module = None
        self._window_step = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def state_dict(self) -> dict[str, Any]:
        return {"last_train_step": self.last_train_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_train_step = int(state_dict["last_train_step"])

    # training -----------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        capture = self._require_capture()
        step = trainer.global_step
        reg = self.steering.regularizer
        if reg is not None and reg.enabled:
            self.steering.regularizing = True
            self.steering.scale = min(1.0, step / reg.warmup_steps) if reg.warmup_steps else 1.0
        capture.query_mask = self._query_mask(batch)
        capture.alignments = self._batch_tensor(batch, self.alignment_key)
        if step % self.every_n_steps or step <= self.last_train_step:
            return
        capture.accumulator = self._accumulators["train"]
        if self._window_step != step:  # first micro-batch of this optimizer step
            capture.reset()
            self._window_step = step
            self._example_ids["train"] = self._input_ids(batch)
            self._example_ids["train-queries"] = self._input_ids(batch, self.decoder_input_key)
        capture.enabled = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        capture = self._require_capture()
        capture.enabled = False
        self._log_steering(pl_module)
        if self._window_step is not None and trainer.global_step != self._window_step:  # the optimizer stepped
            step, self._window_step = self._window_step, None
            self.last_train_step = step
            self._publish(trainer, "train", step, images=step % self.atlas_every_n_steps == 0, heatmaps=self._train_heatmaps(step))

    # steering ------------------------------------------------------------------------------
    def penalty(self) -> Tensor:
        """The regularizer's penalty for the attention computed since the last call (0-dim tensor).

        Added to the loss automatically under automatic optimization; under manual optimization (or
        in your own loop) add it yourself: ``self.manual_backward(loss + monitor.penalty())``.
        """
        penalty = self.steering.penalty()
        self._last_penalty = penalty.detach()
        self._terms = self.steering.terms
        return penalty

    def _inject_penalty(self, pl_module: pl.LightningModule) -> None:
        """Wrap this module's ``training_step`` so its loss includes :meth:`penalty` (undone at teardown)."""
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            penalty = self.penalty()
            self.steering.regularizing = False  # a checkpointing recompute in backward must not add terms
            return _add_to_loss(output, penalty)

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._module = pl_module

    def _log_steering(self, pl_module: pl.LightningModule) -> None:
        regularizing, self.steering.regularizing = self.steering.regularizing, False
        if regularizing and self.steering.pending:
            self.steering.discard()
            raise RuntimeError(
                "attnmonitor: the attention regularizer's penalty was computed but never added to a loss. With manual "
                "optimization (or a training_step the monitor cannot wrap) add it yourself: "
                "`self.manual_backward(loss + monitor.penalty())`."
            )
        if self._terms is not None:
            for name, term in self._terms.items():
                if term is not None:
                    pl_module.log(f"attn/reg/{name}", term.detach(), on_step=True, on_epoch=False)
            pl_module.log("attn/reg/penalty", self._last_penalty, on_step=True, on_epoch=False)
            self._terms = None
        if self.steering.clip is not None:
            fraction = self.steering.clip_fraction()
            if fraction is not None:
                pl_module.log("attn/clip/fraction", fraction, on_step=True, on_epoch=False)

    # validation ---------------------------------------------------------------------------
    def on_validation_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.sanity_checking or dataloader_idx != 0 or batch_idx >= self.val_batches:
            return
        capture = self._require_capture()
        capture.accumulator = self._accumulators["val"]
        if batch_idx == 0:
            capture.reset()
            self._example_ids["val"] = self._input_ids(batch)
            self._example_ids["val-queries"] = self._input_ids(batch, self.decoder_input_key)
        capture.query_mask = self._query_mask(batch)
        capture.alignments = self._batch_tensor(batch, self.alignment_key)
        capture.enabled = True

    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        capture = self._require_capture()
        capture.enabled = False
        capture.accumulator = self._accumulators["train"]

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and self.val_batches:
            self._publish(trainer, "val", trainer.global_step, images=True, heatmaps=self.heatmaps is not None)

    # publishing ---------------------------------------------------------------------------
    def compute(self, stage: str, trainer: pl.Trainer | None = None) -> tuple[dict[str, Tensor], Tensor] | None:
        """Synced ``{statistic: [L, H]}`` means and bool ``[L, H]`` observed cells of the last capture.

        Feeds the capture's sums into the stage's torchmetrics (``"sum"``-reduced across processes).
        Every process takes part, also one that captured nothing (its counts are zero), so the
        collectives always match. Returns None when no process captured anything.
        """
        accumulator = self._accumulators[stage]
        local_heads = max((c.numel() for c in accumulator.counts.values()), default=0)
        heads = local_heads
        if trainer is not None and trainer.world_size > 1:
            heads = int(trainer.strategy.reduce(torch.tensor(float(local_heads), device=trainer.strategy.root_device), reduce_op=ReduceOp.MAX))
        if heads == 0:
            return None
        device = trainer.strategy.root_device if trainer is not None else None
        self.layers = self._known_layers(accumulator.layers, trainer)
        sums, counts = accumulator.grid(self.layers, heads=heads, device=device)
        metrics = self._stage_metrics(stage, counts)
        values: dict[str, Tensor] = {}
        for name, metric in metrics.items():
            metric.update(sums=sums[name], counts=counts)
            with metric.sync_context():
                total, rows = metric.sums.clone(), metric.counts.clone()
            metric.reset()
            values[name] = mean_from_sums(total, rows)
        kinds = self._require_capture().kinds
        cross = torch.tensor([kinds.get(layer) == CROSS for layer in self.layers], device=rows.device)
        for name in POSITION_STATISTICS & set(values):  # not defined for cross-attention
            values[name] = values[name].masked_fill(cross.unsqueeze(1), float("nan"))
        return values, rows > 0

    def _known_layers(self, local: Sequence[str], trainer: pl.Trainer | None) -> list[str]:
        """Layers seen so far here and (distributed) on every process, in first-seen order."""
        seen = list(self.layers) + [layer for layer in local if layer not in self.layers]
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered: list[list[str] | None] = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, seen)
            for other in gathered:
                seen += [layer for layer in other or [] if layer not in seen]
        return seen

    def _publish(self, trainer: pl.Trainer, stage: str, step: int, images: bool, heatmaps: bool) -> None:
        try:
            computed = self.compute(stage, trainer)
            if computed is None:
                self._warn(f"nothing-{stage}", f"attnmonitor: no attention was captured at {stage} step {step}; nothing logged.")
                return
            values, observed = computed
            scalars = self._scalars(stage, values, observed)
            for logger in trainer.loggers:
                logger.log_metrics(scalars, step=step)
            if trainer.is_global_zero:
                self._write_tensorboard(trainer, stage, step, values, observed, images, heatmaps)
        except Exception as err:  # the monitor never stops training
            self._warn(f"publish-{type(err).__name__}", f"attnmonitor: logging {stage} attention failed at step {step}: {err!r}")

    def _scalars(self, stage: str, values: dict[str, Tensor], observed: Tensor) -> dict[str, float]:
        scalars: dict[str, float] = {}
        skipped = sum(self._require_capture().skipped.values())
        if skipped:  # captures skipped since fit start (non-finite attention, ...), each warned once per layer
            scalars["attn/skipped_captures"] = float(skipped)
        accuracy = {layer: float(c[0] / c[1]) for layer, c in self._accumulators[stage].alignment.items() if c[1] > 0}
        if accuracy:
            scalars[f"attn/{stage}/alignment_accuracy"] = max(accuracy.values())  # the best-aligned layer
            scalars.update({f"attn/{stage}/alignment_accuracy/{layer}": a for layer, a in accuracy.items()})
        for name, grid in values.items():
            defined = observed & ~grid.isnan()
            if not defined.any():
                continue
            scalars[f"attn/{stage}/{name}"] = float(grid[defined].mean())
            for row, layer in enumerate(self.layers):
                heads = defined[row]
                if heads.any():
                    scalars[f"attn/{stage}/{name}/{layer}"] = float(grid[row][heads].mean())
                    if self.per_head:
                        for h in heads.nonzero().flatten().tolist():
                            scalars[f"attn/{stage}/{name}/{layer}/head_{h}"] = float(grid[row, h])
        return scalars

    # helpers ------------------------------------------------------------------------------
    def _stage_metrics(self, stage: str, counts: Tensor) -> dict[str, AttentionStatistic]:
        metrics = self._metrics.get(stage)
        if metrics is None or next(iter(metrics.values())).counts.shape != counts.shape:
            metrics = {
                name: AttentionStatistic(name, *counts.shape, **self._metric_options()).to(counts.device)
                for name in self.statistics
            }
            self._metrics[stage] = metrics
        return metrics

    def _metric_options(self) -> dict[str, Any]:
        return {k: self.capture_options[k] for k in ("sink_tokens", "sparsity_eps")}

    def _train_heatmaps(self, step: int) -> bool:
        every = self.heatmaps.every_n_steps if self.heatmaps is not None else None
        return every is not None and step % every == 0

    def _heatmap_layers(self) -> list[str]:
        patterns = self.heatmaps.layers if self.heatmaps is not None else None
        return list(self.layers) if patterns is None else _matching(self.layers, patterns)

    def _require_capture(self) -> AttentionCapture:
        if self._capture is None:
            raise RuntimeError("attnmonitor: the monitor was not set up (it runs inside Trainer.fit/validate)")
        return self._capture

    def _write_tensorboard(
        self, trainer: pl.Trainer, stage: str, step: int, values: dict[str, Tensor], observed: Tensor, images: bool, heatmaps: bool
    ) -> None:
        """Images, histograms and text (TensorBoardLogger only), then flush so a running TensorBoard sees them."""
        writer = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if writer is None:
            if images or heatmaps:
                names = [type(lg).__name__ for lg in trainer.loggers]
                self._warn("no-tensorboard", f"attnmonitor: images skipped: no TensorBoardLogger among the trainer's loggers {names}.")
            return
        if images:
            write_atlases(writer, stage, step, self.layers, values, observed)
            if self.analyses:
                self._write_probe_analyses(trainer, writer, stage, step)
        if heatmaps:
            examples = self._accumulators[stage].examples
            ids = self._example_ids.get(stage)
            states = self._accumulators[stage].example_states
            kinds = self._require_capture().kinds
            for layer in self._heatmap_layers():
                if layer in examples:
                    probs, layer_states = examples[layer], states.get(layer, {})
                    start, key_start = int(layer_states.get("start", 0)), int(layer_states.get("key_start", 0))
                    query_ids = self._example_ids.get(f"{stage}-queries") if kinds.get(layer) == CROSS else ids
                    keys = self._tokens(ids[key_start : key_start + probs.shape[-1]]) if ids is not None else None
                    queries = self._tokens(query_ids[start : start + probs.shape[-2]]) if query_ids is not None else None
                    write_heatmap(writer, stage, step, layer, probs, keys, queries, cross=kinds.get(layer) == CROSS)
        writer.flush()

    def _write_probe_analyses(self, trainer: pl.Trainer, writer: Any, stage: str, step: int) -> None:
        """The seed's analyses on the probe example: scalars to every logger, figures and text to TensorBoard."""
        ids, query_ids = self._example_ids.get(stage), self._example_ids.get(f"{stage}-queries")
        tokens = self._tokens(ids) if ids is not None else None
        classes = None if self.token_classes is None else {k: frozenset(v) for k, v in self.token_classes.items()}
        result = analyse_probe(
            self.layers,
            self._accumulators[stage],
            tokens,
            prefix=f"attn/{stage}/probe",
            sink_tokens=self.capture_options["sink_tokens"],
            top_k=self.top_k,
            classes=classes,
            kinds=self._require_capture().kinds,
            query_tokens=self._tokens(query_ids) if query_ids is not None else None,
        )
        if result.roles is None:
            return
        changes = role_changes(self._roles.get(stage), result.roles, result.layers)
        result.scalars[f"attn/{stage}/role_changes"] = float(len(changes)) if stage in self._roles else 0.0
        self._roles[stage] = result.roles
        for logger in trainer.loggers:
            logger.log_metrics(result.scalars, step=step)
        write_probe(writer, stage, step, result, changes, tokens)

    def _tokens(self, ids: Tensor) -> list[str]:
        ids_list = ids.tolist()
        if hasattr(self.decoder, "convert_ids_to_tokens"):
            return list(self.decoder.convert_ids_to_tokens(ids_list))
        if self.decoder is not None:
            return [str(t) for t in self.decoder(ids_list)]
        return [str(i) for i in ids_list]

    def _input_ids(self, batch: Any, key: str | None = None) -> Tensor | None:
        ids = _batch_item(batch, key or self.input_key) if key is None or isinstance(batch, Mapping) else None
        if isinstance(ids, Tensor) and ids.dim() == 2 and not ids.is_floating_point():
            return ids[0].detach().cpu()
        return None

    def _query_mask(self, batch: Any) -> Tensor | None:
        return None if self.query_mask_key is None else self._batch_tensor(batch, self.query_mask_key)

    @staticmethod
    def _batch_tensor(batch: Any, key: str) -> Tensor | None:
        """``batch[key]`` when the batch is a mapping holding a ``[B, L]`` tensor there."""
        value = batch.get(key) if isinstance(batch, Mapping) else None
        return value if isinstance(value, Tensor) and value.dim() == 2 else None

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message, category=RuntimeWarning)


def _matching(layers: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """Layers (``name`` or a shared module's ``name#i``) whose module name fully matches a pattern."""
    return [layer for layer in layers if any(re.fullmatch(p, layer.split("#")[0]) for p in patterns)]


def _add_to_loss(output: Any, penalty: Tensor) -> Any:
    """``training_step`` output with ``penalty`` added to its loss (a tensor or a mapping's ``"loss"``)."""
    if isinstance(output, Tensor):
        return output + penalty
    if isinstance(output, Mapping) and isinstance(output.get("loss"), Tensor):
        return {**output, "loss": output["loss"] + penalty}
    return output  # None skips the step: nothing to add


def _batch_item(batch: Any, key: str) -> Any:
    if isinstance(batch, Mapping):
        return batch.get(key)
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    return batch


def _check_int(option: str, value: Any, minimum: int) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"`{option}` must be an int >= {minimum}, got {value!r}")
