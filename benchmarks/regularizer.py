"""Step time of training with the monitor's regularizer vs. the same penalty written by hand on eager attention.

    python benchmarks/regularizer.py [--steps 220] [--rounds 2]

Both train the demo GPT on the embedded corpus with an entropy + sparsity penalty. The hand-written
model computes softmax attention explicitly and adds the penalty in ``training_step``; the monitored
model keeps ``F.scaled_dot_product_attention`` and gets the penalty from ``AttentionMonitor`` (with its
statistics at default settings). Runs alternate; the medians are compared. Target: ratio <= 1.15.
"""

from __future__ import annotations

import argparse
import math
import statistics

import lightning as L
import torch
import torch.nn.functional as F
from common import seconds_per_step
from torch import Tensor

from attnmonitor import AttentionMonitor
from attnmonitor.demo import CorpusDataModule, TinyGPT
from attnmonitor.demo.gpt import CausalSelfAttention

WEIGHT_H, TARGET, WEIGHT_S = 0.1, 0.5, 0.1


class HandWrittenAttention(CausalSelfAttention):
    """Eager causal attention that keeps its probabilities for the penalty."""

    def forward(self, x: Tensor) -> Tensor:
        b, length, c = x.shape
        q, k, v = (t.view(b, length, self.heads, c // self.heads).transpose(1, 2) for t in self.qkv(x).split(c, dim=2))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        self.probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)  # [B, H, L, L]
        return self.proj((self.probs @ v).transpose(1, 2).reshape(b, length, c))


class HandWrittenGPT(TinyGPT):
    """TinyGPT whose training loss adds ``λ_H · mean (H_i − t log n_i)^2 + λ_S · mean (1 − Σ A^2)``."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        for block in self.blocks:
            block.attn.__class__ = HandWrittenAttention

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        ids, targets = batch
        loss = F.cross_entropy(self(ids).flatten(0, 1), targets.flatten())
        entropy_terms, sparsity_terms = [], []
        for block in self.blocks:
            p = block.attn.probs
            h = -(p * torch.where(p > 0, p, torch.ones_like(p)).log()).sum(-1)  # [B, H, L]
            log_n = torch.arange(1, p.shape[-1] + 1, device=p.device).log()  # causal: n_i = i + 1
            entropy_terms.append((h - TARGET * log_n).square().mean())
            sparsity_terms.append((1 - p.square().sum(-1)).mean())
        penalty = WEIGHT_H * torch.stack(entropy_terms).mean() + WEIGHT_S * torch.stack(sparsity_terms).mean()
        return loss + penalty


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=220)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    data = CorpusDataModule()
    regularizer = {"entropy_weight": WEIGHT_H, "entropy_target": TARGET, "sparsity_weight": WEIGHT_S}
    times: dict[str, list[float]] = {"hand-written eager": [], "AttentionMonitor": []}
    for _ in range(args.rounds):
        L.seed_everything(0, verbose=False)
        times["hand-written eager"].append(seconds_per_step(HandWrittenGPT(vocab_size=len(data.vocab)), data, args.steps, []))
        L.seed_everything(0, verbose=False)
        monitor = AttentionMonitor(regularizer=regularizer)
        times["AttentionMonitor"].append(seconds_per_step(TinyGPT(vocab_size=len(data.vocab)), data, args.steps, [monitor]))
    base = statistics.median(times["hand-written eager"])
    ours = statistics.median(times["AttentionMonitor"])
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds")
    print(f"hand-written eager penalty: {1000 * base:.1f} ms/step")
    print(f"AttentionMonitor regularizer: {1000 * ours:.1f} ms/step")
    ratio = ours / base
    print(f"step-time ratio {ratio:.3f} (target <= 1.15): {'PASS' if ratio <= 1.15 else 'FAIL'}")


if __name__ == "__main__":
    main()
