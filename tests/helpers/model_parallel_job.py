"""Lightning's ``ModelParallelStrategy`` (FSDP2 × tensor parallel, CPU, gloo) with the monitor and QK-clip;
driven by test_sharded.py.

    python tests/helpers/model_parallel_job.py OUTPUT_DIR DATA_PARALLEL TENSOR_PARALLEL TAU

Lightning's launcher re-runs this script for the other ranks. One optimizer step (learning rate 0: the
weights change by QK-clip only) over the global batch of ``sharded_job``; rank 0 writes the full
weights after it (``weights.pt``), the scalars go to a CSV logger.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: run as a script

from attnmonitor import AttentionMonitor  # noqa: E402
from tests.helpers import sharded_job  # noqa: E402

HEADS = 4


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.block = sharded_job.build(HEADS)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = self.device_mesh
        plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "o": RowwiseParallel()}
        parallelize_module(self.block.attn, mesh["tensor_parallel"], plan)
        if mesh["data_parallel"].size() > 1:
            fully_shard(self.block.attn, mesh=mesh["data_parallel"])
            fully_shard(self.block, mesh=mesh["data_parallel"])

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        return self.block(batch).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def on_train_end(self) -> None:
        weights = {name: p.full_tensor() for name, p in self.block.named_parameters()}  # collective: every rank
        if self.trainer.is_global_zero:
            torch.save(weights, Path(self.trainer.default_root_dir) / "weights.pt")


if __name__ == "__main__":
    from lightning.pytorch.strategies import ModelParallelStrategy

    out, dp, tp, tau = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    monitor = AttentionMonitor(
        capture={"statistics": ["entropy", "max_logit"]},
        schedule={"every_n_steps": 1, "val_batches": 0},
        dashboards={"per_head": True, "heatmaps": None, "analyses": False},
        qk_clip={"tau": tau},
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=dp * tp, strategy=ModelParallelStrategy(dp, tp, process_group_backend="gloo"), max_steps=1,
        callbacks=[monitor], logger=L.pytorch.loggers.CSVLogger(out, name="csv", version=0), default_root_dir=out,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, log_every_n_steps=1,
    )  # fmt: skip
    data = list(sharded_job.global_batch(HEADS))
    trainer.fit(Module(), DataLoader(data, batch_size=len(data) // dp))
    if torch.distributed.is_initialized():  # stop gloo's threads before exit: without it a process can abort at teardown
        torch.distributed.destroy_process_group()
