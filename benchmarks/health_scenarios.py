"""The training runs of the health suite: three model/task families, each trained by a plain loop
that records, at every optimizer step, the loss, the gradient norm and every head's statistics.

- ``lm``: word-level language modelling on the shipped corpus (``pydoc_data``), causal decoder;
- ``copy``: copy a random sequence after a separator (needs near one-hot attention), causal decoder;
- ``seq2seq``: reverse a random sequence, encoder-decoder with cross-attention;
- ``sort``: write a random sequence sorted after a separator, causal decoder (the second round's
  held-out family: see ``docs/alarms.md``);
- ``recall``: associative recall (key-value pairs, then the keys in another order: predict each
  value), a three-layer causal decoder (the third round's held-out family).

Every model is a pre-LN transformer without biases, trained with AdamW (β2 0.95), a linear warm-up
to the peak learning rate over 300 steps (half of a run), and a z-loss of 1e-4 on the output logits,
as large models are. ``qk_norm`` adds a LayerNorm on queries and keys (what stops attention logits
from growing); ``head_lr`` multiplies the output layer's learning rate (a run that diverges through
its output logits, not its attention).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnmonitor.integrations.loop import AttentionMonitorLoop

STATISTICS = ("normalized_entropy", "max_logit", "sink_mass")
FAMILIES = ("lm", "copy", "seq2seq", "sort", "recall")


@dataclass(frozen=True)
class Scenario:
    """One training run of the suite."""

    family: str
    lr: float
    seed: int
    qk_norm: bool = False
    head_lr: float = 1.0
    steps: int = 600
    warmup: int = 300

    @property
    def name(self) -> str:
        extra = ("+qknorm" if self.qk_norm else "") + (f"+head_lr{self.head_lr:g}" if self.head_lr != 1 else "")
        extra += f"+steps{self.steps}" if self.steps != 600 else ""
        return f"{self.family}{extra}/lr{self.lr:g}/seed{self.seed}"


class Attention(nn.Module):
    """Multi-head attention through SDPA, with separate ``q``/``k``/``v``/``o`` projections."""

    def __init__(self, dim: int, heads: int, causal: bool, qk_norm: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.q_norm = nn.LayerNorm(dim // heads, bias=False) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads, bias=False) if qk_norm else nn.Identity()

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        b, n, c = x.shape
        source = x if memory is None else memory

        def split(t: Tensor) -> Tensor:
            return t.view(b, -1, self.heads, c // self.heads).transpose(1, 2)  # [B, H, L, D]

        q, k, v = self.q_norm(split(self.q(x))), self.k_norm(split(self.k(source))), split(self.v(source))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal and memory is None)
        return self.o(y.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool, qk_norm: bool, cross: bool = False) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim, bias=False), nn.LayerNorm(dim, bias=False)
        self.attn = Attention(dim, heads, causal, qk_norm)
        self.ln_cross = nn.LayerNorm(dim, bias=False) if cross else None
        self.cross = Attention(dim, heads, False, qk_norm) if cross else None
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim, bias=False), nn.GELU(), nn.Linear(4 * dim, dim, bias=False))

    def forward(self, x: Tensor, memory: Tensor | None = None) -> Tensor:
        x = x + self.attn(self.ln1(x))
        if self.cross is not None:
            x = x + self.cross(self.ln_cross(x), memory)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    """A causal decoder, or (``encoder_layers > 0``) an encoder-decoder with cross-attention."""

    def __init__(self, vocab: int, length: int, dim: int, heads: int, layers: int, qk_norm: bool, encoder_layers: int = 0) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, dim), nn.Embedding(length, dim)
        self.encoder = nn.ModuleList(Block(dim, heads, False, qk_norm) for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(Block(dim, heads, True, qk_norm, cross=encoder_layers > 0) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim, bias=False), nn.Linear(dim, vocab, bias=False)

    def _embed(self, ids: Tensor) -> Tensor:
        return self.embed(ids) + self.position(torch.arange(ids.shape[1], device=ids.device))

    def forward(self, ids: Tensor, source: Tensor | None = None) -> Tensor:
        memory = None
        if source is not None:
            memory = self._embed(source)
            for block in self.encoder:
                memory = block(memory)
        x = self._embed(ids)
        for block in self.decoder:
            x = block(x, memory)
        return self.head(self.ln(x))  # [B, L, V]


@cache
def _corpus_ids(vocabulary: int = 1024) -> Tensor:
    from attnmonitor.demo.corpus import WordVocabulary, load_corpus_words

    words = load_corpus_words()
    vocab = WordVocabulary(words)
    ids = vocab.encode(words)
    return torch.where(ids < vocabulary, ids, 0)  # the rarer words become <unk>


class Task:
    """Batches and loss of a family: ``batch(generator)`` -> ``(inputs, source, targets, loss_mask)``."""

    def __init__(self, family: str, batch_size: int = 32) -> None:
        self.family, self.batch_size = family, batch_size
        if family == "lm":
            self.vocab, self.length = 1024, 32
        elif family == "copy":
            self.vocab, self.length, self.half = 34, 33, 16  # 32 symbols, separator 32, padding 33 unused
        elif family == "seq2seq":
            self.vocab, self.length = 34, 13  # 32 symbols, start token 32
        elif family == "sort":
            self.vocab, self.length, self.half = 34, 25, 12  # 32 symbols, separator 32
        elif family == "recall":
            self.vocab, self.length, self.pairs = 33, 17, 4  # keys 0-15, values 16-31, separator 32
        else:
            raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")

    def model(self, qk_norm: bool) -> Transformer:
        layers = 3 if self.family == "recall" else 2
        return Transformer(self.vocab, self.length, 64, 4, layers, qk_norm, encoder_layers=2 if self.family == "seq2seq" else 0)

    def batch(self, generator: torch.Generator) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
        b = self.batch_size
        if self.family == "lm":
            ids = _corpus_ids()
            starts = torch.randint(0, len(ids) - self.length - 1, (b,), generator=generator)
            window = torch.stack([ids[s : s + self.length + 1] for s in starts.tolist()])
            return window[:, :-1], None, window[:, 1:], torch.ones(b, self.length, dtype=torch.bool)
        if self.family in ("copy", "sort"):
            symbols = torch.randint(0, 32, (b, self.half), generator=generator)
            answer = symbols if self.family == "copy" else symbols.sort(1).values
            seq = torch.cat([symbols, torch.full((b, 1), 32), answer], 1)  # [B, 2 half + 1]
            mask = torch.zeros(b, self.length, dtype=torch.bool)
            mask[:, self.half : -1] = True  # from the separator on: predict the copy
            targets = torch.cat([seq[:, 1:], torch.zeros(b, 1, dtype=torch.long)], 1)
            return seq, None, targets, mask
        if self.family == "recall":
            keys = torch.rand(b, 16, generator=generator).argsort(1)[:, : self.pairs]  # distinct keys
            values = torch.randint(16, 32, (b, self.pairs), generator=generator)
            order = torch.rand(b, self.pairs, generator=generator).argsort(1)
            pairs = torch.stack([keys, values], 2).flatten(1)  # k1 v1 k2 v2 ...
            queries = torch.stack([keys.gather(1, order), values.gather(1, order)], 2).flatten(1)
            seq = torch.cat([pairs, torch.full((b, 1), 32), queries], 1)  # [B, 4 pairs + 1]
            mask = torch.zeros(b, self.length, dtype=torch.bool)
            mask[:, 2 * self.pairs + 1 :: 2] = True  # at each queried key: predict its value
            targets = torch.cat([seq[:, 1:], torch.zeros(b, 1, dtype=torch.long)], 1)
            return seq, None, targets, mask
        source = torch.randint(0, 32, (b, self.length - 1), generator=generator)
        target = source.flip(1)
        inputs = torch.cat([torch.full((b, 1), 32), target[:, :-1]], 1)
        return inputs, source, target, torch.ones(b, self.length - 1, dtype=torch.bool)


@dataclass
class Trace:
    """What one run recorded at every optimizer step."""

    scenario: dict
    losses: list[float]
    grad_norms: list[float]
    layers: list[str]
    stats: dict[str, list[list[list[float]]]]  # statistic -> step -> layer -> head
    seconds: float


LEARNING_RATES = {
    "copy": (0.03, 0.1, 0.3),
    "seq2seq": (0.01, 0.02, 0.03),
    "lm": (0.03, 0.1, 0.3, 1.0),
    "sort": (0.01, 0.1, 0.3),
    "recall": (0.01, 0.03, 0.1, 1.0),
}
"""Each family's peak learning rates: clearly stable, borderline, clearly unstable (without qk-layernorm)."""
ELSEWHERE = {"copy": 0.1, "seq2seq": 0.02, "lm": 0.3, "sort": 0.1, "recall": 0.03}
"""The peak learning rate of each family's runs that diverge through their output logits (qk-layernorm on,
the output layer's learning rate 30x)."""


def suite(seeds: tuple[int, ...] = (0, 1, 2)) -> list[Scenario]:
    """Every run of the suite: each family's learning-rate sweep with and without qk-layernorm, and its
    output-logit divergence, on every seed."""
    runs = [
        Scenario(f, lr, seed, qk_norm) for f, lrs in LEARNING_RATES.items() for lr in lrs for qk_norm in (False, True) for seed in seeds
    ]
    return runs + [Scenario(f, lr, seed, True, head_lr=30.0) for f, lr in ELSEWHERE.items() for seed in seeds]


def learning_rate(step: int, scenario: Scenario) -> float:
    return scenario.lr * min(1.0, (step + 1) / scenario.warmup)


def _rescale_moments(optimizer: torch.optim.Optimizer, before: dict[Tensor, Tensor]) -> None:
    """Scale AdamW's moments of the rows QK-clip just rescaled by the same factor (first moment) and
    its square (second), so the next update keeps its ratio to the weights."""
    for weight, old in before.items():
        factor = (weight.detach() * old).sum(1) / old.square().sum(1).clamp(min=1e-30)  # [rows]
        state = optimizer.state.get(weight)
        if state and not torch.allclose(factor, torch.ones_like(factor)):
            state["exp_avg"].mul_(factor[:, None])
            state["exp_avg_sq"].mul_(factor.square()[:, None])


def record(scenario: Scenario, qk_clip: dict | None = None, rescale_moments: bool = False) -> Trace:
    """Train ``scenario`` with the monitor capturing ``STATISTICS`` at every step; optionally with QK-clip
    (and, with ``rescale_moments``, the AdamW moments of the clipped rows rescaled alike)."""
    import time

    torch.manual_seed(scenario.seed)
    task = Task(scenario.family)
    model = task.model(scenario.qk_norm)
    head = list(model.head.parameters())
    rest = [p for p in model.parameters() if all(p is not h for h in head)]
    optimizer = torch.optim.AdamW(
        [{"params": rest, "scale": 1.0}, {"params": head, "scale": scenario.head_lr}], lr=scenario.lr, betas=(0.9, 0.95), weight_decay=0.1
    )
    generator = torch.Generator().manual_seed(1000 + scenario.seed)
    losses, norms, grids = [], [], {s: [] for s in STATISTICS}
    options = dict(
        schedule={"every_n_steps": 1},
        capture={"statistics": list(STATISTICS)},
        dashboards={"heatmaps": None, "analyses": False, "per_head": True},
        qk_clip=qk_clip,
    )
    start = time.perf_counter()
    with AttentionMonitorLoop(model, **options) as monitor:
        for step in range(scenario.steps):
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, scenario) * group["scale"]
            inputs, source, targets, mask = task.batch(generator)
            with monitor.step(step):
                logits = model(inputs, source)
                picked = logits[mask]
                loss = F.cross_entropy(picked, targets[mask])
                z_loss = 1e-4 * torch.logsumexp(picked, -1).square().mean()
            (loss + z_loss).backward()
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            projections = [m.weight for name, m in model.named_modules() if name.endswith((".q", ".k"))]
            before = {w: w.detach().clone() for w in projections} if rescale_moments else {}
            scalars = monitor.log()  # QK-clip rescales here
            _rescale_moments(optimizer, before)
            layers = monitor.engine.layers
            for statistic in STATISTICS:
                grids[statistic].append([[_head_value(scalars, statistic, layer, h) for h in range(4)] for layer in layers])
            if not math.isfinite(losses[-1]):
                break
    return Trace(asdict(scenario), losses, norms, list(layers), grids, time.perf_counter() - start)


def _head_value(scalars: dict[str, float], statistic: str, layer: str, head: int) -> float:
    return scalars.get(f"attn_train_heads/{statistic}/{layer}/head_{head}", math.nan)
