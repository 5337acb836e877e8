"""Where the time of a captured training step goes: the demo GPT, capturing every step, under cProfile.

    python benchmarks/capture_profile.py [--steps 150] [--shape demo|attention|balanced|mlp]

Prints the extra time per step of the monitor (wall clock, side by side with an unmonitored run),
then the monitor's own functions by cumulative time per step under cProfile (which inflates Python
overhead, so read the shares, not the absolute figures).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import lightning as L
import torch
from common import seconds_per_step
from throughput import SHAPES

from attnmonitor import AttentionMonitor
from attnmonitor.demo import CorpusDataModule, TinyGPT

PARTS = {
    "whole captured training step (profiled)": ("training_epoch_loop.py", "advance"),
    "monitor: before each batch (schedule, batch masks)": ("callback.py", "on_train_batch_start"),
    "monitor: after each batch (reduce, log scalars)": ("callback.py", "on_train_batch_end"),
    "  publish: scalars from the sums (sync, means)": ("engine.py", "_compute"),
    "  publish: scalar dict to the loggers": ("callback.py", "log_scalars"),
    "interception mode: every torch call inside attention modules": ("interception.py", "__torch_function__"),
    "hooks: entering/leaving attention modules": ("hooks.py", "_enter_target"),
    "one attention call's record handled (all below)": ("capture.py", "_consume"),
    "  judge: valid rows, sinks, kinds from the call's mask": ("calls.py", "judge"),
    "  statistics of the call (fused or chunked)": ("evaluation.py", "call_head_sums"),
    "    compiled kernel from q/k blocks": ("logit_kernel.py", "qk_row_statistics"),
    "    fused path: one extra flash call + position weights": ("fused.py", "fused_row_statistics"),
    "  finiteness check (a device sync)": ("capture.py", "<genexpr>"),
    "  accumulate sums into the layer state": ("accumulator.py", "add"),
}


def fit(steps: int, monitor: AttentionMonitor | None, data: CorpusDataModule, shape: str = "demo") -> float:
    L.seed_everything(0, verbose=False)
    dim, layers, heads, _, _ = SHAPES[shape]
    model = TinyGPT(vocab_size=len(data.vocab), seq_len=data.seq_len, dim=dim, layers=layers, heads=heads)
    return seconds_per_step(model, data, steps, [monitor] if monitor else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--shape", choices=list(SHAPES), default="demo")
    args = parser.parse_args()
    data = CorpusDataModule(seq_len=SHAPES[args.shape][3], batch_size=SHAPES[args.shape][4])
    every = lambda: AttentionMonitor(schedule={"every_n_steps": 1, "atlas_every_n_steps": 10**9}, dashboards={"heatmaps": None})  # noqa: E731
    plain, monitored = fit(args.steps, None, data, args.shape), fit(args.steps, every(), data, args.shape)
    plain, monitored = min(plain, fit(args.steps, None, data, args.shape)), min(monitored, fit(args.steps, every(), data, args.shape))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps, best of 2")
    print(
        f"unmonitored {plain * 1e3:.1f} ms/step, capturing every step {monitored * 1e3:.1f} ms/step: "
        f"+{(monitored - plain) * 1e3:.2f} ms/step, ratio {plain / monitored:.3f}"
    )

    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    fit(args.steps, every(), data, args.shape)
    profiler.disable()
    print(f"\nunder cProfile ({time.perf_counter() - start:.0f} s): cumulative ms per step")
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    for label, (file, function) in PARTS.items():
        total = sum(v[3] for (path, _, name), v in stats.items() if path.endswith(file) and name == function)
        print(f"{label:<66} {total / args.steps * 1e3:8.2f}")


if __name__ == "__main__":
    main()
