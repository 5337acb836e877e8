"""Reading what the monitor needs from a training batch: token ids, masks, alignments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def batch_tensor(batch: Any, key: str | None) -> Tensor | None:
    """``batch[key]`` when the batch is a mapping holding a ``[B, L]`` tensor there, else None."""
    value = batch.get(key) if key is not None and isinstance(batch, Mapping) else None
    return value if isinstance(value, Tensor) and value.dim() == 2 else None


def example_ids(batch: Any, key: str, *, positional: bool = True) -> Tensor | None:
    """Token ids ``[L]`` of batch element 0: ``batch[key]`` of a mapping, or (``positional``) item 0
    of a tuple/list batch or the batch itself; None unless that is a ``[B, L]`` integer tensor."""
    if isinstance(batch, Mapping):
        ids = batch.get(key)
    elif not positional:
        ids = None
    elif isinstance(batch, (tuple, list)):
        ids = batch[0] if batch else None
    else:
        ids = batch
    if isinstance(ids, Tensor) and ids.dim() == 2 and not ids.is_floating_point():
        return ids[0].detach().cpu()
    return None


def token_strings(ids: Tensor, tokenizer: Any) -> list[str]:
    """Labels of ``ids`` from a tokenizer (``convert_ids_to_tokens``), a callable, or the ids themselves."""
    values = ids.tolist()
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return list(tokenizer.convert_ids_to_tokens(values))
    if tokenizer is not None:
        return [str(t) for t in tokenizer(values)]
    return [str(i) for i in values]
