"""Several figure writers as one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class Writers:
    """Forwards every call to each writer that has the method (``add_embedding`` and
    ``add_custom_scalars`` exist for TensorBoard only).

    Args:
        writers: TensorBoard ``SummaryWriter`` objects and the writers of :mod:`attnmonitor.loggers`.
    """

    def __init__(self, writers: Sequence[Any]) -> None:
        self.writers = list(writers)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name == "writers":
            raise AttributeError(name)
        having = [getattr(w, name) for w in self.writers if hasattr(w, name)]
        if not having:
            raise AttributeError(f"none of {[type(w).__name__ for w in self.writers]} has {name!r}")

        def each(*args: Any, **kwargs: Any) -> None:
            for method in having:
                method(*args, **kwargs)

        return each


def combine(writers: Sequence[Any]) -> Any:
    """None without writers, the writer itself when there is one, else :class:`Writers`."""
    writers = [w for w in writers if w is not None]
    if not writers:
        return None
    return writers[0] if len(writers) == 1 else Writers(writers)
