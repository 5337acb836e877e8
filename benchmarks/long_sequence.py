"""Monitoring an SDPA model at L = 8192: extra peak memory of the capture, and exactness.

    python benchmarks/long_sequence.py [--length 8192]

A 4-layer model (batch 1, 8 heads, head dim 64) whose attention is ``F.scaled_dot_product_attention``
runs one forward in a fresh process without and with ``AttentionCapture``: all statistics (probabilities
recomputed in chunks within the default 256 MB budget), and the statistics of the fused path (one
extra fused attention call, no probabilities).
Materialising one layer's probabilities would need ``8 · L² · 4`` bytes (2 GiB at L = 8192). Each
process reports its peak resident memory; the difference is the capture's extra peak. The captured
statistics are compared with a float64 reference computed here, chunk by chunk, from the same q/k.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys

import torch
from torch import nn

HEADS, HEAD_DIM, LAYERS, CHUNK = 8, 64, 4, 512


class AttentionLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(HEADS * HEAD_DIM, 3 * HEADS * HEAD_DIM)

    def qk(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, length, c = x.shape
        q, k, v = (t.view(b, length, HEADS, HEAD_DIM).transpose(1, 2) for t in self.qkv(x).split(c, dim=2))
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qk(x)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + y.transpose(1, 2).reshape(x.shape)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(AttentionLayer() for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reference(q: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 per-head means of four statistics under a causal mask, chunk by chunk."""
    length = q.shape[-2]
    sums = {name: torch.zeros(HEADS, dtype=torch.float64) for name in ("entropy", "max_weight", "sink_mass", "distance")}
    keys = torch.arange(length, dtype=torch.float64)
    for start in range(0, length, CHUNK):
        rows = torch.arange(start, min(length, start + CHUNK))
        logits = (q[0, :, rows].double() @ k[0].double().transpose(-1, -2)) / math.sqrt(HEAD_DIM)
        logits = logits.masked_fill(keys > rows.double().unsqueeze(-1), -math.inf)
        p = logits.softmax(-1)
        sums["entropy"] += -(p * torch.where(p > 0, p, torch.ones_like(p)).log()).sum(-1).sum(-1)
        sums["max_weight"] += p.amax(-1).sum(-1)
        sums["sink_mass"] += p[..., 0].sum(-1)
        sums["distance"] += (p * (rows.double().unsqueeze(-1) - keys).abs()).sum(-1).sum(-1)
    return {name: s / length for name, s in sums.items()}


FUSED = [
    "entropy",
    "normalized_entropy",
    "effective_support",
    "sink_mass",
    "self_weight",
    "prev_token_weight",
    "next_token_weight",
    "distance",
]


def run(mode: str, length: int) -> dict[str, object]:
    from attnmonitor import AttentionCapture

    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(1, length, HEADS * HEAD_DIM)
    with torch.no_grad():
        model(x[:, :256])  # warm-up allocations at a small size
        base = peak_rss_mb()
        if mode == "plain":
            model(x)
            return {"peak_mb": peak_rss_mb() - base}
        inputs: list[torch.Tensor] = []
        hooks = [layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for layer in model.layers]
        statistics = FUSED if mode == "fused" else None  # None: every statistic (chunked path)
        with AttentionCapture(model, **({"statistics": statistics} if statistics else {})) as cap:
            model(x)
        peak = peak_rss_mb() - base
        for hook in hooks:
            hook.remove()
        stats = cap.stats()
        worst = 0.0
        for index, (layer, layer_input) in enumerate(zip(model.layers, inputs, strict=True)):
            q, k, _ = layer.qk(layer_input)
            for name, expected in reference(q, k).items():
                if name not in stats:
                    continue
                error = ((stats[name][index].double() - expected).abs() / expected.abs().clamp_min(1e-12)).max()
                worst = max(worst, float(error))
    return {"peak_mb": peak, "worst_relative_error": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--mode", choices=["plain", "monitored", "fused"])
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run(args.mode, args.length)))
        return
    results = {}
    for mode in ("plain", "monitored", "fused"):
        command = [sys.executable, __file__, "--mode", mode, "--length", str(args.length)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    materialised = HEADS * args.length**2 * 4 / 2**20
    print(f"\nL={args.length}, batch 1, {HEADS} heads, head dim {HEAD_DIM}, {LAYERS} layers")
    print(f"one layer's probabilities: {materialised:.0f} MB")
    print(f"peak RSS growth of the unmonitored forward: {results['plain']['peak_mb']:.0f} MB")
    for mode, label in (("monitored", "all statistics (chunked)"), ("fused", "fused-path statistics")):
        extra = results[mode]["peak_mb"] - results["plain"]["peak_mb"]
        error = results[mode]["worst_relative_error"]
        print(f"{label}: extra peak memory {extra:.0f} MB (target <= 256): {'PASS' if extra <= 256 else 'FAIL'}")
        print(f"{label}: worst relative error vs float64 reference {error:.2e} (target <= 1e-4): {'PASS' if error <= 1e-4 else 'FAIL'}")


if __name__ == "__main__":
    main()
