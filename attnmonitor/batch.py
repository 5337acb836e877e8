"""Reading what the monitor needs from a training batch: token ids, masks, alignments."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor


def batch_tensor(batch: Any, key: str | None) -> Tensor | None:
    """``batch[key]`` when the batch is a mapping holding a ``[B, L]`` tensor there, else None."""
    value = batch.get(key) if key is not None and isinstance(batch, Mapping) else None
    return value if isinstance(value, Tensor) and value.dim() == 2 else None


def example_ids(batch: Any, key: str, *, positional: bool = True, row: int = 0) -> Tensor | None:
    """Token ids ``[L]`` of batch element ``row``: ``batch[key]`` of a mapping, or (``positional``)
    item 0 of a tuple/list batch or the batch itself; None unless that is a ``[B, L]`` integer tensor."""
    ids = batch_ids(batch, key, positional=positional)
    return None if ids is None or row >= ids.shape[0] else ids[row].detach().cpu()


def example_row(batch: Any, key: str) -> int:
    """The batch element the dashboards show: among the rows of the ``[B, L]`` ids (see
    :func:`example_ids`), the first with the most distinct tokens, so that a row of padding or of one
    repeated token (a rule line ``- - - -``) is not the example; 0 without ids."""
    ids = batch_ids(batch, key)
    if ids is None or ids.shape[0] == 1:
        return 0
    distinct = (ids.sort(dim=1).values.diff(dim=1) != 0).sum(1)
    return int(distinct.argmax())


def batch_ids(batch: Any, key: str, *, positional: bool = True) -> Tensor | None:
    """The ``[B, L]`` integer ids of a batch (see :func:`example_ids`), or None."""
    if isinstance(batch, Mapping):
        ids = batch.get(key)
    elif not positional:
        ids = None
    elif isinstance(batch, (tuple, list)):
        ids = batch[0] if batch else None
    else:
        ids = batch
    if isinstance(ids, Tensor) and ids.dim() == 2 and not ids.is_floating_point():
        return ids
    return None


def token_strings(ids: Tensor, tokenizer: Any) -> list[str]:
    """Labels of ``ids`` from a tokenizer (``convert_ids_to_tokens``), a callable, or the ids themselves."""
    values = ids.tolist()
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return list(tokenizer.convert_ids_to_tokens(values))
    if tokenizer is not None:
        return [str(t) for t in tokenizer(values)]
    return [str(i) for i in values]
