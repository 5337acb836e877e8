"""Analyses of the example (the batch row with the most distinct tokens, first ``T`` real tokens of a captured step), for the dashboards.

Everything here works on the :class:`~attnmonitor.capture.accumulator.Example` the capture keeps per
layer (``[H, T, T]`` probabilities, the module's input/output states and SDPA values when available),
so its cost does not grow with the batch: a few small tensor operations per layer, plus rendering.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnmonitor.capture.accumulator import Example
from attnmonitor.capture.calls import CROSS, common_prefix
from attnmonitor.functional.analyses import (
    ROLES,
    attention_rollout,
    class_attention_share,
    composition,
    diversity,
    head_roles,
    positional_profile,
    similarity_attention_correlation,
    token_classes,
    top_k_attended,
)
from attnmonitor.functional.statistics import POSITION_STATISTICS, ROW_STATISTICS, attention_statistics, safe_entropy


@dataclass
class ExampleAnalysis:
    """Results for the layers that kept an example, in layer order."""

    layers: list[str] = field(default_factory=list)
    scalars: dict[tuple[str, str], float] = field(default_factory=dict)  # (analysis, layer) -> value
    roles: Tensor | None = None  # [L, H] indices into ROLES
    similarity: Tensor | None = None  # [L, H] correlations (NaN-free; 0 where unavailable)
    interpretation: dict[str, str] = field(default_factory=dict)  # layer -> markdown table
    rollout: Tensor | None = None  # [T, T]
    rollout_tokens: list[str] | None = None  # its T labels
    rollout_layers: list[str] = field(default_factory=list)  # the layers it goes through
    embedding: tuple[Tensor, list[list[str]]] | None = None  # ([N, C] outputs, [[token, layer]] metadata)


@dataclass
class _Options:
    tokens: Sequence[str] | None
    query_tokens: Sequence[str] | None
    sink_tokens: int
    top_k: int
    classes: dict[str, frozenset[str]] | None
    token_shares: bool


def analyse_example(
    layers: Sequence[str],
    examples: Mapping[str, Example],
    tokens: Sequence[str] | None,
    *,
    sink_tokens: int = 1,
    top_k: int = 5,
    classes: dict[str, frozenset[str]] | None = None,
    kinds: Mapping[str, str] | None = None,
    query_tokens: Sequence[str] | None = None,
    token_shares: bool = True,
) -> ExampleAnalysis:
    """Run every analysis on the example kept for each layer.

    ``tokens`` label the example's sequence from position 0 (the example may start later: left
    padding). Cross-attention layers (``kinds``) have queries from another sequence, labelled by
    ``query_tokens`` (positions when None): no positional profile, similarity or self column for them,
    and rollout and the projector follow the self-attention layers of the first sequence only (those
    before the first cross-attention layer, while the example size stays the same). ``token_shares``:
    attention shares of token classes (off when the labels are ids, without a tokenizer: ids are never
    function words).
    """
    kinds = kinds or {}
    options = _Options(tokens, query_tokens, sink_tokens, top_k, classes, token_shares)
    examples = {layer: examples[layer] for layer in layers if layer in examples and examples[layer].probs is not None}
    result = ExampleAnalysis(layers=list(examples))
    if not examples:
        return result
    roles, similarity = [], []
    for layer, example in examples.items():
        layer_roles, correlation = _analyse_layer(result, layer, example, kinds.get(layer) == CROSS, options)
        roles.append(layer_roles)
        similarity.append(correlation)
    width = max(r.numel() for r in roles)
    result.roles = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel()), value=ROLES.index("focused")) for r in roles])
    result.similarity = torch.stack([torch.nn.functional.pad(c, (0, width - c.numel())) for c in similarity])
    _add_flow(result, examples, _first_sequence(list(examples), kinds), tokens)
    return result


def _analyse_layer(result: ExampleAnalysis, layer: str, example: Example, cross: bool, options: _Options) -> tuple[Tensor, Tensor]:
    """Add one layer's scalars and interpretation table to ``result``; return its ``[H]`` roles and similarity."""
    assert example.probs is not None
    probs = example.probs.unsqueeze(0)  # [1, H, Tq, Tk]
    keys = None if example.key_valid is None else example.key_valid.unsqueeze(0)
    tq, tk = probs.shape[-2:]
    names = [n for n in ROW_STATISTICS if not (cross and n in POSITION_STATISTICS)]
    stats = attention_statistics(probs, keys, statistics=names, sink_tokens=options.sink_tokens)
    if cross:
        roles = head_roles(stats)
    else:
        profile = positional_profile(probs, keys)
        roles = head_roles({**stats, "normalized_distance": profile["normalized_distance"]})
        for name, value in profile.items():
            result.scalars[(f"position/{name}", layer)] = float(value.mean())
    result.scalars[("diversity", layer)] = float(diversity(probs, keys))
    correlation = torch.zeros(probs.shape[1])
    inputs, start = example.inputs, example.start
    if not cross and inputs is not None and inputs.shape[0] >= start + tk and tq == tk:
        correlation = similarity_attention_correlation(inputs[None, start : start + tk], probs, keys)
        result.scalars[("similarity_correlation", layer)] = float(correlation.mean())
    values, key_start = example.values, example.key_start
    if values is not None and values.shape[-2] >= key_start + tk:
        parts = composition(probs, values[None, :, key_start : key_start + tk], keys)
        result.scalars[("effective_contributors", layer)] = float(parts["effective_contributors"].mean())
        result.scalars[("composition_entropy", layer)] = float(parts["entropy"].mean())
    key_labels = _window(options.tokens, key_start, tk)
    if key_labels is not None and options.token_shares:
        classes = options.classes
        share = class_attention_share(probs, token_classes(key_labels, classes), (len(classes) + 1) if classes else 2, keys)
        for index, name in enumerate(list(classes) + ["other"] if classes else ["content", "function"]):
            result.scalars[(f"{name}_share", layer)] = float(share[:, index].mean())
    query_labels = _window(options.query_tokens if cross else options.tokens, start, tq)
    result.interpretation[layer] = interpretation_table(
        probs[0], keys[0] if keys is not None else None, key_labels, options.top_k, query_tokens=query_labels, self_column=not cross
    )
    return roles, correlation


def _add_flow(result: ExampleAnalysis, examples: Mapping[str, Example], chain: Sequence[str], tokens: Sequence[str] | None) -> None:
    """Rollout and projector vectors through ``chain``'s leading layers of one square size (one tower)."""
    rollout_layers: list[Tensor] = []
    outputs: list[tuple[str, Tensor]] = []
    for layer in chain:
        example = examples[layer]
        assert example.probs is not None
        probs = example.probs.unsqueeze(0)
        if probs.shape[-2] != probs.shape[-1] or (rollout_layers and rollout_layers[0].shape != probs.shape):
            break
        rollout_layers.append(probs)
        result.rollout_layers.append(layer)
        t, out = probs.shape[-1], example.outputs
        if out is not None and out.shape[0] >= example.start + t:
            outputs.append((layer, out[example.start : example.start + t]))
    if rollout_layers:
        result.rollout = attention_rollout(rollout_layers)[0]
        result.rollout_tokens = _window(tokens, examples[chain[0]].start, result.rollout.shape[-1])
    if outputs and len({o.shape[-1] for _, o in outputs}) == 1:
        t, start = max(o.shape[0] for _, o in outputs), examples[outputs[0][0]].start
        labels = _window(tokens, start, t) or [str(start + i) for i in range(t)]
        result.embedding = (
            torch.cat([o for _, o in outputs]),
            [[labels[i], layer] for layer, o in outputs for i in range(o.shape[0])],
        )


def _first_sequence(layers: Sequence[str], kinds: Mapping[str, str]) -> list[str]:
    """The self-attention layers of the first sequence: all of them, or in an encoder-decoder those
    before the block of the first cross-attention layer (its own self-attention shares the longest
    module-name prefix with it, as in :class:`attnmonitor.capture.calls.CallTracker`)."""
    first_cross = next((i for i, layer in enumerate(layers) if kinds.get(layer) == CROSS), None)
    if first_cross is None:
        return list(layers)
    before = list(layers[:first_cross])
    parts = layers[first_cross].split(".")
    shared = [common_prefix(parts, layer.split(".")) for layer in before]
    if shared and max(shared) > 0:
        before = before[: shared.index(max(shared))]  # the decoder's first self-attention starts its sequence
    return before


def _window(labels: Sequence[str] | None, start: int, length: int) -> list[str] | None:
    """``labels[start : start + length]``, or None when they do not cover it."""
    if labels is None or len(labels) < start + length:
        return None
    return list(labels[start : start + length])


_MARKDOWN = str.maketrans({c: "\\" + c for c in "\\`*_[]#|~"} | {"<": "&lt;", ">": "&gt;", "\n": " ", "&": "&amp;"})


def markdown_cell(text: str) -> str:
    """``text`` as the literal content of a Markdown table cell: a token such as ``|``, ``*`` or
    ``<s>`` neither splits the row nor formats it."""
    return text.translate(_MARKDOWN)


def interpretation_table(
    probs: Tensor,
    key_valid: Tensor | None,
    tokens: Sequence[str] | None,
    top_k: int,
    *,
    query_tokens: Sequence[str] | None = None,
    self_column: bool = True,
) -> str:
    """Markdown: for each query of ``probs`` ``[H, Tq, Tk]`` (head mean), its top-k keys, entropy, self weight.

    ``tokens`` label the keys and, unless ``query_tokens`` are given, the queries; ``self_column``
    is False for cross-attention (query ``i`` and key ``i`` are different sequences).
    """
    tq, tk = probs.shape[-2:]
    labels = [markdown_cell(t) for t in tokens[:tk]] if tokens is not None else [str(i) for i in range(tk)]
    if query_tokens is not None:
        queries = [markdown_cell(t) for t in query_tokens[:tq]]
    else:
        queries = labels[:tq] if self_column else [f"q{i}" for i in range(tq)]
    mean = probs.float().mean(0)  # [Tq, Tk]
    keys = key_valid.any(0) if key_valid is not None else None
    weights, indices = top_k_attended(mean, top_k, keys)
    entropy = safe_entropy(mean)
    header = "| query | attends to (weight) | entropy |" + (" self |" if self_column else "")
    lines = [header, "|---|---|---|" + ("---|" if self_column else "")]
    for i in range(tq):
        top = ", ".join(f"{labels[j]} ({w:.2f})" for w, j in zip(weights[i].tolist(), indices[i].tolist(), strict=True) if w > 0)
        line = f"| {queries[i]} | {top} | {float(entropy[i]):.3f} |"
        lines.append(line + (f" {float(mean[i, i]):.3f} |" if self_column and i < tk else ""))
    return "\n".join(lines)


def role_changes(previous: Tensor | None, current: Tensor, layers: Sequence[str]) -> list[str]:
    """Human-readable role changes between two ``[L, H]`` role grids (empty if shapes differ)."""
    if previous is None or previous.shape != current.shape:
        return []
    changed = (previous != current).nonzero().tolist()
    return [f"{layers[row]} head {h}: {ROLES[previous[row, h]]} -> {ROLES[current[row, h]]}" for row, h in changed]
