"""What one call of an attention module is: its layer name, self- or cross-attention, whose queries.

- **Layer names per call position**: a module called several times in one forward (ALBERT's shared
  layer) is reported as ``name#0``, ``name#1``, ... unless calls are pooled.
- **Kind**: cross-attention when the module receives the other sequence (``key_value_states``,
  ``encoder_hidden_states``, ... or ``nn.MultiheadAttention`` with ``key is not query``).
- **Query validity of cross-attention**: the queries belong to the decoder side, whose padding the
  same block's self-attention has just derived from its own mask: the most recent self-attention
  call of this forward with the same ``[B, Lq]`` sharing the longest module-name prefix.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnmonitor.capture.records import AttentionRecord, unpack_query_heads
from attnmonitor.functional.masks import diagonal_valid, sink_keys

SELF, CROSS = "self", "cross"
CROSS_ARGUMENTS = (
    "key_value_states",
    "encoder_hidden_states",
    "cross_attention_states",
    "encoder_outputs",
    "memory",
    "context",
)
"""Forward arguments that carry the other sequence of a cross-attention call."""

_SIGNATURES: dict[type, inspect.Signature | None] = {}


def attention_kind(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``"cross"`` if this call of ``module`` attends to another sequence, else ``"self"``."""
    if isinstance(module, nn.MultiheadAttention):
        query = args[0] if args else kwargs.get("query")
        key = args[1] if len(args) > 1 else kwargs.get("key")
        return SELF if key is None or key is query else CROSS
    arguments = kwargs
    if len(args) > 1:
        signature = _signature(type(module))
        if signature is not None:
            try:
                arguments = signature.bind_partial(module, *args, **kwargs).arguments
            except TypeError:
                pass
    return CROSS if any(isinstance(arguments.get(name), Tensor) for name in CROSS_ARGUMENTS) else SELF


def _signature(cls: type) -> inspect.Signature | None:
    if cls not in _SIGNATURES:
        try:
            _SIGNATURES[cls] = inspect.signature(cls.forward)
        except (TypeError, ValueError):
            _SIGNATURES[cls] = None
    return _SIGNATURES[cls]


@dataclass
class ModuleCall:
    """One running call of a target module (an attention module's forward; the attention computations
    inside it are :class:`~attnmonitor.functional.evaluation.AttentionCall` s)."""

    module: nn.Module
    name: str  # the module's qualified name
    layer: str  # the reported layer: ``name``, or ``name#i`` for a module called several times per forward
    kind: str  # SELF or CROSS
    training: bool


class CallTracker:
    """Per-forward bookkeeping of target calls.

    Args:
        pool_shared: report every call of a module under its own name (no ``#i``).
        on_shared: called with a module's name when its second call in one forward shows it is
            shared (what its first call recorded as ``name`` becomes ``name#0``).
    """

    def __init__(self, pool_shared: bool = False, on_shared: Callable[[str], None] = lambda name: None) -> None:
        self.pool_shared = pool_shared
        self._on_shared = on_shared
        self.shared: set[str] = set()
        """Modules seen called more than once in one forward."""
        self._calls: dict[str, int] = {}
        self._self_validity: dict[str, tuple[tuple[int, int], Tensor | None]] = {}

    def new_forward(self) -> None:
        """A new forward of the model begins: call positions start again."""
        self._calls.clear()
        self._self_validity.clear()

    def restart(self, name: str) -> None:
        """Module ``name`` is called outside any hooked ancestor: its call position starts again."""
        self._calls.pop(name, None)

    def layer(self, name: str) -> str:
        """The layer name of the next call of module ``name``."""
        index = self._calls.get(name, 0)
        self._calls[name] = index + 1
        if self.pool_shared:
            return name
        if index == 1 and name not in self.shared:
            self.shared.add(name)
            self._on_shared(name)
        return f"{name}#{index}" if name in self.shared else name

    def remember_self(self, name: str, batch: int, rows: int, query_valid: Tensor | None) -> None:
        """Record the query validity ``[B, Lq]`` (None: every row) of a self-attention call."""
        self._self_validity.pop(name, None)  # keep the dict ordered by recency
        self._self_validity[name] = ((batch, rows), query_valid)

    def cross_query_validity(self, name: str, batch: int, rows: int) -> tuple[bool, Tensor | None]:
        """``(found, validity)`` of the queries of cross-attention module ``name``.

        The self-attention call of this forward with the same ``(B, Lq)`` whose module name shares the
        most leading components with ``name`` (at least one, same decoder or block, unless ``name`` is a
        child of the root).
        """
        parts = name.split(".")
        top_level = len(parts) == 1  # a block attached on its own: its modules share the root
        best: tuple[int, Tensor | None] | None = None
        for other, (shape, validity) in self._self_validity.items():  # oldest first: ties go to the latest
            shared = common_prefix(parts, other.split("."))
            if shape == (batch, rows) and (shared or top_level) and (best is None or shared >= best[0]):
                best = (shared, validity)
        return (False, None) if best is None else (True, best[1])


def common_prefix(a: list[str], b: list[str]) -> int:
    """How many leading components two split module names share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


def judge(
    call: ModuleCall, record: AttentionRecord, tracker: CallTracker, *, sink_tokens: int, query_mask: Tensor | None = None
) -> tuple[AttentionRecord, str | None]:
    """The record with its valid query rows and sink keys, from its own mask, and a warning or None.

    Self-attention: a row counts when it may attend its own position (and ``query_mask``, when its
    shape fits). Cross-attention: the rows of the same block's self-attention (see
    :meth:`CallTracker.cross_query_validity`); when unknown every row counts, with a warning.
    """
    record = unpack_query_heads(record, _num_heads(call.module))
    b, _, lq, lk = record.shape
    mask = record.key_mask()
    warning = None
    if call.kind == SELF:
        valid = None if mask is None else diagonal_valid(mask, lq, lk)  # [B', Lq]
        if query_mask is not None:
            if tuple(query_mask.shape) == (b, lq):
                explicit = query_mask.to(record.device, torch.bool)
                valid = explicit if valid is None else valid & explicit
            else:
                warning = (
                    f"attnmonitor: the query mask {tuple(query_mask.shape)} does not match the queries [B={b}, Lq={lq}] "
                    f"of layer '{call.layer}'; it is not applied there."
                )
        tracker.remember_self(call.name, b, lq, valid)
    else:
        found, valid = tracker.cross_query_validity(call.name, b, lq)
        if not found:
            warning = (
                f"attnmonitor: the padding of the queries of cross-attention layer '{call.layer}' is unknown (no "
                "self-attention of the same block with the same queries ran before it); every query row is counted."
            )
    sinks = sink_keys(mask, lq, lk, sink_tokens, self_attention=call.kind == SELF, query_valid=valid)
    record = record.with_query_valid(None if valid is None else valid.unsqueeze(1))
    return record.with_call(sink_keys=sinks), warning


def _num_heads(module: nn.Module) -> int:
    """The query heads a module declares (Hugging Face attention modules), or 0 when unknown."""
    heads = getattr(module, "num_heads", None) or getattr(getattr(module, "config", None), "num_attention_heads", None)
    return heads if isinstance(heads, int) else 0
