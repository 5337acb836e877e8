"""Finding the attention modules of a model."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence

from torch import nn

Targets = str | Sequence[str] | Callable[[str, nn.Module], bool]
"""``"auto"``, a regex or regexes fully matching qualified module names, or a predicate ``(name, module)``."""

_ATTENTION_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
FAST_PATH_HOSTS: tuple[type[nn.Module], ...] = (nn.TransformerEncoder, nn.TransformerEncoderLayer)
"""Modules whose eval-mode fused fast path would skip their attention submodule's ``forward``."""


_ATTENTION_CALL = re.compile(
    r"scaled_dot_product_attention|flex_attention|multi_head_attention_forward|MultiheadAttention\(|"
    r"attention_interface|ALL_ATTENTION_FUNCTIONS|eager_attention_forward|flash_attn"
)
_SOFTMAX_CALL = re.compile(r"\bsoftmax\b")
_SOURCE_KINDS: dict[type, tuple[bool, bool]] = {}


def _source_kinds(cls: type) -> tuple[bool, bool]:
    """Whether the code of ``cls`` (and of its base classes) calls an attention function, and a softmax."""
    if cls not in _SOURCE_KINDS:
        sources = []
        for base in cls.__mro__:
            if base.__module__.startswith("torch.") or base is object:
                continue
            try:
                sources.append(inspect.getsource(base))
            except (OSError, TypeError):
                pass
        source = "\n".join(sources)
        _SOURCE_KINDS[cls] = (bool(_ATTENTION_CALL.search(source)), bool(_SOFTMAX_CALL.search(source)))
    return _SOURCE_KINDS[cls]


def user_class(module: nn.Module) -> type:
    """The class a module was written as: the first class of its MRO outside ``torch`` (FSDP2's
    ``fully_shard`` swaps a module's class for a dynamic ``FSDP<Class>`` subclass defined in ``torch``),
    or its own class for a module of ``torch`` itself.

    Example:
        >>> class SelfAttention(nn.Module): ...
        >>> Swapped = type("FSDPSelfAttention", (SelfAttention,), {"__module__": "torch.distributed.fsdp"})
        >>> user_class(Swapped()).__name__, user_class(nn.Linear(2, 2)).__name__
        ('SelfAttention', 'Linear')
    """
    cls = type(module)
    return next((c for c in cls.__mro__ if not c.__module__.startswith("torch.") and c is not object), cls)


def _is_builtin(module: nn.Module) -> bool:
    return user_class(module).__module__.startswith("torch.")


def is_named_attention(module: nn.Module) -> bool:
    """``nn.MultiheadAttention`` or a class named like "*Attention*"/"*Attn*" (any softmax in it is attention)."""
    return isinstance(module, nn.MultiheadAttention) or bool(_ATTENTION_CLASS.search(user_class(module).__name__))


def is_attention_like(module: nn.Module) -> bool:
    """``nn.MultiheadAttention``, a class named like "*Attention*"/"*Attn*", or one whose code calls an
    attention function (SDPA, flex, ``nn.MultiheadAttention``, Hugging Face's attention interface)."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    if _is_builtin(module):
        return False
    return bool(_ATTENTION_CLASS.search(user_class(module).__name__)) or _source_kinds(user_class(module))[0]


def _calls_softmax(module: nn.Module) -> bool:
    return not _is_builtin(module) and _source_kinds(user_class(module))[1]


def attention_like_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every attention-like module of ``model`` by qualified name (for messages and ``"auto"``)."""
    return {name: m for name, m in model.named_modules() if is_attention_like(m)}


def auto_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Every module that may compute attention, whatever its class name.

    Which of them do is decided while they run: each attention computation (SDPA, flex attention,
    ``nn.MultiheadAttention``, or a softmax over ``q·kᵀ`` scores) is attributed to the innermost of
    these modules running at that moment, so ``BertSelfAttention`` is reported, not the
    ``BertAttention`` around it, and a softmax over a router's or classifier's logits is not.
    Candidates are attention-like modules (:func:`is_attention_like`) and modules calling a softmax
    that contain no attention-like module.
    """
    return {
        name: m
        for name, m in model.named_modules()
        if is_attention_like(m) or (_calls_softmax(m) and not any(is_attention_like(c) for n, c in m.named_modules() if n))
    }


WRAPPER_ATTRIBUTES = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module", "_forward_module"})
"""Where wrappers keep the module they wrap (``torch.compile``, activation checkpointing, FSDP1, Lightning
Fabric's ``setup_module``): not part of a layer's name."""


def unwrapped_name(name: str) -> str:
    """A qualified module name without the wrappers' attributes (:data:`WRAPPER_ATTRIBUTES`).

    Example:
        >>> unwrapped_name("_orig_mod.blocks.0._checkpoint_wrapped_module.attn")
        'blocks.0.attn'
    """
    return ".".join(part for part in name.split(".") if part not in WRAPPER_ATTRIBUTES)


def target_name(name: str, module: nn.Module) -> str:
    """A target's layer name: its qualified name as in the unwrapped model, or its class name for the
    model itself (name "")."""
    return unwrapped_name(name) or user_class(module).__name__


def innermost(targets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The targets that contain no other target."""
    ids = {id(m) for m in targets.values()}
    return {name: m for name, m in targets.items() if not any(id(c) in ids for n, c in m.named_modules() if n)}


def resolve_targets(model: nn.Module, targets: Targets = "auto") -> dict[str, nn.Module]:
    """The modules to capture, by qualified name, in definition order.

    Raises:
        ValueError: if ``targets`` has the wrong type, holds an invalid regex, or selects nothing
            (the message lists the attention-like modules that exist).
    """
    if isinstance(targets, str) and targets == "auto":
        selected = auto_targets(model)
    elif isinstance(targets, str) or (isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets)):
        patterns = [targets] if isinstance(targets, str) else list(targets)
        try:
            compiled = [re.compile(p) for p in patterns]
        except re.error as err:
            raise ValueError(f"`targets` holds an invalid regular expression: {err}") from err
        selected = {n: m for n, m in model.named_modules() if any(p.fullmatch(n) or p.fullmatch(unwrapped_name(n)) for p in compiled)}
        # a wrapper and the module it wraps share the unwrapped name: keep the wrapped (innermost) one
        innermost_of = {unwrapped_name(n): n for n in sorted(selected, key=len)}
        selected = {n: m for n, m in selected.items() if innermost_of[unwrapped_name(n)] == n}
    elif callable(targets):
        selected = {n: m for n, m in model.named_modules() if targets(n, m)}
    else:
        raise ValueError(f'`targets` must be "auto", a regex, a list of regexes or a predicate (name, module) -> bool, got {targets!r}')
    if not selected:
        existing = sorted(unwrapped_name(name) for name in attention_like_modules(model))
        if not existing:
            raise ValueError(
                f"{user_class(model).__name__} has no attention module (no nn.MultiheadAttention, no module class named "
                f'like "*Attention*"/"*Attn*" and none calling SDPA, flex attention or a softmax); pass `targets=` '
                "regexes naming the modules that compute attention"
            )
        raise ValueError(
            f"`targets`={targets!r} selects no module of {user_class(model).__name__}; regexes must fully match qualified "
            f"module names. Attention-like modules: {existing}"
        )
    return selected


def fast_path_hosts(model: nn.Module, targets: dict[str, nn.Module]) -> list[nn.Module]:
    """The ``nn.TransformerEncoder``/``EncoderLayer`` modules that contain a target."""
    wanted = {id(m) for m in targets.values()}
    return [m for m in model.modules() if isinstance(m, FAST_PATH_HOSTS) and any(id(c) in wanted for c in m.modules())]
