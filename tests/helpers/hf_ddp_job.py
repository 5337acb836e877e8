"""A real 2-process Hugging Face Trainer run (CPU, gloo) with the monitor; driven by test_integration_transformers.py.

    python -m torch.distributed.run --nproc_per_node=2 tests/helpers/hf_ddp_job.py OUTPUT_DIR

One optimizer step and one evaluation of tiny GPT-2: each process records the batches it ran
(``OUTPUT_DIR/rank<r>.pt``) so that the test can compute the single-process reference over the
global batch; only the main process writes TensorBoard events (under ``OUTPUT_DIR/runs``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: run as a script, `tests` is not importable

from attnmonitor.integrations.transformers import AttentionMonitorCallback, AttentionMonitorTrainer  # noqa: E402
from tests.helpers.hf_trainer import STATISTICS, Recorder, arguments, build, samples  # noqa: E402

BATCH = 3
"""Samples per process and step."""


def main(output: str) -> None:
    """Train one step and evaluate once on 2 processes; each saves what it ran to ``output/rank<r>.pt``."""
    monitor = AttentionMonitorCallback(
        capture={"statistics": STATISTICS},
        schedule={"every_n_steps": 1, "val_batches": 1, "atlas_every_n_steps": 100},
        dashboards={"per_head": True, "heatmaps": None, "analyses": False},
    )
    recorder = Recorder()
    args = arguments(
        output,
        max_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        learning_rate=1e-2,
        ddp_backend="gloo",
        ddp_find_unused_parameters=False,
    )
    data = samples("gpt2", 24)
    trainer = AttentionMonitorTrainer(
        model=build("gpt2"), args=args, train_dataset=data, eval_dataset=data[:12], callbacks=[monitor, recorder]
    )
    trainer.train()
    record = {
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "train": recorder.batches[1],
        "eval": recorder.eval_batches[1],
        "eval_weights": recorder.eval_weights[1],
    }
    torch.save(record, Path(output) / f"rank{args.process_index}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
