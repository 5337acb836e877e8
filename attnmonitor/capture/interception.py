"""Interception of attention computations inside target modules.

A :class:`~torch.overrides.TorchFunctionMode` is active only while a target module (or a module
whose fused fast path would skip it) runs. It sees, whatever name they were imported under:

- ``F.scaled_dot_product_attention``: recorded as ``q``/``k``/mask (the output is SDPA's own);
- softmax over the last dim of a 3-D/4-D tensor (eager attention): recorded as probabilities. Where
  ``require_scores`` says so (modules found automatically but not named as attention), only a
  softmax over scores shaped like the output of a
  product of two activations (``q @ kᵀ``, ``bmm``, ``baddbmm``, ``einsum``) seen while targets ran:
  a softmax over a linear layer's logits (router, classifier) is not attention;
- ``F.multi_head_attention_forward`` (``nn.MultiheadAttention``): the mode is off inside a handler,
  so the SDPA/softmax calls nested in it are caught by temporarily wrapping the names that
  ``torch.nn.functional`` resolves them through;
- ``flex_attention``, which the mode cannot see: its call sites are swapped while the mode is active
  (:mod:`attnmonitor.capture.flex`).

The model's outputs are computed by the original functions, unchanged, unless ``emit`` returns a
replacement (regularization: clipped probabilities, or the output of SDPA recomputed from them).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode, _get_current_function_mode, _pop_mode_temporarily

from attnmonitor.capture.flex import FlexPatch, FlexSite, flex_record
from attnmonitor.capture.records import AttentionRecord, as_heads
from attnmonitor.functional.chunked import key_valid_from_logits
from attnmonitor.functional.evaluation import AttentionCall
from attnmonitor.functional.statistics import logit_row_max

_SDPA = F.scaled_dot_product_attention
_SOFTMAX = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax})
_PRODUCTS = frozenset(
    {
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.bmm,
        torch.Tensor.bmm,
        torch.baddbmm,
        torch.Tensor.baddbmm,
        torch.einsum,
    }
)
_MAX_SCORE_SHAPES = 64
_MHA_FORWARD = F.multi_head_attention_forward
_MHA_SIGNATURE = inspect.signature(_MHA_FORWARD)


def _sdpa_arguments(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> AttentionRecord:
    """Bind SDPA's arguments (same signature) into a record; 3-D inputs are one head."""
    out_shape = (*query.shape[:-1], value.shape[-1])
    if query.dim() == 3:
        query, key, value, attn_mask = as_heads(query), as_heads(key), as_heads(value), as_heads(attn_mask)
    call = AttentionCall(q=query, k=key, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    return AttentionRecord(call, v=value, dropout_p=dropout_p, out_shape=out_shape, out_dtype=query.dtype)


def _softmax_record(logits: Tensor, dim: int | None, probs: Tensor, heads: int = 0, logit_max: bool = True) -> AttentionRecord | None:
    """A record for a softmax over the last dim of ``[B, H, Lq, Lk]`` or ``[B, Lq, Lk]``, else None.

    ``heads > 0`` splits a ``[B * heads, Lq, Lk]`` input (``nn.MultiheadAttention``) into heads.
    ``logit_max``: also record each row's largest input over its valid keys (the softmax's logits,
    biases and masks included: what ``max_logit`` reports).
    """
    if dim is None or probs.dim() not in (3, 4) or dim not in (-1, probs.dim() - 1):
        return None
    out_shape, out_dtype = tuple(probs.shape), probs.dtype
    if heads and probs.dim() == 3:
        logits = logits.reshape(-1, heads, *logits.shape[1:])
        probs = probs.reshape(-1, heads, *probs.shape[1:])
    logits, probs = as_heads(logits), as_heads(probs)
    row_max = logit_row_max(logits.detach()) if logit_max else None  # [B, H, Lq]
    call = AttentionCall(probs=probs, key_valid=key_valid_from_logits(logits), logit_max=row_max)
    return AttentionRecord(call, out_shape=out_shape, out_dtype=out_dtype)


def _softmax_dim(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    return args[1] if len(args) > 1 else kwargs.get("dim")


def _score_key(t: Tensor) -> tuple[int, int, int]:
    """What identifies a score tensor across reshapes, scaling and masking: ``(numel, Lq, Lk)``."""
    return t.numel(), t.shape[-2], t.shape[-1]


def _is_product_of_activations(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> bool:
    """Whether ``out`` is a ``>= 3``-D product of tensors none of which is a parameter (``q @ kᵀ``)."""
    if not isinstance(out, Tensor) or out.dim() < 3:
        return False
    if func is torch.einsum:
        operands = [a for a in (args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:])]
    elif func in (torch.baddbmm, torch.Tensor.baddbmm):
        operands = [kwargs.get("batch1", args[1] if len(args) > 1 else None), kwargs.get("batch2", args[2] if len(args) > 2 else None)]
    else:
        operands = [args[0], args[1] if len(args) > 1 else kwargs.get("other")]
    return all(isinstance(t, Tensor) and not isinstance(t, torch.nn.Parameter) for t in operands)


class AttentionInterceptor(TorchFunctionMode):
    """Turns attention calls into :class:`AttentionRecord` s handed to ``emit``.

    Args:
        emit: called with each record (inside the attention call; must not raise); returns None,
            or the value the intercepted call returns instead of its own.
        is_recording: whether a target module is running now (outside one, calls pass through).
        require_scores: whether, in the module running now, only a softmax over ``q·kᵀ``-shaped
            scores is attention (see the module's notes).
        flex_sites: the names flex attention is called through in the target modules.
        logit_max: whether softmax records carry their rows' largest logits now (for ``max_logit``).
    """

    def __init__(
        self,
        emit: Callable[[AttentionRecord], Tensor | None],
        is_recording: Callable[[], bool],
        require_scores: Callable[[], bool] = lambda: False,
        flex_sites: list[FlexSite] | None = None,
        logit_max: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__()
        self._logit_max = logit_max
        self._emit = emit
        self._is_recording = is_recording
        self._require_scores = require_scores
        self._score_keys: set[tuple[int, int, int]] = set()
        self._flex = FlexPatch(flex_sites or [], self._flex_call)

    def __enter__(self) -> AttentionInterceptor:
        self._flex.apply()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._flex.restore()
        super().__exit__(*exc)

    def _flex_call(self, flex: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A flex attention call made while the mode is active: its record, then flex (mode off)."""
        with _outside(self):
            replaced = self._emit(flex_record(args, kwargs)) if self._is_recording() else None
            out = flex(*args, **kwargs) if replaced is None or not _returns_aux(kwargs) else None
        if replaced is None:
            return out
        return replaced if out is None else (replaced, *out[1:])

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if not self._is_recording():
            return func(*args, **kwargs)
        if func is _SDPA:
            replaced = self._emit(_sdpa_arguments(*args, **kwargs))
            return func(*args, **kwargs) if replaced is None else replaced
        if func in _SOFTMAX:
            if self._require_scores() and (not isinstance(args[0], Tensor) or _score_key(args[0]) not in self._score_keys):
                return func(*args, **kwargs)
            return self._softmax(func(*args, **kwargs), args, kwargs)
        if func in _PRODUCTS:
            out = func(*args, **kwargs)
            if _is_product_of_activations(func, args, kwargs, out):
                if len(self._score_keys) >= _MAX_SCORE_SHAPES:
                    self._score_keys.clear()
                self._score_keys.add(_score_key(out))
            return out
        if func is _MHA_FORWARD:
            bound = _MHA_SIGNATURE.bind(*args, **kwargs).arguments
            with self._wrap_mha_internals(bound):
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _softmax(self, probs: Tensor, args: tuple[Any, ...], kwargs: dict[str, Any], heads: int = 0) -> Tensor:
        record = _softmax_record(args[0], _softmax_dim(args, kwargs), probs, heads, self._logit_max())
        if record is None:
            return probs
        replaced = self._emit(record)
        return probs if replaced is None else replaced

    @contextmanager
    def _wrap_mha_internals(self, bound: dict[str, Any]) -> Iterator[None]:
        """Wrap ``torch.nn.functional``'s SDPA and softmax while ``multi_head_attention_forward`` runs.

        MHA merges ``key_padding_mask`` into the mask it passes on, so padded query rows are found
        from that mask like any other call's (:func:`attnmonitor.capture.calls.judge`).
        """
        heads: int = bound["num_heads"]
        original_softmax = F.softmax

        def sdpa(*args: Any, **kwargs: Any) -> Tensor:
            replaced = self._emit(_sdpa_arguments(*args, **kwargs))
            return _SDPA(*args, **kwargs) if replaced is None else replaced

        def softmax(*args: Any, **kwargs: Any) -> Tensor:
            return self._softmax(original_softmax(*args, **kwargs), args, kwargs, heads)

        F.scaled_dot_product_attention, F.softmax = sdpa, softmax
        try:
            yield
        finally:
            F.scaled_dot_product_attention, F.softmax = _SDPA, original_softmax


@contextmanager
def _outside(mode: TorchFunctionMode) -> Iterator[None]:
    """``mode`` switched off while inside, when it is the innermost active one."""
    if _get_current_function_mode() is mode:
        with _pop_mode_temporarily():
            yield
    else:
        yield


def _returns_aux(kwargs: dict[str, Any]) -> bool:
    """Whether a flex call returns ``(out, lse or aux)`` rather than ``out``."""
    return bool(kwargs.get("return_lse")) or kwargs.get("return_aux") is not None
