"""One pass over the probabilities for the statistics that reduce a row: a ``torch.compile``d kernel.

Eagerly, entropy, maximum, sparsity, distance and sink mass each read the ``[B, H, Lq, Lk]``
probabilities again (2 to 4 passes each, with full-size temporaries); compiled, inductor fuses the five
reductions into one loop over each row (CPU and GPU), about the cost of one softmax. Compiled kernels
(this one and :mod:`attnmonitor.functional.logit_kernel`) are used for tensors of at least
:data:`MIN_ELEMENTS` (below, the eager path is as fast and needs no compilation) when not computing
gradients and not inside another compiled graph; ``ATTNMONITOR_FUSED=0`` turns them off. If
compilation fails (no C++ compiler, an unsupported device), it warns once and the eager path is used.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

MIN_ELEMENTS = 1 << 20
"""Smallest tensor (elements) sent to a compiled kernel (its first call compiles for seconds)."""

_TINY = torch.finfo(torch.float32).tiny
_failed = os.environ.get("ATTNMONITOR_FUSED", "1") == "0"
_OPTIONS = {"cpp.dynamic_threads": True}
"""Inductor options: with dynamic shapes its CPU code runs on one thread unless told to leave the
choice to OpenMP (the statistics would take twice as long on two cores)."""


def kernel_applies(elements: int, *tensors: Tensor) -> bool:
    """Whether a compiled kernel should compute a call of ``elements`` elements: kernels are on, the call
    is large enough, no gradient flows through ``tensors`` and no other graph is being compiled."""
    if _failed or elements < MIN_ELEMENTS or torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


class CompiledKernel:
    """``function`` compiled by inductor (dynamic shapes, one graph) on its first call; None instead of a
    result, one warning, and every kernel off, if compilation or the kernel fails. It runs compiled
    under the ``force_eager`` stance too (the one a captured step of a compiled model runs under)."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        global _failed
        try:
            if self.compiled is None:
                self.compiled = torch.compile(self.function, dynamic=True, fullgraph=True, options=_OPTIONS)
            with torch.compiler.set_stance("default"):
                return self.compiled(*args)
        except Exception as err:  # the statistics never depend on a compiler being present
            _failed = True
            warnings.warn(
                f"attnmonitor: the fused statistics kernel is off ({type(err).__name__}: {err}); using the eager path",
                RuntimeWarning,
                stacklevel=3,
            )
            return None


def row_reductions(p: Tensor, positions: Tensor, thresholds: Tensor, sink_tokens: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Five sums over each row's keys, in one pass.

    Args:
        p: ``[B, H, Lq, Lk]`` float32 probabilities, 0 on invalid keys.
        positions: ``[Lq]`` float32 key position of each query row.
        thresholds: ``[B, H, Lq]`` float32 sparsity threshold of each row (``eps / n_i``).
        sink_tokens: leading keys counted as sinks.

    Returns:
        ``[B, H, Lq]`` each: entropy ``−Σ p log p``, largest weight, keys below the threshold (invalid
        keys included), ``Σ p |i − j|`` and the weight on the first ``sink_tokens`` keys.
    """
    keys = torch.arange(p.shape[-1], device=p.device, dtype=p.dtype)
    entropy = -(p * torch.log(torch.clamp_min(p, _TINY))).sum(-1)  # 0 · log(tiny) = 0: no NaN at p = 0
    largest = p.amax(-1)
    below = (p < thresholds.unsqueeze(-1)).sum(-1, dtype=torch.float32)
    distance = (p * (positions.unsqueeze(-1) - keys).abs()).sum(-1)
    sink = (p * (keys < sink_tokens)).sum(-1)
    return entropy, largest, below, distance, sink


_row_reductions = CompiledKernel(row_reductions)


def fused_reductions(p: Tensor, positions: Tensor, thresholds: Tensor, sink_tokens: int) -> tuple[Tensor, ...] | None:
    """:func:`row_reductions` compiled, or None where the eager path is used instead (see
    :func:`kernel_applies`, or compilation failed)."""
    if not kernel_applies(p.numel(), p):
        return None
    return _row_reductions(p, positions, thresholds, sink_tokens)
