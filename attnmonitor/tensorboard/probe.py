"""The seed's analyses on the probe example (batch element 0, first ``T`` tokens), for the dashboards.

Everything here works on the ``[H, T, T]`` example probabilities the capture keeps per layer (plus the
module's input/output states and SDPA values when available), so its cost does not grow with the
batch: a few small tensor operations per layer, plus rendering.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnmonitor.capture.accumulator import StatisticsAccumulator
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
from attnmonitor.functional.statistics import attention_statistics


@dataclass
class ProbeAnalysis:
    """Results for the layers that kept an example, in layer order."""

    layers: list[str] = field(default_factory=list)
    scalars: dict[str, float] = field(default_factory=dict)
    roles: Tensor | None = None  # [L, H] indices into ROLES
    similarity: Tensor | None = None  # [L, H] correlations (NaN-free; 0 where unavailable)
    interpretation: dict[str, str] = field(default_factory=dict)  # layer -> markdown table
    rollout: Tensor | None = None  # [T, T]
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
) -> ProbeAnalysis:
    """Run every analysis on the example kept for each layer; scalar tags start with ``prefix``."""
    result = ProbeAnalysis()
    roles, similarity, rollout_layers, outputs = [], [], [], []
    for layer in layers:
        if layer not in accumulator.examples:
            continue
        probs = accumulator.examples[layer].unsqueeze(0)  # [1, H, T, T]
        states = accumulator.example_states.get(layer, {})
        keys = states.get("key_valid")
        keys = None if keys is None else keys.unsqueeze(0)
        t = probs.shape[-1]
        result.layers.append(layer)
        stats = attention_statistics(probs, keys, sink_tokens=sink_tokens)
        profile = positional_profile(probs, keys)
        roles.append(head_roles({**stats, "normalized_distance": profile["normalized_distance"]}))
        for name, value in profile.items():
            result.scalars[f"{prefix}/position/{name}/{layer}"] = float(value.mean())
        result.scalars[f"{prefix}/diversity/{layer}"] = float(diversity(probs, keys))
        inputs = states.get("inputs")
        if inputs is not None and inputs.shape[0] >= t and probs.shape[-2] == t:
            correlation = similarity_attention_correlation(inputs[None, :t], probs, keys)
            result.scalars[f"{prefix}/similarity_correlation/{layer}"] = float(correlation.mean())
        else:
            correlation = torch.zeros(probs.shape[1])
        similarity.append(correlation)
        values = states.get("values")
        if values is not None and values.shape[-2] >= t:
            parts = composition(probs, values[None, :, :t], keys)
            result.scalars[f"{prefix}/effective_contributors/{layer}"] = float(parts["effective_contributors"].mean())
            result.scalars[f"{prefix}/composition_entropy/{layer}"] = float(parts["entropy"].mean())
        if tokens is not None and len(tokens) >= t:
            share = class_attention_share(probs, token_classes(tokens[:t], classes), (len(classes) + 1) if classes else 2, keys)
            names = list(classes) + ["other"] if classes else ["content", "function"]
            for index, name in enumerate(names):
                result.scalars[f"{prefix}/{name}_share/{layer}"] = float(share[:, index].mean())
        result.interpretation[layer] = interpretation_table(probs[0], keys[0] if keys is not None else None, tokens, top_k)
        if probs.shape[-2] == t:
            rollout_layers.append(probs)
        out = states.get("outputs")
        if out is not None and out.shape[0] >= t:
            outputs.append((layer, out[:t]))
    if not result.layers:
        return result
    width = max(r.numel() for r in roles)
    result.roles = torch.stack([torch.nn.functional.pad(r, (0, width - r.numel()), value=ROLES.index("focused")) for r in roles])
    result.similarity = torch.stack([torch.nn.functional.pad(c, (0, width - c.numel())) for c in similarity])
    sizes = {p.shape[-1] for p in rollout_layers}
    if rollout_layers and len(sizes) == 1:
        result.rollout = attention_rollout(rollout_layers)[0]
    if outputs and len({o.shape[-1] for _, o in outputs}) == 1:
        labels = list(tokens) if tokens is not None else [str(i) for i in range(max(o.shape[0] for _, o in outputs))]
        result.embedding = (
            torch.cat([o for _, o in outputs]),
            [[labels[i], layer] for layer, o in outputs for i in range(o.shape[0])],
        )
    return result


def interpretation_table(probs: Tensor, key_valid: Tensor | None, tokens: Sequence[str] | None, top_k: int) -> str:
    """Markdown: for each query token of ``probs`` ``[H, T, T]`` (head mean), its top-k keys, entropy, self weight."""
    t = probs.shape[-1]
    labels = list(tokens[:t]) if tokens is not None else [str(i) for i in range(t)]
    mean = probs.float().mean(0)  # [T, T]
    keys = key_valid.any(0) if key_valid is not None else None
    weights, indices = top_k_attended(mean, top_k, keys)
    entropy = -(mean * torch.where(mean > 0, mean, torch.ones_like(mean)).log()).sum(-1) + 0.0
    lines = ["| query | attends to (weight) | entropy | self |", "|---|---|---|---|"]
    for i in range(mean.shape[0]):
        top = ", ".join(f"{labels[j]} ({w:.2f})" for w, j in zip(weights[i].tolist(), indices[i].tolist()) if w > 0)
        lines.append(f"| {labels[i]} | {top} | {float(entropy[i]):.3f} | {float(mean[i, i]):.3f} |")
    return "\n".join(lines)


def role_changes(previous: Tensor | None, current: Tensor, layers: Sequence[str]) -> list[str]:
    """Human-readable role changes between two ``[L, H]`` role grids (empty if shapes differ)."""
    if previous is None or previous.shape != current.shape:
        return []
    changed = (previous != current).nonzero().tolist()
    return [f"{layers[l]} head {h}: {ROLES[previous[l, h]]} -> {ROLES[current[l, h]]}" for l, h in changed]
