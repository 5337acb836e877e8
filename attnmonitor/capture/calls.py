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
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

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
class Call:
    """One running call of a target module."""

    module: nn.Module
    name: str  # the module's qualified name
    layer: str  # the reported layer: ``name``, or ``name#i`` for a module called several times per forward
    kind: str  # SELF or CROSS
    training: bool


class CallTracker:
    """Per-forward bookkeeping of target calls.

    Args:
        pool_shared: report every call of a module under its own name (no ``#i``).
    """

    def __init__(self, pool_shared: bool = False) -> None:
        self.pool_shared = pool_shared
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

    def layer(self, name: str) -> tuple[str, bool]:
        """The layer name of the next call of module ``name``, and whether it just became shared."""
        index = self._calls.get(name, 0)
        self._calls[name] = index + 1
        if self.pool_shared:
            return name, False
        newly_shared = index == 1 and name not in self.shared
        if newly_shared:
            self.shared.add(name)
        return (f"{name}#{index}" if name in self.shared else name), newly_shared

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
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count
