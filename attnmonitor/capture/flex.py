"""Interception of FlexAttention (``torch.nn.attention.flex_attention``) calls.

A ``TorchFunctionMode`` does not see ``flex_attention``: it is a plain Python function that runs its
operator through ``torch.compile`` even when called eagerly. So while a target module runs, the
names its code calls flex through are swapped for a wrapper that hands the call's inputs to the
monitor and then calls what was there (eager or ``torch.compile``d flex, unchanged). Those names:

- any global of the target classes' modules, or attribute of the target modules, bound to
  ``flex_attention`` or to a ``torch.compile``d ``flex_attention``;
- ``torch.nn.attention.flex_attention.flex_attention`` itself (calls written ``fa.flex_attention(...)``);
- Hugging Face's ``compile_friendly_flex_attention`` (``attn_implementation="flex_attention"``).
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from attnmonitor.capture.records import AttentionRecord
from attnmonitor.functional.evaluation import AttentionCall

_HF_MODULE, _HF_NAME = "transformers.integrations.flex_attention", "compile_friendly_flex_attention"


def _flex_module() -> Any:
    import torch.nn.attention.flex_attention as flex

    return flex


@functools.cache
def _flex_function() -> Callable[..., Any]:
    """``flex_attention`` itself (looked up once, before any of its names is swapped)."""
    return _flex_module().flex_attention


@functools.cache
def _flex_signature() -> inspect.Signature:
    return inspect.signature(_flex_function())


def is_flex(obj: Any) -> bool:
    """Whether ``obj`` is ``flex_attention`` or a ``torch.compile``d ``flex_attention``."""
    flex = _flex_function()
    try:
        return obj is flex or getattr(obj, "_torchdynamo_orig_callable", None) is flex
    except Exception:  # an object whose attribute lookup fails in its own way (a lazy module, ...)
        return False


@dataclass
class FlexSite:
    """A name that flex attention is called through: ``namespace[name]``."""

    namespace: dict[str, Any] = field(repr=False)
    name: str

    def __deepcopy__(self, memo: dict[int, Any]) -> FlexSite:
        return self  # a module's globals: shared, never copied (a deep copy of a hooked model reaches it)

    def bound(self) -> Any:
        value = self.namespace.get(self.name)
        if self.name == _HF_NAME or is_flex(value):
            return value
        return None


def flex_sites(modules: Iterable[nn.Module]) -> list[FlexSite]:
    """Every name the code of ``modules`` may call flex attention through (see the module's notes)."""
    namespaces = {id(vars(_flex_module())): vars(_flex_module())}
    for module in modules:
        namespaces[id(module.__dict__)] = module.__dict__
        for cls in type(module).__mro__:
            defining = sys.modules.get(cls.__module__)
            if defining is not None and not cls.__module__.startswith("torch."):
                namespaces[id(vars(defining))] = vars(defining)
    sites = [FlexSite(ns, name) for ns in namespaces.values() for name, value in list(ns.items()) if is_flex(value)]
    hf = sys.modules.get(_HF_MODULE)
    if hf is not None and hasattr(hf, _HF_NAME):
        sites.append(FlexSite(vars(hf), _HF_NAME))
    return sites


def flex_record(args: tuple[Any, ...], kwargs: dict[str, Any]) -> AttentionRecord:
    """An attention record of ``flex_attention(*args, **kwargs)`` (Hugging Face's extra ``training``
    argument ignored): ``q``/``k``/``v``, the ``block_mask``'s ``mask_mod`` as a bool mask and the
    ``score_mod``."""
    from attnmonitor.functional.flex import flex_mask, flex_score_mod

    flex = _flex_module()
    kwargs = {name: value for name, value in kwargs.items() if name != "training"}
    bound = _flex_signature().bind(*args, **kwargs)
    bound.apply_defaults()
    arguments = bound.arguments
    q, k, v = arguments["query"], arguments["key"], arguments["value"]
    score_mod, block_mask = arguments["score_mod"], arguments["block_mask"]
    mask, causal = None, False
    if block_mask is not None and block_mask.mask_mod is not flex.noop_mask:
        batch, heads = block_mask.shape[:2]
        mask = flex_mask(block_mask.mask_mod, batch, heads, q.shape[-2], k.shape[-2], q.device)
        mask, causal = _simplified(mask)
    scale = arguments["scale"]
    call = AttentionCall(
        q=q,
        k=k,
        attn_mask=mask,
        is_causal=causal,
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale,
        score_mod=None if score_mod is None or score_mod is getattr(flex, "_identity", None) else flex_score_mod(score_mod),
    )
    return AttentionRecord(call, v=v, out_shape=(*q.shape[:-1], v.shape[-1]), out_dtype=q.dtype)


def _simplified(mask: Tensor) -> tuple[Tensor | None, bool]:
    """``(mask, is_causal)``: no mask for one that blocks nothing, SDPA's ``is_causal`` for the causal one."""
    lq, lk = mask.shape[-2:]
    if bool(mask.all()):
        return None, False
    if lq == lk and torch.equal(mask, torch.ones(lq, lk, dtype=torch.bool, device=mask.device).tril().expand_as(mask)):
        return None, True
    return mask, False


class FlexPatch:
    """Swaps the flex call sites for wrappers while active (:meth:`apply`/:meth:`restore`).

    Args:
        sites: the names to swap.
        call: called by a wrapper with what was bound there and the call's ``(args, kwargs)``;
            returns the call's result.
    """

    def __init__(self, sites: list[FlexSite], call: Callable[[Any, tuple[Any, ...], dict[str, Any]], Any]) -> None:
        self.sites, self._call = sites, call
        self._saved: list[tuple[FlexSite, Any]] = []

    def apply(self) -> None:
        for site in self.sites:
            original = site.bound()
            if original is not None:
                site.namespace[site.name] = self._wrapper(original)
                self._saved.append((site, original))

    def restore(self) -> None:
        for site, original in reversed(self._saved):
            site.namespace[site.name] = original
        self._saved.clear()

    def _wrapper(self, original: Any) -> Callable[..., Any]:
        def flex_attention(*args: Any, **kwargs: Any) -> Any:
            return self._call(original, args, kwargs)

        return flex_attention
