"""``AttentionCapture``: per-head attention statistics of any PyTorch model, without Lightning."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from attnmonitor.capture.accumulator import Example, StatisticsAccumulator
from attnmonitor.capture.calls import CROSS, CallTracker, ModuleCall, judge
from attnmonitor.capture.context_parallel import ContextParallel
from attnmonitor.capture.discovery import Targets, is_attention_like, is_named_attention, resolve_targets, target_name
from attnmonitor.capture.flex import flex_sites
from attnmonitor.capture.hooks import CallHooks, in_backward
from attnmonitor.capture.interception import AttentionInterceptor
from attnmonitor.capture.records import AttentionRecord
from attnmonitor.capture.report import CaptureReport
from attnmonitor.capture.sharding import head_placement
from attnmonitor.checks import check_int
from attnmonitor.config import CaptureConfig
from attnmonitor.functional.evaluation import AttentionCall, call_head_sums
from attnmonitor.functional.statistics import MAX_STATISTICS, POSITION_STATISTICS, STATISTICS

_MIB = 2**20


class Regularizer(Protocol):
    """What :class:`AttentionCapture` asks of a regularizer (penalty terms, clipping)."""

    active: bool
    """Whether it applies to the current forward at all."""

    def applies(self, layer: str, training: bool) -> bool:
        """Whether it regularizes this layer now (``training``: the module's mode)."""

    def apply(self, layer: str, probs: Tensor, key_valid: Tensor | None, query_valid: Tensor | None, training: bool) -> Tensor:
        """Take the layer's differentiable probabilities ``[B, H, Lq, Lk]``; return those to use."""


class AttentionCapture:
    """Capture per-head attention statistics from every attention module of a model.

    Hooks on the target modules activate an interceptor only while those modules run. Each
    ``scaled_dot_product_attention`` call, eager softmax or ``nn.MultiheadAttention`` call inside a
    target becomes per-head sums over its valid query rows, accumulated until :meth:`reset`. SDPA
    calls whose statistics allow it (no ``max_weight``/``sparsity``) are evaluated by one extra fused
    attention call without probabilities (:mod:`attnmonitor.functional.fused`); the others from
    probabilities recomputed in chunks of query rows that fit ``memory_budget_mb``.

    Each call is judged on its own (:mod:`attnmonitor.functional.masks`): its keys and padded query
    rows come from its own mask, never from a mask given to the model for another sequence; the sink
    is the first real token of the row's own sequence (or packed document). Each call is self- or
    cross-attention (:attr:`kinds`); cross-attention rows take the padding of the decoder side (the
    same block's self-attention) and have no position statistics (``distance``, ``self_weight``,
    ``prev_token_weight``, ``next_token_weight``).

    The options other than ``query_mask``, ``example_tokens`` and ``regularizer`` are those of
    :class:`attnmonitor.config.CaptureConfig` (the monitor's ``capture`` group).

    Args:
        model: any ``nn.Module``.
        targets: ``"auto"``: every module whose own forward computes attention (SDPA,
            ``nn.MultiheadAttention``, or a softmax over ``q·kᵀ`` scores), whatever its class name,
            decided while it runs (see :func:`attnmonitor.capture.discovery.auto_targets`); or a regex
            or list of regexes fully matching qualified module names, or a predicate ``(name, module) -> bool``.
        statistics: names from :data:`attnmonitor.functional.STATISTICS`.
        query_mask: ``[B, L]`` token mask (1/True = real token) also applied to self-attention calls
            with ``L`` queries, for models whose attention does not mask padding itself. Only for
            models with one sequence: it is not applied to cross-attention.
        memory_budget_mb: largest probability chunk materialised per call; larger calls are
            evaluated in chunks of query rows.
        sink_tokens: keys counted by ``sink_mass``, from the first real token of each sequence.
        sparsity_eps: a valid key is sparse when its weight is below ``sparsity_eps / n_i``.
        example_tokens: when > 0, keep the probabilities of batch element ``example_row`` among its first
            ``example_tokens`` tokens for each layer (:attr:`examples`, for heatmaps).
        regularizer: clips or regularizes the attention of the layers it applies to (see
            :class:`attnmonitor.regularization.AttentionRegularizer`); statistics then describe the
            probabilities the model used (after clipping).
        sample_rows: evaluate at most this many query rows (drawn at random, reproducibly) of each
            call on the chunked path: statistics become unbiased estimates at a fraction of the cost.
            None evaluates every row. The fused path always evaluates every row.
        pool_shared: a module called several times in one forward (a layer shared across depths, as
            in ALBERT) is reported per call position, ``name#0``, ``name#1``, ...; True pools its calls
            under ``name``.
        head_shard: ``[index, count]``: this process computes the ``index``-th of ``count`` equal slices
            of every layer's heads (tensor parallelism without DTensor); its heads are reported at their
            global index (see :mod:`attnmonitor.capture.sharding`).
        context_parallel: ``"contiguous"`` or ``"head_tail"``: each process holds these positions of
            every sequence; keys are gathered over ``context_parallel_group`` (None: every process) on
            captured SDPA calls (see :mod:`attnmonitor.capture.context_parallel`).

    Raises:
        ValueError: on invalid arguments, or when ``targets`` selects no module.

    Example:
        >>> layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, batch_first=True)
        >>> with AttentionCapture(layer) as cap:
        ...     _ = layer(torch.randn(3, 5, 8))
        >>> cap.layers, cap.kinds
        (['self_attn'], {'self_attn': 'self'})
        >>> cap.stats()["entropy"].shape  # [num_layers, num_heads]
        torch.Size([1, 2])
    """

    def __init__(
        self,
        model: nn.Module,
        targets: Targets = "auto",
        *,
        statistics: Sequence[str] = STATISTICS,
        query_mask: Tensor | None = None,
        memory_budget_mb: float = 256.0,
        sink_tokens: int = 1,
        sparsity_eps: float = 0.1,
        example_tokens: int = 0,
        regularizer: Regularizer | None = None,
        sample_rows: int | None = None,
        pool_shared: bool = False,
        head_shard: list[int] | None = None,
        context_parallel: str | None = None,
        context_parallel_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        try:
            options = CaptureConfig(
                targets,
                statistics,
                memory_budget_mb,
                sink_tokens,
                sparsity_eps,
                sample_rows,
                pool_shared,
                head_shard,
                context_parallel,
                context_parallel_group,
            )
        except ValueError as err:  # named as this constructor's arguments, not the monitor's `capture` group
            raise ValueError(str(err).replace("`capture.", "`")) from None
        statistics = tuple(options.statistics)
        check_int("example_tokens", example_tokens, 0)
        self.model = model
        self.targets = resolve_targets(model, targets)
        auto = isinstance(targets, str) and targets == "auto"
        self.query_mask = query_mask
        self.budget_bytes = int(memory_budget_mb * _MIB)
        self.sink_tokens, self.sparsity_eps = sink_tokens, sparsity_eps
        self.example_tokens, self.sample_rows = example_tokens, sample_rows
        self.regularizer = regularizer
        self.head_shard = options.head_shard
        self.context_parallel = None if context_parallel is None else ContextParallel(context_parallel, context_parallel_group)
        self.accumulator = StatisticsAccumulator(statistics)
        """Where statistics go, and which (its ``statistics``); swap it to keep separate sets (the
        monitor's train, val and alarm captures)."""
        self.alignments: Tensor | None = None
        """``[B, Lq]`` ground-truth key of each query row (negative: none), for alignment accuracy."""
        self.example_row = 0
        """The batch element kept as the example (``example_tokens``)."""
        self._enabled = True
        self.kinds: dict[str, str] = {}
        """``{layer: "self" | "cross"}`` of every layer captured since the capture was made."""
        self.report = CaptureReport()
        self._placements: dict[tuple[int, int], tuple[int, int] | None] = {}
        self._row_generator = torch.Generator().manual_seed(0)
        self._declared = {id(m) for m in self.targets.values() if not auto or is_attention_like(m)}
        named = {id(m) for m in self.targets.values() if not auto or is_named_attention(m)}
        interceptor = AttentionInterceptor(
            self._consume,
            lambda: bool(self._hooks.running),
            require_scores=lambda: id(self._hooks.running[-1].module) not in named,
            flex_sites=flex_sites(self.targets.values()),
            logit_max=self._wants_logit_max,
        )
        tracker = CallTracker(pool_shared, on_shared=self._split_shared)
        intercepting = lambda: self.enabled or (self.regularizer is not None and self.regularizer.active)  # noqa: E731
        self._hooks = CallHooks(model, self.targets, interceptor, intercepting, tracker, self._started, self._ended)

    # lifecycle -----------------------------------------------------------------------------
    def attach(self) -> AttentionCapture:
        """Register the hooks (idempotent)."""
        self._hooks.attach()
        return self

    def remove(self) -> None:
        """Remove every hook and leave any active interception (idempotent)."""
        self._hooks.remove()

    def __enter__(self) -> AttentionCapture:
        return self.attach()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.remove()

    @property
    def statistics(self) -> tuple[str, ...]:
        """The statistics collected now: those of the current :attr:`accumulator`."""
        return self.accumulator.statistics

    def _wants_logit_max(self) -> bool:
        """Whether the statistics collected now need the logits' row maxima (``max_logit``)."""
        return bool(MAX_STATISTICS & set(self.statistics))

    @property
    def enabled(self) -> bool:
        """Whether statistics are collected now (interception also runs while ``regularizer`` is active).

        Set it outside the model's forward. On a compiled model, forwards run eagerly (and hooked)
        only while this or the regularizer asks for interception; otherwise the compiled graph runs
        untouched (see :mod:`attnmonitor.capture.hooks`).
        """
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self._enabled = value
        self._hooks.update()

    def start(
        self,
        accumulator: StatisticsAccumulator,
        *,
        example_tokens: int = 0,
        query_mask: Tensor | None = None,
        alignments: Tensor | None = None,
    ) -> None:
        """Collect the next forwards' statistics into ``accumulator`` (until :meth:`stop`), with the
        batch's ``[B, L]`` query mask and ``[B, Lq]`` alignments, keeping examples of ``example_tokens``."""
        self.accumulator, self.example_tokens = accumulator, example_tokens
        self.query_mask, self.alignments = query_mask, alignments
        self.enabled = True

    def stop(self) -> None:
        """Collect nothing until the next :meth:`start` (the regularizer still applies)."""
        self.enabled = False

    # results -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every accumulated statistic (of the current :attr:`accumulator`)."""
        self.accumulator.reset()

    @property
    def layers(self) -> list[str]:
        """Layers captured since :meth:`reset`, in forward order (module names; ``name#i`` per call
        position of a module called several times per forward)."""
        return self.accumulator.layers

    @property
    def examples(self) -> dict[str, Example]:
        """``{layer: Example}`` of batch element ``example_row`` (see ``example_tokens``)."""
        return {layer: e for layer, e in self.accumulator.examples.items() if e.probs is not None}

    @property
    def skipped(self) -> dict[str, int]:
        """``{layer: captures skipped}`` (non-finite attention, a failure inside the monitor)."""
        return self.report.skipped

    @property
    def target_names(self) -> list[str]:
        """Qualified names of every target module, in definition order."""
        return [target_name(name, m) for name, m in self.targets.items()]

    def layer_stats(self) -> dict[str, dict[str, Tensor]]:
        """``{layer: {statistic: [num_heads]}}``: means over every valid query row since :meth:`reset`
        (cross-attention layers without the position statistics).

        Raises:
            RuntimeError: if nothing was captured (the message says which modules ran silently).
        """
        if not self.accumulator.counts:
            raise RuntimeError(self.report.nothing_captured(self.target_names))
        return self.accumulator.layer_means()

    def stats(self) -> dict[str, Tensor]:
        """``{statistic: [num_layers, num_heads]}``, layers in :attr:`layers` order.

        Statistics a layer does not define (position statistics of cross-attention) are NaN there.

        Raises:
            RuntimeError: if nothing was captured.
            ValueError: if layers have different head counts (use :meth:`layer_stats`).
        """
        per_layer = self.layer_stats()
        heads = self.accumulator.heads()
        if len(set(heads.values())) > 1:
            raise ValueError(f"layers have different head counts {heads}; use layer_stats()")
        undefined = torch.full_like(next(iter(self.accumulator.counts.values())), float("nan"))
        return {name: torch.stack([per_layer[layer].get(name, undefined) for layer in per_layer]) for name in self.statistics}

    def valid_rows(self) -> dict[str, Tensor]:
        """``{layer: [num_heads]}`` number of valid query rows accumulated since :meth:`reset`."""
        return dict(self.accumulator.counts)

    # calls ---------------------------------------------------------------------------------
    def _started(self, call: ModuleCall, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.enabled and self.example_tokens:
            example = self.accumulator.examples.setdefault(call.layer, Example())
            if example.inputs is None:
                example.inputs = _first_states(call.module, (*args, kwargs.get("hidden_states"), kwargs.get("query")), self.example_row)

    def _ended(self, call: ModuleCall, output: Any, produced: bool) -> None:
        if not produced:
            if id(call.module) in self._declared:
                self.report.silent_module(call.name, call.module)
        elif self.enabled and self.example_tokens:
            example = self.accumulator.examples.setdefault(call.layer, Example())
            if example.outputs is None:
                example.outputs = _first_states(call.module, output if isinstance(output, tuple) else (output,), self.example_row)

    def _head_placement(self, module: nn.Module, local_heads: int) -> tuple[int, int] | None:
        """Which global heads of ``module`` this process holds (tensor parallelism; None: all), once per module."""
        key = (id(module), local_heads)
        if key not in self._placements:
            placement = head_placement(module, local_heads)
            if placement is None and self.head_shard is not None:
                index, count = self.head_shard
                placement = (index * local_heads, count * local_heads)
            self._placements[key] = placement
        return self._placements[key]

    def _split_shared(self, name: str) -> None:
        """A module turned out to be shared: what its first call recorded becomes ``name#0``."""
        self.accumulator.rename(name, f"{name}#0")
        self.kinds = {f"{name}#0" if layer == name else layer: kind for layer, kind in self.kinds.items()}

    def _consume(self, record: AttentionRecord) -> Tensor | None:
        """Handle one record inside the attention call; returns the call's replacement output or None.

        Never raises: a failure is a warning naming the layer, and that call is left as it was.
        """
        call = self._hooks.running[-1]
        self._hooks.records += 1
        replacement = None
        try:
            record, warning = judge(call, record, self._hooks.tracker, sink_tokens=self.sink_tokens, query_mask=self.query_mask)
            if warning is not None:
                self.report.warn_once(call.layer, "queries", warning)
            regularizer = self.regularizer
            if regularizer is not None and regularizer.applies(call.name, call.training):
                probs, key_valid = record.probabilities()
                used = regularizer.apply(call.name, probs, key_valid, record.call.query_valid, call.training)
                replacement = record.output(used)
                logit_max = None  # the logits the softmax saw, before clipping
                if self.enabled and self._wants_logit_max():
                    logit_max = record.call.logit_row_max(self.budget_bytes)
                used_call = AttentionCall(
                    probs=used.detach(),
                    key_valid=key_valid,
                    query_valid=record.call.query_valid,
                    sink_keys=record.call.sink_keys,
                    logit_max=logit_max,
                )
                record = AttentionRecord(used_call)
            if self.enabled and not in_backward():  # a checkpointing recompute is not a new forward
                self._collect(call, record)
        except Exception as err:  # the monitor must never break the user's forward
            self.report.skip(call.layer, f"{type(err).__name__}: {err}")
        return replacement

    def _collect(self, call: ModuleCall, record: AttentionRecord) -> None:
        statistics = self.statistics
        if call.kind == CROSS:
            statistics = tuple(s for s in statistics if s not in POSITION_STATISTICS)
            if not statistics:
                return
        self.kinds.setdefault(call.layer, call.kind)
        b, _, lq, _ = record.shape
        alignments = self.alignments if self.alignments is not None and tuple(self.alignments.shape) == (b, lq) else None
        if self.context_parallel is not None:
            result = self.context_parallel.head_sums(
                record.call,
                statistics=statistics,
                sink_tokens=self.sink_tokens,
                sparsity_eps=self.sparsity_eps,
                budget_bytes=self.budget_bytes,
            )
        else:
            result = call_head_sums(
                record.call,
                statistics=statistics,
                sink_tokens=self.sink_tokens,
                sparsity_eps=self.sparsity_eps,
                budget_bytes=self.budget_bytes,
                rows=_sampled_rows(lq, self.sample_rows, self._row_generator),
                alignments=alignments,
            )
        # -inf is a maximum's "no valid row", not an error
        checked = [*result.sums.values(), *(m.masked_fill(m == float("-inf"), 0.0) for m in result.maxima.values())]
        if checked and not bool(torch.isfinite(torch.stack(checked)).all()):  # one sync
            self.report.skip(call.layer, "its attention contains NaN or inf")
            return
        if result.alignment is not None:
            self.accumulator.add_alignment(call.layer, result.alignment)
        refused = self.accumulator.add(call.layer, result.sums, result.count, result.maxima)
        self.accumulator.place(call.layer, self._head_placement(call.module, result.count.numel()))
        if refused:
            self.report.skip(call.layer, refused)
        elif self.example_tokens:
            example = self.accumulator.examples.setdefault(call.layer, Example())
            if example.probs is None:
                row = self.example_row if self.example_row < record.shape[0] else 0
                example.probs, example.key_valid, example.start, example.key_start = record.example(self.example_tokens, row)
                example.values = None if record.v is None else record.v[row].detach().float().cpu()


def _sampled_rows(lq: int, sample: int | None, generator: torch.Generator) -> Tensor | None:
    """``sample`` sorted random row indices of ``lq`` (None: every row)."""
    if sample is None or lq <= sample:
        return None
    return torch.randperm(lq, generator=generator)[:sample].sort().values


def _first_states(module: nn.Module, candidates: tuple[Any, ...], row: int = 0) -> Tensor | None:
    """Batch element ``row`` (0 when the batch is smaller; ``[L, C]``) of the first 3-D tensor among ``candidates``."""
    tensor = next((t for t in candidates if isinstance(t, Tensor) and t.dim() == 3), None)
    if tensor is None:
        return None
    sequence_first = isinstance(module, nn.MultiheadAttention) and not module.batch_first
    batch = tensor.shape[1] if sequence_first else tensor.shape[0]
    row = row if row < batch else 0
    return (tensor[:, row] if sequence_first else tensor[row]).detach().float().cpu()
