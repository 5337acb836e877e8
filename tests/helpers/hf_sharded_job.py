"""A real 2-process Hugging Face ``Trainer`` run (CPU, gloo) of a tiny Llama sharded by transformers' own
distributed loading (``from_pretrained(distributed_config=...)``: FSDP2 or DTensor tensor parallelism),
with the monitor; driven by test_integration_transformers.py.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/helpers/hf_sharded_job.py MODEL_DIR OUTPUT_DIR LAYOUT

(``accelerate``'s own FSDP, ``TrainingArguments(fsdp=...)``, does not run on CPU: its state enables FSDP
for GPU-like devices only.) One optimizer step at learning rate 0: each process records the batches it
ran (``OUTPUT_DIR/rank<r>.pt``) and rank 0 the published scalars, so that the test can compute the
float64 reference over the global batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: run as a script

from attnmonitor.integrations.transformers import AttentionMonitorCallback, AttentionMonitorTrainer  # noqa: E402
from tests.helpers.hf_trainer import STATISTICS, Recorder, arguments, samples  # noqa: E402

BATCH = 3


class BatchRecorder(Recorder):
    """The micro-batches each step ran (the learning rate is 0: the weights stay the saved ones)."""

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self._step = state.global_step + 1

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        pass


def main(model_dir: str, output: str, layout: str) -> None:
    from transformers.distributed.configuration_utils import DistributedConfig

    config = DistributedConfig(fsdp_size=2) if layout == "fsdp" else DistributedConfig(tp_size=2, tp_plan="auto")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, distributed_config=config, attn_implementation="sdpa")
    monitor = AttentionMonitorCallback(
        capture={"statistics": STATISTICS},
        schedule={"every_n_steps": 1, "val_batches": 0},
        dashboards={"per_head": True, "heatmaps": None, "analyses": False},
    )
    recorder = BatchRecorder()
    args = arguments(output, max_steps=1, per_device_train_batch_size=BATCH, learning_rate=0.0, ddp_backend="gloo", report_to=[])
    trainer = AttentionMonitorTrainer(model=model, args=args, train_dataset=samples("gpt2", 12), callbacks=[monitor, recorder])
    trainer.train()
    projection = model.model.layers[0].self_attn.q_proj.weight
    record = {
        "world_size": dist.get_world_size(),
        "sharded": type(projection).__name__ == "DTensor",
        "placements": str(getattr(projection, "placements", None)),
        "train": recorder.batches[1],
        "logs": [entry for entry in trainer.state.log_history if any(key.startswith("attn_") for key in entry)],
    }
    torch.save(record, Path(output) / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
