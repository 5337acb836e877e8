"""The seed's analyses on the probe example (batch element 0, first ``T`` tokens), for the dashboards.

Everything here works on the ``[H, T, T]`` example probabilities the capture keeps per layer (plus the
module's input/output states and SDPA values when available), so its cost does not grow with the
batch: a few small tensor operations per layer, plus rendering.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnmonitor.capture.accumulator import StatisticsAccumulator
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
from attnmonitor.functional.statistics import POSITION_STATISTICS, STATISTICS, attention_statistics


@dataclass
class ProbeAnalysis:
    """Results for the layers that kept an example, in layer order."""

    layers: list[str] = field(default_factory=list)
    scalars: dict[str, float] = field(default_factory=dict)
    roles: Tensor | None = None  # [L, H] indices into ROLES
    similarity: Tensor | None = None  # [L, H] correlations (NaN-free; 0 where unavailable)
    interpretation: dict[str, str] = field(default_factory=dict)  # layer -> markdown table
    rollout: Tensor | None = None  # [T, T]
    rollout_tokens: list[str] | None = None  # its T labels
    embedding: tuple[Tensor, list[list[str]]] | None = None  # ([N, C] outputs, [[token, layer]] metadata)


def analyse_probe(
    layers: Sequence[str],
    accumulator: StatisticsAccumulator,
    tokens: Sequence[str] | None,
    *,
    prefix: str,
    sink_tokens: int = 1,
    top_k: int = 5,
    classes: dict[str, frozenset[str]] | None = None,
    kinds: Mapping[str, str] | None = None,
    query_tokens: Sequence[str] | None = None,
) -> ProbeAnalysis:
    """Run every analysis on the example kept for each layer; scalar tags start with ``prefix``.

    ``tokens`` label the example's sequence from position 0 (the example may start later: left
    padding). Cross-attention layers (``kinds``) have queries from another sequence, labelled by
    ``query_tokens`` (positions when None): no positional profile, similarity or self column for them,
    and rollout and the projector follow the self-attention layers of the first sequence only (those
    before the first cross-attention layer, while the example size stays the same).
    """
    kinds = kinds or {}
    result = ProbeAnalysis()
    roles, similarity, rollout_layers, outputs = [], [], [], []
    first_sequence = set(_first_sequence([layer for layer in layers if layer in accumulator.examples], kinds))
    chained = True  # rollout stops at the first layer of another size (a second tower)
    for layer in layers:
        if layer not in accumulator.examples:
            continue
        cross = kinds.get(layer) == CROSS
        probs = accumulator.examples[layer].unsqueeze(0)  # [1, H, T, T]
        states = accumulator.example_states.get(layer, {})
        keys = states.get("key_valid")
        keys = None if keys is None else keys.unsqueeze(0)
        start, key_start = int(states.get("start", 0)), int(states.get("key_start", 0))
        t = probs.shape[-1]
        key_labels = _window(tokens, key_start, t)
        result.layers.append(layer)
        names = [n for n in STATISTICS if not (cross and n in POSITION_STATISTICS)]
        stats = attention_statistics(probs, keys, statistics=names, sink_tokens=sink_tokens)
        if cross:
            roles.append(head_roles(stats))
        else:
            profile = positional_profile(probs, keys)
            roles.append(head_roles({**stats, "normalized_distance": profile["normalized_distance"]}))
            for name, value in profile.items():
                result.scalars[f"{prefix}/position/{name}/{layer}"] = float(value.mean())
        result.scalars[f"{prefix}/diversity/{layer}"] = float(diversity(probs, keys))
        inputs = states.get("inputs")
        if not cross and inputs is not None and inputs.shape[0] >= start + t and probs.shape[-2] == t:
            correlation = similarity_attention_correlation(inputs[None, start : start + t], probs, keys)
            result.scalars[f"{prefix}/similarity_correlation/{layer}"] = float(correlation.mean())
        else:
            correlation = torch.zeros(probs.shape[1])
        similarity.append(correlation)
        values = states.get("values")
        if values is not None and values.shape[-2] >= key_start + t:
            parts = composition(probs, values[None, :, key_start : key_start + t], keys)
            result.scalars[f"{prefix}/effective_contributors/{layer}"] = float(parts["effective_contributors"].mean())
            result.scalars[f"{prefix}/composition_entropy/{layer}"] = float(parts["entropy"].mean())
        if key_labels is not None:
            share = class_attention_share(probs, token_classes(key_labels, classes), (len(classes) + 1) if classes else 2, keys)
            names = list(classes) + ["other"] if classes else ["content", "function"]
            for index, name in enumerate(names):
                result.scalars[f"{prefix}/{name}_share/{layer}"] = float(share[:, index].mean())
        query_labels = _window(query_tokens, start, probs.shape[-2]) if cross else _window(tokens, start, probs.shape[-2])
        result.interpretation[layer] = interpretation_table(
            probs[0], keys[0] if keys is not None else None, key_labels, top_k, query_tokens=query_labels, self_column=not cross
        )
        chained = chained and layer in first_sequence and probs.shape[-2] == t
        chained = chained and (not rollout_layers or rollout_layers[0].shape == probs.shape)
        if chained:
            rollout_layers.append(probs)
            out = states.get("outputs")
            if out is not None and out.shape[0] >= start + t:
                outputs.append((layer, out[start : start + t]))
    if not result.layers:
        return result
    width = max(r.numel() for r in roles)
    result.roles = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel()), value=ROLES.index("focused")) for r in roles])
    result.similarity = torch.stack([torch.nn.functional.pad(c, (0, width - c.numel())) for c in similarity])
    if rollout_layers:
        result.rollout = attention_rollout(rollout_layers)[0]
        start = int(accumulator.example_states.get(result.layers[0], {}).get("start", 0))
        result.rollout_tokens = _window(tokens, start, result.rollout.shape[-1])
    if outputs and len({o.shape[-1] for _, o in outputs}) == 1:
        t = max(o.shape[0] for _, o in outputs)
        start = int(accumulator.example_states[outputs[0][0]].get("start", 0))
        labels = _window(tokens, start, t) or [str(start + i) for i in range(t)]
        result.embedding = (
            torch.cat([o for _, o in outputs]),
            [[labels[i], layer] for layer, o in outputs for i in range(o.shape[0])],
        )
    return result


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
    labels = list(tokens[:tk]) if tokens is not None else [str(i) for i in range(tk)]
    queries = list(query_tokens[:tq]) if query_tokens is not None else (labels[:tq] if self_column else [f"q{i}" for i in range(tq)])
    mean = probs.float().mean(0)  # [Tq, Tk]
    keys = key_valid.any(0) if key_valid is not None else None
    weights, indices = top_k_attended(mean, top_k, keys)
    entropy = -(mean * torch.where(mean > 0, mean, torch.ones_like(mean)).log()).sum(-1) + 0.0
    header = "| query | attends to (weight) | entropy |" + (" self |" if self_column else "")
    lines = [header, "|---|---|---|" + ("---|" if self_column else "")]
    for i in range(tq):
        top = ", ".join(f"{labels[j]} ({w:.2f})" for w, j in zip(weights[i].tolist(), indices[i].tolist()) if w > 0)
        line = f"| {queries[i]} | {top} | {float(entropy[i]):.3f} |"
        lines.append(line + (f" {float(mean[i, i]):.3f} |" if self_column and i < tk else ""))
    return "\n".join(lines)


def role_changes(previous: Tensor | None, current: Tensor, layers: Sequence[str]) -> list[str]:
    """Human-readable role changes between two ``[L, H]`` role grids (empty if shapes differ)."""
    if previous is None or previous.shape != current.shape:
        return []
    changed = (previous != current).nonzero().tolist()
    return [f"{layers[l]} head {h}: {ROLES[previous[l, h]]} -> {ROLES[current[l, h]]}" for l, h in changed]
