"""Training throughput of the demo GPT with and without the attention monitor, measured side by side.

    python benchmarks/throughput.py [--steps 520] [--rounds 2]

Runs alternate (none, default, every step, none, ...) so that machine noise hits every configuration
alike; each run times its optimizer steps after a warm-up and the median per configuration is compared.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import lightning as L
import torch
from common import seconds_per_step

from attnmonitor import AttentionMonitor
from attnmonitor.demo import CorpusDataModule, TinyGPT


def steps_per_second(steps: int, make_monitor: Callable[[], AttentionMonitor | None], data: CorpusDataModule) -> float:
    L.seed_everything(0, verbose=False)
    model = TinyGPT(vocab_size=len(data.vocab), seq_len=data.seq_len)
    monitor = make_monitor()
    return 1.0 / seconds_per_step(model, data, steps, [monitor] if monitor else [])


CONFIGS: dict[str, tuple[Callable[[], AttentionMonitor | None], float | None]] = {
    "no monitor": (lambda: None, None),
    "monitor, defaults": (AttentionMonitor, 0.97),
    "monitor, every step": (lambda: AttentionMonitor(every_n_steps=1), 0.75),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=520)  # includes the image logging of step 500
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    data = CorpusDataModule()
    rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for _ in range(args.rounds):
        for name, (make, _) in CONFIGS.items():
            rates[name].append(steps_per_second(args.steps, make, data))
    base = statistics.median(rates["no monitor"])
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds")
    print(f"{'configuration':<22} {'steps/s':>8} {'ratio':>6} {'target':>7}  result")
    for name, (_, target) in CONFIGS.items():
        rate = statistics.median(rates[name])
        ratio = rate / base
        verdict = "" if target is None else ("PASS" if ratio >= target else "FAIL")
        print(f"{name:<22} {rate:8.2f} {ratio:6.3f} {'' if target is None else f'>={target}':>7}  {verdict}")


if __name__ == "__main__":
    main()
