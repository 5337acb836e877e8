"""Cost of all default statistics on a [48, 12, 128, 128] probability tensor, against one softmax.

    python benchmarks/statistics_kernel.py [--repeats 20]

Also times naive per-row Python functions (as notebooks write them) on the same data (entropy per row, max,
sparsity, locality per head), to report the speed-up of the vectorised path.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from attnmonitor.functional import STATISTICS, chunked_head_sums, probability_chunks

SHAPE = (48, 12, 128, 128)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def naive_functions(probs: torch.Tensor) -> None:
    """Naive per-row formulas, as notebooks write them: Python loops over rows and heads."""
    b, h, length, _ = probs.shape
    distance = torch.abs(torch.arange(length).unsqueeze(0) - torch.arange(length).unsqueeze(1)).float()
    for bi in range(b):
        for hi in range(h):
            matrix = probs[bi, hi]
            for row in matrix:  # compute_attention_entropy, per row
                weights = row + 1e-10
                -torch.sum(weights * torch.log(weights)).item()
                row.max().item()
            (matrix < 0.1).float().mean().item()  # compute_attention_sparsity
            1 - ((matrix * distance).sum() / matrix.sum()) / (length / 2)  # compute_attention_locality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    logits = torch.randn(SHAPE)
    causal = torch.ones(SHAPE[-2:], dtype=torch.bool).tril()
    logits = logits.masked_fill(~causal, -math.inf)
    probs = logits.softmax(-1)

    softmax = median_seconds(lambda: logits.softmax(-1), args.repeats)
    # masked=True: softmax output is already 0 on masked keys, as in the capture's eager path
    ours = median_seconds(lambda: chunked_head_sums(probability_chunks(probs, causal, masked=True), statistics=STATISTICS), args.repeats)
    start = time.perf_counter()
    naive_functions(probs)
    naive = time.perf_counter() - start

    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, probabilities {list(SHAPE)} (causal)")
    print(f"one softmax:                    {1000 * softmax:8.2f} ms")
    print(f"all {len(STATISTICS)} statistics (attnmonitor): {1000 * ours:8.2f} ms")
    print(f"naive per-row functions:        {1000 * naive:8.0f} ms (4 statistics)")
    ratio = ours / softmax
    print(f"statistics / softmax = {ratio:.2f} (target <= 2.0): {'PASS' if ratio <= 2.0 else 'FAIL'}")
    print(f"speed-up over naive per-row functions: {naive / ours:.0f}x")


if __name__ == "__main__":
    main()
