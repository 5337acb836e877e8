"""Lightning Fabric's ``ModelParallelStrategy`` (FSDP2 × tensor parallel, CPU, gloo) with the plain-loop
monitor and QK-clip; driven by test_sharded.py.

    python tests/helpers/fabric_job.py OUTPUT_DIR DATA_PARALLEL TENSOR_PARALLEL TAU

Fabric's launcher starts the other processes. One step over the global batch of ``sharded_job`` (each
data-parallel rank its part); rank 0 writes the published scalars and the full weights after QK-clip.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: run as a script

from attnmonitor.integrations.loop import AttentionMonitorLoop  # noqa: E402
from tests.helpers import sharded_job  # noqa: E402

HEADS = 4


def parallelize(block: torch.nn.Module, mesh) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "o": RowwiseParallel()}
    if mesh["tensor_parallel"].size() > 1:
        parallelize_module(block.attn, mesh["tensor_parallel"], plan)
    if mesh["data_parallel"].size() > 1:
        fully_shard(block.attn, mesh=mesh["data_parallel"])
        fully_shard(block, mesh=mesh["data_parallel"])
    return block


if __name__ == "__main__":
    from lightning.fabric.strategies import ModelParallelStrategy

    out, dp, tp, tau = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    strategy = ModelParallelStrategy(parallelize, data_parallel_size=dp, tensor_parallel_size=tp)
    fabric = L.Fabric(accelerator="cpu", devices=dp * tp, strategy=strategy)
    fabric.launch()
    block = fabric.setup_module(sharded_job.build(HEADS))
    dp_rank = fabric.global_rank // tp
    x = sharded_job.global_batch(HEADS)[dp_rank * sharded_job.BATCH // dp : (dp_rank + 1) * sharded_job.BATCH // dp]
    with AttentionMonitorLoop(
        block,
        capture={"statistics": ["entropy", "max_logit"]},
        schedule={"every_n_steps": 1, "val_batches": 0},
        dashboards={"per_head": True, "heatmaps": None, "analyses": False},
        qk_clip={"tau": tau},
    ) as monitor:
        with monitor.step(0, None):
            fabric.backward(block(x).sum())
        scalars = monitor.log()
    inner = block.module if hasattr(block, "module") else block
    weights = {name: p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for name, p in inner.named_parameters()}
    if fabric.global_rank == 0:
        torch.save({"scalars": scalars, "weights": weights, "class": type(inner.attn).__name__}, out / "result.pt")
    fabric.barrier()
