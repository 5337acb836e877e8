"""Training throughput of the demo GPT with and without the attention monitor, measured side by side.

    python benchmarks/throughput.py [--steps 520] [--rounds 2] [--compiled-steps 260]

Eager: no monitor, the monitor at its defaults, and capturing every step; the stall of the step that
draws images (step 500: atlases, heatmaps, analyses) over the median step. Compiled
(``Module.compile()``, inductor): no monitor, defaults, every step. Runs alternate within each round
so that machine noise hits every configuration alike; the median per configuration is compared.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import lightning as L
import torch
from common import WARMUP_STEPS, step_durations

from attnmonitor import AttentionMonitor
from attnmonitor.demo import CorpusDataModule, TinyGPT

IMAGE_STEP = 499  # optimizer step 500 (counted from 1) publishes atlases and heatmaps at the defaults

Make = Callable[[], AttentionMonitor | None]
CONFIGS: dict[str, tuple[bool, Make, float | None]] = {
    "no monitor": (False, lambda: None, None),
    "monitor, defaults": (False, AttentionMonitor, 0.98),
    "monitor, every step": (False, lambda: AttentionMonitor(every_n_steps=1), 0.90),
    "compiled, no monitor": (True, lambda: None, None),
    "compiled, defaults": (True, AttentionMonitor, 0.97),
    "compiled, every step": (True, lambda: AttentionMonitor(every_n_steps=1), None),
}
BASELINES = {False: "no monitor", True: "compiled, no monitor"}
STALL_TARGET_MS = 50.0


def durations(steps: int, compiled: bool, make_monitor: Make, data: CorpusDataModule) -> list[float]:
    L.seed_everything(0, verbose=False)
    model = TinyGPT(vocab_size=len(data.vocab), seq_len=data.seq_len)
    if compiled:
        model.compile()
    monitor = make_monitor()
    return step_durations(model, data, steps, [monitor] if monitor else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=520)  # includes the image step 500
    parser.add_argument("--compiled-steps", type=int, default=260)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    data = CorpusDataModule()
    rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
    stalls: list[float] = []
    for _ in range(args.rounds):
        for name, (compiled, make, _) in CONFIGS.items():
            times = durations(args.compiled_steps if compiled else args.steps, compiled, make, data)
            timed = times[WARMUP_STEPS:]
            rates[name].append(len(timed) / sum(timed))
            if name == "monitor, defaults":
                stalls.append(times[IMAGE_STEP] - statistics.median(timed))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} eager / {args.compiled_steps} "
          f"compiled steps x {args.rounds} rounds")
    print(f"{'configuration':<22} {'steps/s':>8} {'ratio':>6} {'target':>7}  result")
    for name, (compiled, _, target) in CONFIGS.items():
        rate = statistics.median(rates[name])
        ratio = rate / statistics.median(rates[BASELINES[compiled]])
        verdict = "" if target is None else ("PASS" if ratio >= target else "FAIL")
        print(f"{name:<22} {rate:8.2f} {ratio:6.3f} {'' if target is None else f'>={target}':>7}  {verdict}")
    stall = statistics.median(stalls) * 1e3
    verdict = "PASS" if stall <= STALL_TARGET_MS else "FAIL"
    print(f"image step stall over the median step: {stall:.1f} ms (target <= {STALL_TARGET_MS:.0f}): {verdict}")


if __name__ == "__main__":
    main()
