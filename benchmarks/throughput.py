"""Training throughput of the demo GPT with and without the attention monitor, measured side by side.

    python benchmarks/throughput.py [--steps 520] [--rounds 2]

Runs alternate (none, default, every step, none, ...) so that machine noise hits every configuration
alike; each run times its optimizer steps after a warm-up and the median per configuration is compared.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from attnmonitor import AttentionMonitor
from attnmonitor.demo import CorpusDataModule, TinyGPT

WARMUP_STEPS = 20


class StepTimer(L.Callback):
    """Wall time from the start of step ``WARMUP_STEPS`` to the end of training."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # type: ignore[no-untyped-def]
        if trainer.global_step == WARMUP_STEPS and not hasattr(self, "start"):
            self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        self.seconds = time.perf_counter() - self.start


def steps_per_second(steps: int, make_monitor: Callable[[], AttentionMonitor | None], data: CorpusDataModule) -> float:
    L.seed_everything(0, verbose=False)
    model = TinyGPT(vocab_size=len(data.vocab), seq_len=data.seq_len)
    timer = StepTimer()
    monitor = make_monitor()
    with tempfile.TemporaryDirectory() as logs:
        trainer = L.Trainer(
            max_steps=steps,
            limit_val_batches=0,
            logger=TensorBoardLogger(logs),
            callbacks=[timer] + ([monitor] if monitor else []),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, datamodule=data)
    return (steps - WARMUP_STEPS) / timer.seconds


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
