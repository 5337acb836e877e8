"""What a capture tells its user: skipped captures, modules that yielded no attention, empty results."""

from __future__ import annotations

import warnings

from torch import nn


class CaptureReport:
    """Warnings given once per (layer, kind), skipped-capture counts and silent modules."""

    def __init__(self) -> None:
        self.skipped: dict[str, int] = {}
        """``{layer: captures skipped}`` (non-finite attention, a failure inside the monitor)."""
        self.silent: set[str] = set()
        """Attention modules that ran without any interceptable attention computation."""
        self._warned: set[tuple[str, str]] = set()

    def warn_once(self, layer: str, kind: str, message: str) -> None:
        if (layer, kind) not in self._warned:
            self._warned.add((layer, kind))
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def skip(self, layer: str, why: str) -> None:
        """Count a skipped capture of ``layer`` and warn once."""
        self.skipped[layer] = self.skipped.get(layer, 0) + 1
        self.warn_once(layer, "skip", f"attnmonitor: skipped a capture of layer '{layer}' because {why}.")

    def silent_module(self, name: str, module: nn.Module) -> None:
        """An attention module ran and yielded nothing: say what to do."""
        self.silent.add(name)
        self.warn_once(
            name,
            "silent",
            f"attnmonitor: attention module '{name}' ({type(module).__name__}) ran but no attention computation "
            "could be intercepted (no scaled_dot_product_attention, softmax or nn.MultiheadAttention call). It "
            "probably uses a kernel that cannot be intercepted (flash-attn, flex attention, a compiled region): "
            'use attn_implementation="sdpa" or "eager", or pass `targets=` naming the modules that do compute it.',
        )

    def nothing_captured(self, targets: list[str]) -> str:
        """Why :meth:`AttentionCapture.stats` has nothing to return."""
        detail = (
            f"modules that ran without yielding attention: {sorted(self.silent)}"
            if self.silent
            else "no target module ran while capture was enabled (is the capture attached and was the model called?)"
        )
        return f"attnmonitor: no attention captured since reset() from targets {targets}; {detail}."
