"""Training throughput of the demo GPT with and without the attention monitor, measured side by side.

    python benchmarks/throughput.py [--steps 150] [--rounds 5] [--shape demo|attention|balanced|mlp] [--only ...]

Eager: no monitor, the monitor at its defaults (a capture every 50 steps), capturing every step, the
defaults with light alarm captures every 10 steps and every step, and with QK-clip (``max_logit``
captured every step). Compiled (``Module.compile()``, inductor): no monitor, defaults, every step. Short runs alternate within each round so
that machine noise (which drifts by ±10 % over seconds on a shared machine) hits every configuration
alike; each run's mean step rate counts (captured steps included) and the median run per
configuration is compared. Separately, the stall of a step that draws images (atlases, heatmaps,
analyses) over the median step of its run. ``--shape`` picks the model: the demo GPT (width 128, 3
layers, 4 heads, 64 tokens, batches of 32), or an attention-heavy (width 64, 256 tokens, 8 heads), a
balanced (width 128, 128 tokens) or an MLP-heavy one (width 512, 32 tokens); the every-step target
(0.90) is for each.
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

IMAGE_EVERY = 100  # the stall runs draw images at optimizer step 100 (index 99)

Make = Callable[[], AttentionMonitor | None]
CONFIGS: dict[str, tuple[bool, Make, float | None]] = {
    "no monitor": (False, lambda: None, None),
    "monitor, defaults": (False, AttentionMonitor, 0.98),
    "monitor, every step": (False, lambda: AttentionMonitor(schedule={"every_n_steps": 1}), 0.90),
    "alarms every 10": (False, lambda: AttentionMonitor(alarms={"every_n_steps": 10}), None),
    "alarms every step": (False, lambda: AttentionMonitor(alarms={"every_n_steps": 1}), 0.97),
    "qk_clip": (False, lambda: AttentionMonitor(qk_clip={"tau": 100.0}), 0.97),
    "compiled, no monitor": (True, lambda: None, None),
    "compiled, defaults": (True, AttentionMonitor, 0.97),
    "compiled, every step": (True, lambda: AttentionMonitor(schedule={"every_n_steps": 1}), 0.90),
}
BASELINES = {False: "no monitor", True: "compiled, no monitor"}
SHAPES = {  # TinyGPT width, layers, heads; tokens per sequence, sequences per batch
    "demo": (128, 3, 4, 64, 32),
    "attention": (64, 2, 8, 256, 8),
    "balanced": (128, 3, 4, 128, 16),
    "mlp": (512, 3, 4, 32, 32),
}
STALL_TARGET_MS = 50.0


def durations(steps: int, compiled: bool, make_monitor: Make, data: CorpusDataModule, shape: str = "demo") -> list[float]:
    L.seed_everything(0, verbose=False)
    dim, layers, heads, _, _ = SHAPES[shape]
    model = TinyGPT(vocab_size=len(data.vocab), seq_len=data.seq_len, dim=dim, layers=layers, heads=heads)
    if compiled:
        model.compile()
    monitor = make_monitor()
    return step_durations(model, data, steps, [monitor] if monitor else [])


def image_stall(data: CorpusDataModule) -> float:
    """Seconds the step that draws images takes beyond the median step of its run."""

    def monitor() -> AttentionMonitor:
        return AttentionMonitor(schedule={"atlas_every_n_steps": IMAGE_EVERY}, dashboards={"heatmaps": {"every_n_steps": IMAGE_EVERY}})

    times = durations(IMAGE_EVERY + 20, False, monitor, data)
    return times[IMAGE_EVERY - 1] - statistics.median(times[WARMUP_STEPS:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=None, help="configurations to run (their baselines are added)")
    parser.add_argument("--shape", choices=list(SHAPES), default="demo")
    args = parser.parse_args()
    data = CorpusDataModule(seq_len=SHAPES[args.shape][3], batch_size=SHAPES[args.shape][4])
    chosen = [name for name in CONFIGS if args.only is None or name in args.only]
    needed = {*chosen, *(BASELINES[CONFIGS[name][0]] for name in chosen)}
    configs = {name: config for name, config in CONFIGS.items() if name in needed}
    rates: dict[str, list[float]] = {name: [] for name in configs}
    stalls: list[float] = []
    for _ in range(args.rounds):
        for name, (compiled, make, _) in configs.items():
            timed = durations(args.steps, compiled, make, data, args.shape)[WARMUP_STEPS:]
            rates[name].append(len(timed) / sum(timed))
        if args.shape == "demo":
            stalls.append(image_stall(data))
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {args.steps} steps x {args.rounds} rounds, shape {args.shape}")
    print(f"{'configuration':<22} {'steps/s':>8} {'ratio':>6} {'target':>7}  result")
    for name, (compiled, _, target) in configs.items():
        rate = statistics.median(rates[name])
        ratio = rate / statistics.median(rates[BASELINES[compiled]])
        verdict = "" if target is None else ("PASS" if ratio >= target else "FAIL")
        print(f"{name:<22} {rate:8.2f} {ratio:6.3f} {'' if target is None else f'>={target}':>7}  {verdict}")
    if not stalls:
        return
    stall = statistics.median(stalls) * 1e3
    verdict = "PASS" if stall <= STALL_TARGET_MS else "FAIL"
    print(f"image step stall over the median step: {stall:.1f} ms (target <= {STALL_TARGET_MS:.0f}): {verdict}")


if __name__ == "__main__":
    main()
