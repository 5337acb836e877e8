"""FlexAttention's ``score_mod`` and ``mask_mod`` as tensors the statistics can use.

Both are applied as FlexAttention's own eager reference applies them
(``torch._higher_order_ops.flex_attention.math_attention``): vectorised over batch, head, query and
key indices with ``vmap``, under the mode that turns tensor indexing inside them into ``index``.
So any score modification (ALiBi, soft-capping, relative bias tables) and any mask (causal, sliding
window, document/packed, prefix-LM) gives the logits flex itself used.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from attnmonitor.functional.chunked import ScoreMod


def _vmapped(fn: Callable[..., Tensor], with_score: bool) -> Callable[..., Tensor]:
    from torch.nn.attention.flex_attention import _vmap_for_bhqkv

    return _vmap_for_bhqkv(fn, prefix=(0,) if with_score else ())


def _indexing_as_ops() -> TorchFunctionMode:
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex

    return TransformGetItemToIndex()


def flex_score_mod(score_mod: Callable[..., Tensor]) -> ScoreMod:
    """``score_mod(score, b, h, q_idx, kv_idx)`` as a function of a chunk ``[B, H, r, Lk]`` of scaled
    logits and its query rows ``[r]``.

    Example:
        >>> softcap = lambda score, b, h, q_idx, kv_idx: 2.0 * torch.tanh(score / 2.0)
        >>> scores = torch.randn(1, 2, 3, 4)
        >>> torch.allclose(flex_score_mod(softcap)(scores, torch.arange(3)), 2.0 * torch.tanh(scores / 2.0))
        True
    """
    vmapped = _vmapped(score_mod, with_score=True)

    def apply(scores: Tensor, rows: Tensor) -> Tensor:
        b, h, _, lk = scores.shape
        device = scores.device
        with _indexing_as_ops():
            return vmapped(
                scores,
                torch.arange(b, device=device),
                torch.arange(h, device=device),
                rows.to(device),
                torch.arange(lk, device=device),
            )

    return apply


def flex_mask(mask_mod: Callable[..., Tensor], batch: int, heads: int, lq: int, lk: int, device: torch.device) -> Tensor:
    """Bool ``[batch, heads, Lq, Lk]`` (True = attend) of ``mask_mod(b, h, q_idx, kv_idx)``; pass
    ``batch``/``heads`` 1 when the mask does not depend on them (a BlockMask built with ``B``/``H`` None).

    Example:
        >>> causal = lambda b, h, q_idx, kv_idx: q_idx >= kv_idx
        >>> flex_mask(causal, 1, 1, 3, 3, torch.device("cpu"))[0, 0].int()
        tensor([[1, 0, 0],
                [1, 1, 0],
                [1, 1, 1]], dtype=torch.int32)
    """
    index = [torch.arange(n, device=device) for n in (batch, heads, lq, lk)]
    with _indexing_as_ops():
        mask = _vmapped(mask_mod, with_score=False)(*index)
    return mask.to(torch.bool).expand(batch, heads, lq, lk)
