"""Cost of capturing a FlexAttention model, against its own forward, measured side by side.

    python benchmarks/flex.py [--length 1024] [--repeats 5]

A 4-layer model whose attention is ``flex_attention`` (8 heads of 64, batch 2) with a sliding-window
document mask; forwards under ``torch.no_grad``, flex called eagerly and ``torch.compile``d. Reports
the forward time alone and with a capture of all statistics (the ``score_mod`` makes every call take
the chunked path) and of the fused-path statistics without ``score_mod``. No target: reported.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import Tensor, nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from attnmonitor import STATISTICS, AttentionCapture
from attnmonitor.functional.fused import FUSED_STATISTICS

HEADS, HEAD_DIM, LAYERS, BATCH, WINDOW = 8, 64, 4, 2, 256
SOFTCAP = 30.0


def softcap(score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
    return SOFTCAP * torch.tanh(score / SOFTCAP)


class FlexLayer(nn.Module):
    def __init__(self, flex, score_mod) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.qkv = nn.Linear(HEADS * HEAD_DIM, 3 * HEADS * HEAD_DIM)
        self.flex, self.score_mod = flex, score_mod

    def forward(self, x: Tensor, block_mask) -> Tensor:  # type: ignore[no-untyped-def]
        b, length, width = x.shape
        q, k, v = (t.view(b, length, HEADS, HEAD_DIM).transpose(1, 2) for t in self.qkv(x).split(width, -1))
        return x + self.flex(q, k, v, score_mod=self.score_mod, block_mask=block_mask).transpose(1, 2).reshape(b, length, width)


class FlexModel(nn.Module):
    def __init__(self, flex, score_mod) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.layers = nn.ModuleList(FlexLayer(flex, score_mod) for _ in range(LAYERS))

    def forward(self, x: Tensor, block_mask) -> Tensor:  # type: ignore[no-untyped-def]
        for layer in self.layers:
            x = layer(x, block_mask)
        return x


def seconds(model: nn.Module, x: Tensor, block_mask, repeats: int, capture: AttentionCapture | None) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        with torch.no_grad():
            if capture is None:
                model(x, block_mask)
            else:
                with capture:
                    model(x, block_mask)
                capture.reset()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
    documents = (torch.arange(args.length) // (args.length // 3)).expand(BATCH, -1)

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        return (q >= k) & (q - k < WINDOW) & (documents[b, q] == documents[b, k])

    block_mask = create_block_mask(mask_mod, BATCH, None, args.length, args.length, device="cpu")
    x = torch.randn(BATCH, args.length, HEADS * HEAD_DIM)
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; {LAYERS} layers, batch {BATCH}, "
        f"L={args.length}, {HEADS} heads of {HEAD_DIM}; sliding-window ({WINDOW}) document mask"
    )
    print(f"{'flex call':<10} {'score_mod':<10} {'statistics':<22} {'forward ms':>10} {'monitored ms':>12} {'ratio':>6}")
    for name, flex in (("eager", flex_attention), ("compiled", torch.compile(flex_attention))):
        for score_mod, stats, label in (
            (softcap, None, f"all {len(STATISTICS)} (chunked)"),
            (None, sorted(FUSED_STATISTICS), f"fused-path {len(FUSED_STATISTICS)}"),
        ):
            torch.manual_seed(0)
            model = FlexModel(flex, score_mod)
            plain = seconds(model, x, block_mask, args.repeats, None)
            capture = AttentionCapture(model, targets=r"layers\.\d+", **({} if stats is None else {"statistics": stats}))
            monitored = seconds(model, x, block_mask, args.repeats, capture)
            mod = "softcap" if score_mod else "none"
            print(f"{name:<10} {mod:<10} {label:<22} {plain * 1e3:10.1f} {monitored * 1e3:12.1f} {monitored / plain:6.2f}")


if __name__ == "__main__":
    main()
