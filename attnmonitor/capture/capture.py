"""``AttentionCapture``: per-head attention statistics of any PyTorch model, without Lightning."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator, Sequence
from types import TracebackType
from dataclasses import replace
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from attnmonitor.capture.accumulator import StatisticsAccumulator
from attnmonitor.capture.calls import CROSS, SELF, Call, CallTracker, attention_kind
from attnmonitor.capture.discovery import (
    Targets,
    fast_path_hosts,
    innermost,
    is_attention_like,
    is_named_attention,
    resolve_targets,
)
from attnmonitor.capture.interception import AttentionInterceptor
from attnmonitor.capture.records import AttentionRecord, unpack_query_heads
from attnmonitor.functional.chunked import Chunk, chunked_head_sums
from attnmonitor.functional.fused import fused_row_statistics
from attnmonitor.functional.masks import diagonal_valid, sink_keys
from attnmonitor.functional.statistics import POSITION_STATISTICS, STATISTICS, check_statistics, head_sums

_MIB = 2**20


class Steering(Protocol):
    """What :class:`AttentionCapture` asks of a steering object (clipping, regularization)."""

    active: bool
    """Whether it applies to the current forward at all."""

    def applies(self, layer: str, training: bool) -> bool:
        """Whether it steers this layer now (``training``: the module's mode)."""

    def steer(
        self, layer: str, probs: Tensor, key_valid: Tensor | None, query_valid: Tensor | None, training: bool
    ) -> Tensor:
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
        example_tokens: when > 0, keep the probabilities of batch element 0 among its first
            ``example_tokens`` tokens for each layer (:attr:`examples`, for heatmaps).
        steering: clips or regularizes the attention of the layers it applies to (see
            :class:`attnmonitor.regularization.AttentionSteering`); statistics then describe the
            probabilities the model used (after clipping).
        sample_rows: evaluate at most this many query rows (drawn at random, reproducibly) of each
            call on the chunked path: statistics become unbiased estimates at a fraction of the cost.
            None evaluates every row. The fused path always evaluates every row.
        pool_shared: a module called several times in one forward (a layer shared across depths, as
            in ALBERT) is reported per call position, ``name#0``, ``name#1``, ...; True pools its calls
            under ``name``.

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
        steering: Steering | None = None,
        sample_rows: int | None = None,
        pool_shared: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ValueError(f"`model` must be a torch.nn.Module, got {type(model).__name__}")
        self.statistics = check_statistics(statistics)
        self._check_options(memory_budget_mb, sink_tokens, sparsity_eps, sample_rows)
        if not (isinstance(example_tokens, int) and example_tokens >= 0):
            raise ValueError(f"`example_tokens` must be an int >= 0, got {example_tokens!r}")
        if not isinstance(pool_shared, bool):
            raise ValueError(f"`pool_shared` must be a bool, got {pool_shared!r}")
        self.model = model
        self.targets = resolve_targets(model, targets)
        self._auto = isinstance(targets, str) and targets == "auto"
        self.query_mask = query_mask
        self.budget_bytes = int(memory_budget_mb * _MIB)
        self.sink_tokens = sink_tokens
        self.sparsity_eps = sparsity_eps
        self.example_tokens = example_tokens
        self.sample_rows = sample_rows
        self._row_generator = torch.Generator().manual_seed(0)
        self.steering = steering
        self.accumulator = StatisticsAccumulator(self.statistics)
        """Where statistics go; swap it to keep separate sets (the callback's train and val)."""
        self.alignments: Tensor | None = None
        """``[B, Lq]`` ground-truth key of each query row (negative: none), for alignment accuracy."""
        self.enabled = True
        """Whether statistics are collected now (interception also runs while ``steering`` is active)."""
        self.kinds: dict[str, str] = {}
        """``{layer: "self" | "cross"}`` of every layer captured since the capture was made."""
        self._names = {id(m): (name or type(m).__name__) for name, m in self.targets.items()}
        self._declared = {id(m) for m in self.targets.values() if not self._auto or is_attention_like(m)}
        self._named = {id(m) for m in self.targets.values() if not self._auto or is_named_attention(m)}
        self._interceptor = AttentionInterceptor(
            self._consume, lambda: bool(self._active), require_scores=lambda: id(self._active[-1].module) not in self._named
        )
        self._calls = CallTracker(pool_shared)

        self._handles: list[RemovableHandle] = []
        self._eager_targets: list[nn.Module] = []
        self._active: list[Call] = []  # target calls running now, innermost last
        self._frames: list[tuple[bool, int]] = []  # per hooked call: (interceptor entered, records before)
        self._scope_depth = 0
        self._forward_depth = 0  # ancestors of targets running now
        self._records = 0
        self._silent: set[str] = set()
        self._warned: set[tuple[str, str]] = set()
        self.skipped: dict[str, int] = {}

    @staticmethod
    def _check_options(memory_budget_mb: float, sink_tokens: int, sparsity_eps: float, sample_rows: int | None = None) -> None:
        """Raise ``ValueError`` naming the first invalid option."""
        if sample_rows is not None and not (isinstance(sample_rows, int) and not isinstance(sample_rows, bool) and sample_rows >= 1):
            raise ValueError(f"`sample_rows` must be an int >= 1 or None, got {sample_rows!r}")
        if not (isinstance(memory_budget_mb, (int, float)) and memory_budget_mb > 0):
            raise ValueError(f"`memory_budget_mb` must be > 0, got {memory_budget_mb!r}")
        if not (isinstance(sink_tokens, int) and not isinstance(sink_tokens, bool) and sink_tokens >= 1):
            raise ValueError(f"`sink_tokens` must be an int >= 1, got {sink_tokens!r}")
        if not (isinstance(sparsity_eps, (int, float)) and 0 < sparsity_eps <= 1):
            raise ValueError(f"`sparsity_eps` must be in (0, 1], got {sparsity_eps!r}")

    # lifecycle -----------------------------------------------------------------------------
    def attach(self) -> AttentionCapture:
        """Register the hooks (idempotent)."""
        if self._handles:
            return self
        if _is_compiled(self.model):
            self._run_targets_eagerly()
        for module in self.targets.values():
            self._handles.append(module.register_forward_pre_hook(self._enter_target, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._exit_target, always_call=True))
        for host in fast_path_hosts(self.model, self.targets):  # keep the attention submodule on the traced path
            self._handles.append(host.register_forward_pre_hook(self._enter_host))
            self._handles.append(host.register_forward_hook(self._exit_host, always_call=True))
        for ancestor in _ancestors(self.model, self.targets):  # where a forward of the model begins
            self._handles.append(ancestor.register_forward_pre_hook(self._enter_ancestor))
            self._handles.append(ancestor.register_forward_hook(self._exit_ancestor, always_call=True))
        return self

    def remove(self) -> None:
        """Remove every hook and leave any active interception (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._eager_targets:
            del module.forward  # back to the class's forward
        self._eager_targets.clear()
        while self._scope_depth:
            self._leave_scope()
        self._active.clear()
        self._frames.clear()
        self._forward_depth = 0

    def __enter__(self) -> AttentionCapture:
        return self.attach()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()

    def _run_targets_eagerly(self) -> None:
        """Hooks do not run inside ``torch.compile``d graphs: run the attention modules outside them."""
        warnings.warn(
            "attnmonitor: the model is compiled with torch.compile; while the capture is attached its attention "
            "modules run eagerly (graph breaks around them) so that their attention can be intercepted.",
            RuntimeWarning,
            stacklevel=3,
        )
        for module in innermost(self.targets).values():
            if "forward" not in module.__dict__:
                module.forward = torch.compiler.disable(module.forward, recursive=False)  # type: ignore[method-assign]
                self._eager_targets.append(module)

    # results -------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every accumulated statistic (of the current :attr:`accumulator`)."""
        self.accumulator.reset()

    @property
    def layers(self) -> list[str]:
        """Qualified names of the attention modules captured since :meth:`reset`, in forward order."""
        return self.accumulator.layers

    @property
    def examples(self) -> dict[str, Tensor]:
        """``{layer: [H, T, T]}`` probabilities of batch element 0 (see ``example_tokens``)."""
        return self.accumulator.examples

    def layer_stats(self) -> dict[str, dict[str, Tensor]]:
        """``{layer: {statistic: [num_heads]}}``: means over every valid query row since :meth:`reset`.

        Raises:
            RuntimeError: if nothing was captured (the message says which modules ran silently).
        """
        self._require_data()
        return self.accumulator.layer_means()

    def stats(self) -> dict[str, Tensor]:
        """``{statistic: [num_layers, num_heads]}``, layers in :attr:`layers` order.

        Statistics a layer does not define (position statistics of cross-attention) are NaN there.

        Raises:
            RuntimeError: if nothing was captured.
            ValueError: if layers have different head counts (use :meth:`layer_stats`).
        """
        per_layer = self.layer_stats()
        heads = {layer: c.numel() for layer, c in self.accumulator.counts.items()}
        if len(set(heads.values())) > 1:
            raise ValueError(f"layers have different head counts {heads}; use layer_stats()")
        undefined = torch.full_like(next(iter(self.accumulator.counts.values())), float("nan"))
        return {
            name: torch.stack([per_layer[layer].get(name, undefined) for layer in per_layer]) for name in self.statistics
        }

    def valid_rows(self) -> dict[str, Tensor]:
        """``{layer: [num_heads]}`` number of valid query rows accumulated since :meth:`reset`."""
        return dict(self.accumulator.counts)

    def _require_data(self) -> None:
        if not self.accumulator.counts:
            raise RuntimeError(self._nothing_captured_message())

    @property
    def target_names(self) -> list[str]:
        """Qualified names of every target module, in definition order."""
        return list(self._names.values())

    # hooks ---------------------------------------------------------------------------------
    def _enter_scope(self) -> None:
        if self._scope_depth == 0:
            self._interceptor.__enter__()
        self._scope_depth += 1

    def _leave_scope(self) -> None:
        self._scope_depth -= 1
        if self._scope_depth == 0:
            self._interceptor.__exit__(None, None, None)

    def _intercepting(self) -> bool:
        return self.enabled or (self.steering is not None and self.steering.active)

    def _enter_host(self, module: nn.Module, args: Any) -> None:
        intercepting = self._intercepting()
        self._frames.append((intercepting, self._records))
        if intercepting:
            self._enter_scope()

    def _exit_host(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._frames and self._frames.pop()[0]:
            self._leave_scope()

    def _enter_ancestor(self, module: nn.Module, args: Any) -> None:
        if self._forward_depth == 0:
            self._calls.new_forward()
        self._forward_depth += 1

    def _exit_ancestor(self, module: nn.Module, args: Any, output: Any) -> None:
        self._forward_depth = max(0, self._forward_depth - 1)

    def _enter_target(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = self._names[id(module)]
        if self._forward_depth == 0 and not self._active:  # called on its own, not inside the model's forward
            self._calls.restart(name)
        layer, newly_shared = self._calls.layer(name)
        if newly_shared:
            self._rename(name, f"{name}#0")
        self._enter_host(module, args)
        if self._frames[-1][0]:
            self._active.append(Call(module, name, layer, attention_kind(module, args, kwargs), module.training))
            if self.enabled and self.example_tokens:
                self._keep_example_state(layer, module, "inputs", (*args, kwargs.get("hidden_states"), kwargs.get("query")))

    def _exit_target(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._frames:
            return
        entered, records_before = self._frames[-1]
        if entered:
            call = self._active.pop()
            if self._records == records_before and not _raising():
                if id(module) in self._declared:
                    self._report_silent(call.name, module)
            elif self.enabled and self.example_tokens:
                self._keep_example_state(call.layer, module, "outputs", output if isinstance(output, tuple) else (output,))
        self._exit_host(module, args, output)

    def _rename(self, old: str, new: str) -> None:
        """A module turned out to be shared: what its first call recorded becomes ``name#0``."""
        self.accumulator.rename(old, new)
        if old in self.kinds:
            self.kinds = {new if layer == old else layer: kind for layer, kind in self.kinds.items()}

    def _keep_example_state(self, layer: str, module: nn.Module, kind: str, candidates: tuple[Any, ...]) -> None:
        """Keep batch element 0 of the first 3-D tensor among ``candidates`` (``[L, C]``), once per reset."""
        states = self.accumulator.example_states.setdefault(layer, {})
        if kind in states:
            return
        tensor = next((t for t in candidates if isinstance(t, Tensor) and t.dim() == 3), None)
        if tensor is not None:
            sequence_first = isinstance(module, nn.MultiheadAttention) and not module.batch_first
            states[kind] = (tensor[:, 0] if sequence_first else tensor[0]).detach().float().cpu()

    # records -------------------------------------------------------------------------------
    def _consume(self, record: AttentionRecord) -> Tensor | None:
        """Handle one record inside the attention call; returns the call's replacement output or None.

        Never raises: a failure is a warning naming the layer, and that call is left as it was.
        """
        call = self._active[-1]
        self._records += 1
        replacement = None
        try:
            record = self._judged(call, record)
            if self.steering is not None and self.steering.applies(call.name, call.training):
                probs, key_valid = record.probabilities()
                used = self.steering.steer(call.name, probs, key_valid, record.query_valid, call.training)
                replacement = record.output(used)
                record = AttentionRecord(
                    probs=used.detach(), key_valid=key_valid, query_valid=record.query_valid, sink_keys=record.sink_keys
                )
            if self.enabled and not _in_backward():  # a checkpointing recompute is not a new forward
                self._collect(call, record)
        except Exception as err:  # the monitor must never break the user's forward
            self._skip(call.layer, f"{type(err).__name__}: {err}")
        return replacement

    def _judged(self, call: Call, record: AttentionRecord) -> AttentionRecord:
        """The record with its valid query rows and sink keys, from its own mask (see the class notes)."""
        record = unpack_query_heads(record, _num_heads(call.module))
        b, _, lq, lk = record.shape
        mask = record.key_mask()
        if call.kind == SELF:
            valid = None if mask is None else diagonal_valid(mask, lq, lk)  # [B', Lq]
            explicit = self._explicit_query_valid(call.layer, b, lq, _device(record))
            if explicit is not None:
                valid = explicit if valid is None else valid & explicit
            self._calls.remember_self(call.name, b, lq, valid)
        else:
            found, valid = self._calls.cross_query_validity(call.name, b, lq)
            if not found:
                self._warn_once(
                    call.layer,
                    "cross-queries",
                    f"attnmonitor: the padding of the queries of cross-attention layer '{call.layer}' is unknown (no "
                    "self-attention of the same block with the same queries ran before it); every query row is counted.",
                )
        sinks = sink_keys(mask, lq, lk, self.sink_tokens, self_attention=call.kind == SELF, query_valid=valid)
        record = record.with_query_valid(None if valid is None else valid.unsqueeze(1))
        return replace(record, sink_keys=sinks)

    def _collect(self, call: Call, record: AttentionRecord) -> None:
        layer = call.layer
        statistics = self.statistics
        if call.kind == CROSS:
            statistics = tuple(s for s in statistics if s not in POSITION_STATISTICS)
            if not statistics:
                return
        self.kinds.setdefault(layer, call.kind)
        with torch.no_grad():
            fused = None
            if record.q is not None and record.k is not None:  # SDPA: try one extra fused call first
                fused = fused_row_statistics(
                    record.q, record.k, record.attn_mask, record.is_causal, record.scale, record.query_valid,
                    statistics=statistics, sink_tokens=self.sink_tokens, sink_keys=record.sink_keys,
                    budget_bytes=self.budget_bytes,
                )
            alignment = torch.zeros(2) if self._has_alignments(record) else None  # [correct, counted]
            if fused is not None:
                sums, count = head_sums(*fused)
                if alignment is not None:  # the fused path has no probabilities: one pass for the argmax
                    for _ in self._count_alignment(alignment, record, record.chunks(self.budget_bytes)):
                        pass
            else:
                chunks = record.chunks(self.budget_bytes, self._sampled_rows(record.shape[2]))
                if alignment is not None:  # counted in the same pass as the statistics
                    chunks = self._count_alignment(alignment, record, chunks)
                sums, count = chunked_head_sums(
                    chunks, statistics=statistics, sink_tokens=self.sink_tokens, sparsity_eps=self.sparsity_eps,
                    sink_keys=record.sink_keys,
                )
            if not all(bool(torch.isfinite(s).all()) for s in sums.values()):
                self._skip(layer, "its attention contains NaN or inf")
                return
            if alignment is not None:
                self.accumulator.add_alignment(layer, alignment)
            refused = self.accumulator.add(layer, sums, count)
            if refused:
                self._skip(layer, refused)
            elif self.example_tokens and layer not in self.accumulator.examples:
                probs, keys, start, key_start = record.example(self.example_tokens)
                self.accumulator.examples[layer] = probs
                states = self.accumulator.example_states.setdefault(layer, {})
                states.update(key_valid=keys, start=torch.tensor(start), key_start=torch.tensor(key_start))
                if record.v is not None:
                    self.accumulator.example_states.setdefault(layer, {})["values"] = record.v[0].detach().float().cpu()

    def _sampled_rows(self, lq: int) -> Tensor | None:
        if self.sample_rows is None or lq <= self.sample_rows:
            return None
        return torch.randperm(lq, generator=self._row_generator)[: self.sample_rows].sort().values

    def _has_alignments(self, record: AttentionRecord) -> bool:
        b, _, lq, _ = record.shape
        return self.alignments is not None and tuple(self.alignments.shape) == (b, lq)

    def _count_alignment(self, correct: Tensor, record: AttentionRecord, chunks: Iterator[Chunk]) -> Iterator[Chunk]:
        """Pass ``chunks`` through, adding to ``correct`` the rows whose head-mean argmax is
        ``alignments[b, i]`` and the rows counted (negative alignments: no ground truth)."""
        assert self.alignments is not None
        b, _, lq, lk = record.shape
        for chunk in chunks:
            probs, key_valid, query_valid = chunk.probs.float(), chunk.key_valid, chunk.query_valid
            truth = self.alignments[:, chunk.positions - (lk - lq)].to(probs.device).long()  # [B, r]
            mean = (probs if key_valid is None else probs.masked_fill(~key_valid.expand_as(probs), 0)).mean(1)
            counted = truth >= 0
            if query_valid is not None:
                counted = counted & query_valid.expand(b, -1, -1).any(1)
            correct += torch.stack([((mean.argmax(-1) == truth) & counted).sum(), counted.sum()]).float().cpu()
            yield chunk

    def _explicit_query_valid(self, layer: str, batch: int, rows: int, device: torch.device) -> Tensor | None:
        """The user's ``query_mask`` as bool ``[B, Lq]`` if it fits this self-attention call."""
        mask = self.query_mask
        if mask is None:
            return None
        if tuple(mask.shape) != (batch, rows):
            self._warn_once(
                layer,
                "query-mask",
                f"attnmonitor: the query mask {tuple(mask.shape)} does not match the queries [B={batch}, Lq={rows}] of "
                f"layer '{layer}'; it is not applied there.",
            )
            return None
        return mask.to(device=device, dtype=torch.bool)

    # reporting -----------------------------------------------------------------------------
    def _skip(self, layer: str, why: str) -> None:
        self.skipped[layer] = self.skipped.get(layer, 0) + 1
        self._warn_once(layer, "skip", f"attnmonitor: skipped a capture of layer '{layer}' because {why}.")

    def _report_silent(self, name: str, module: nn.Module) -> None:
        self._silent.add(name)
        self._warn_once(
            name,
            "silent",
            f"attnmonitor: attention module '{name}' ({type(module).__name__}) ran but no attention computation "
            "could be intercepted (no scaled_dot_product_attention, softmax or nn.MultiheadAttention call). It "
            "probably uses a kernel that cannot be intercepted (flash-attn, flex attention, a compiled region): "
            'use attn_implementation="sdpa" or "eager", or pass `targets=` naming the modules that do compute it.',
        )

    def _warn_once(self, layer: str, kind: str, message: str) -> None:
        if (layer, kind) not in self._warned:
            self._warned.add((layer, kind))
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _nothing_captured_message(self) -> str:
        detail = (
            f"modules that ran without yielding attention: {sorted(self._silent)}"
            if self._silent
            else "no target module ran while capture was enabled (is the capture attached and was the model called?)"
        )
        return f"attnmonitor: no attention captured since reset() from targets {self.target_names}; {detail}."


def _in_backward() -> bool:
    """Whether the autograd engine is running (activation checkpointing recomputes forwards there)."""
    return torch._C._current_graph_task_id() != -1


def _is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule runs through ``torch.compile`` (wrapper or ``Module.compile()``)."""
    from torch._dynamo.eval_frame import OptimizedModule

    return any(isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def _ancestors(model: nn.Module, targets: dict[str, nn.Module]) -> list[nn.Module]:
    """Modules (the model included) that contain a target without being one: their first entry
    starts a forward of the model."""
    target_ids = {id(m) for m in targets.values()}
    return [
        m for m in model.modules() if id(m) not in target_ids and any(id(c) in target_ids for c in m.modules())
    ]


def _num_heads(module: nn.Module) -> int:
    """The query heads a module declares (Hugging Face attention modules), or 0 when unknown."""
    heads = getattr(module, "num_heads", None) or getattr(getattr(module, "config", None), "num_attention_heads", None)
    return heads if isinstance(heads, int) else 0


def _device(record: AttentionRecord) -> torch.device:
    tensor = record.probs if record.probs is not None else record.q
    assert tensor is not None
    return tensor.device


def _raising() -> bool:
    """Whether a forward hook runs because the forward raised (``always_call``)."""
    return sys.exc_info()[0] is not None
