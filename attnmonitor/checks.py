"""Ground floor of the options: generic value checks, the layer-name grammar, and nested configs.

Every message names the option, what is accepted and the value received. Nothing here imports
another attnmonitor module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any, TypeVar

T = TypeVar("T")


def check_int(option: str, value: Any, minimum: int, optional: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is an int (not a bool) ``>= minimum`` (or None, if ``optional``)."""
    if value is None and optional:
        return
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"`{option}` must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")


def check_number(option: str, value: Any, low: float, high: float = float("inf"), optional: bool = False, above_low: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a number in ``[low, high]`` (``(low, high]`` when
    ``above_low``; or None, if ``optional``); the message states that range."""
    if value is None and optional:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and (low < value if above_low else low <= value) and value <= high):
        accepted = f"{'(' if above_low else '['}{low}, {high}{')' if high == float('inf') else ']'}"
        raise ValueError(f"`{option}` must be a number in {accepted}{' or None' if optional else ''}, got {value!r}")


def check_bool(option: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"`{option}` must be a bool, got {value!r}")


def check_layers(option: str, layers: str | Sequence[str] | None) -> list[str] | None:
    """Layer patterns as a list of regexes (a single string is one pattern), each compiled now.

    Raises:
        ValueError: naming the first pattern that is not a valid regex.
    """
    if layers is None:
        return None
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Sequence):
        raise ValueError(f"`{option}` must be a regular expression, a list of them or None, got {layers!r}")
    for pattern in layers:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as err:
            raise ValueError(f"`{option}` holds an invalid regular expression {pattern!r}: {err}") from err
    return list(layers)


def layer_selected(layer: str, patterns: Sequence[str] | None) -> bool:
    r"""Whether a layer (``name``, or a shared module's ``name#i``) is selected by regexes fully
    matching its module name (None selects every layer).

    Example:
        >>> layer_selected("blocks.0.attn#1", [r"blocks\.0\..*"]), layer_selected("blocks.1.attn", [r"blocks\.0\..*"])
        (True, False)
    """
    return patterns is None or any(re.fullmatch(p, layer.split("#")[0]) for p in patterns)


def as_config(value: T | Mapping[str, Any] | None, cls: type[T], option: str) -> T | None:
    """Accept a dataclass instance, a mapping of its fields, or None.

    Raises:
        ValueError: on another type or an unknown key (the message lists the accepted keys).
    """
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        accepted = [f.name for f in fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(value) - set(accepted))
        if unknown:
            raise ValueError(f"`{option}` got unknown keys {unknown}; accepted keys are {accepted}")
        return cls(**dict(value))
    article = "an" if cls.__name__[0] in "AEIOU" else "a"
    raise ValueError(f"`{option}` must be {article} {cls.__name__}, a mapping or None, got {type(value).__name__}")
