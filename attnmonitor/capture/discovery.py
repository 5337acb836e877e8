"""Finding the attention modules of a model."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Union

from torch import nn

Targets = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]
"""``"auto"``, a regex or regexes fully matching qualified module names, or a predicate ``(name, module)``."""

_ATTENTION_CLASS = re.compile(r"attention|attn", re.IGNORECASE)
FAST_PATH_HOSTS: tuple[type[nn.Module], ...] = (nn.TransformerEncoder, nn.TransformerEncoderLayer)
"""Modules whose eval-mode fused fast path would skip their attention submodule's ``forward``."""


def is_attention_like(module: nn.Module) -> bool:
    """``nn.MultiheadAttention``, or a class whose name contains "attention" or "attn"."""
    return isinstance(module, nn.MultiheadAttention) or bool(_ATTENTION_CLASS.search(type(module).__name__))


def attention_like_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every attention-like module of ``model`` by qualified name (for messages and ``"auto"``)."""
    return {name: m for name, m in model.named_modules() if is_attention_like(m)}


def auto_targets(model: nn.Module) -> dict[str, nn.Module]:
    """The innermost attention-like modules (``BertSelfAttention``, not the ``BertAttention`` around it)."""
    found = attention_like_modules(model)
    return {
        name: m
        for name, m in found.items()
        if not any(is_attention_like(child) for child_name, child in m.named_modules() if child_name)
    }


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
        selected = {n: m for n, m in model.named_modules() if any(p.fullmatch(n) for p in compiled)}
    elif callable(targets):
        selected = {n: m for n, m in model.named_modules() if targets(n, m)}
    else:
        raise ValueError(
            f'`targets` must be "auto", a regex, a list of regexes or a predicate (name, module) -> bool, got {targets!r}'
        )
    if not selected:
        existing = sorted(attention_like_modules(model))
        if not existing:
            raise ValueError(
                f"{type(model).__name__} has no attention module (no nn.MultiheadAttention and no module class "
                f'named like "*Attention*"/"*Attn*"); pass `targets=` regexes naming the modules that compute attention'
            )
        raise ValueError(
            f"`targets`={targets!r} selects no module of {type(model).__name__}; regexes must fully match qualified "
            f"module names. Attention-like modules: {existing}"
        )
    return selected


def fast_path_hosts(model: nn.Module, targets: dict[str, nn.Module]) -> list[nn.Module]:
    """The ``nn.TransformerEncoder``/``EncoderLayer`` modules that contain a target."""
    wanted = {id(m) for m in targets.values()}
    return [
        m for m in model.modules() if isinstance(m, FAST_PATH_HOSTS) and any(id(c) in wanted for c in m.modules())
    ]
