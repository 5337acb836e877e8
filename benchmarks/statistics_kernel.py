"""Cost of the statistics of one attention call against the softmax that produced its probabilities,
by shape and mask, with the compiled one-pass kernel and with the eager path.

    python benchmarks/statistics_kernel.py [--repeats 10] [--threads N]

For each ``[B, H, L, L]`` shape (L = 64 … 2048, heads 4 … 32) and mask (causal, padded, packed), times
one softmax over the logits, then every probability statistic (``ROW_STATISTICS``, summed per head as
the capture does) eagerly and through :mod:`attnmonitor.functional.row_kernel`, and prints the
ratios (the target: at most 2 × the softmax for L >= 512). The kernel's compilation (its first call)
is timed separately. Also checks that both paths agree to 1e-5.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import attnmonitor.functional.row_kernel as row_kernel
from attnmonitor.functional import ROW_STATISTICS, chunked_head_sums, probability_chunks

SHAPES = [(32, 4, 64), (16, 8, 128), (48, 12, 128), (4, 8, 512), (2, 16, 512), (1, 8, 1024), (1, 32, 1024), (1, 4, 2048)]
MASKS = ("causal", "padded", "packed")


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mask(kind: str, b: int, length: int) -> torch.Tensor:
    """Bool ``[B, 1, L, L]`` key mask of a layout."""
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    if kind == "padded":  # every other sequence a quarter shorter
        lengths = torch.tensor([length if i % 2 == 0 else 3 * length // 4 for i in range(b)])
        return (causal & (torch.arange(length) < lengths.view(b, 1, 1))).unsqueeze(1)
    if kind == "packed":  # four documents per row
        documents = torch.arange(length) * 4 // length
        return (causal & (documents.view(-1, 1) == documents.view(1, -1))).expand(b, 1, length, length)
    return causal.expand(b, 1, length, length)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32 on CPU")
    print(f"{'shape [B, H, L, L]':<22} {'mask':<8} {'softmax ms':>10} {'eager ×':>8} {'fused ×':>8}  target (L >= 512: fused <= 2)")
    row_kernel.MIN_ELEMENTS = 0  # every shape through the kernel, to compare
    failed = False
    for b, h, length in SHAPES:
        for kind in MASKS:
            keys = mask(kind, b, length)
            logits = torch.randn(b, h, length, length).masked_fill(~keys, -math.inf)
            probs = logits.softmax(-1).nan_to_num(0.0)

            def stats(probs=probs, keys=keys):
                return chunked_head_sums(probability_chunks(probs, keys, masked=True), statistics=ROW_STATISTICS)

            softmax = median_seconds(lambda logits=logits: logits.softmax(-1), args.repeats)
            row_kernel._failed = True
            eager_values, _ = stats()
            eager = median_seconds(stats, args.repeats)
            row_kernel._failed = False
            start = time.perf_counter()
            fused_values, _ = stats()
            first = time.perf_counter() - start
            fused = median_seconds(stats, args.repeats)
            for name in ROW_STATISTICS:
                torch.testing.assert_close(fused_values[name], eager_values[name], rtol=1e-5, atol=1e-5 * b * length)
            verdict = ""
            if length >= 512:
                ok = fused / softmax <= 2.0
                failed |= not ok
                verdict = "PASS" if ok else "FAIL"
            print(
                f"{str([b, h, length, length]):<22} {kind:<8} {1000 * softmax:>10.2f} {eager / softmax:>8.2f} {fused / softmax:>8.2f}  "
                f"{verdict} (first call {first:.1f} s)",
                flush=True,
            )
    print("\nALL PASS" if not failed else "\nSOME FAILED")


if __name__ == "__main__":
    main()
