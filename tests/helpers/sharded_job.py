"""Real multi-process runs (CPU, gloo) of one attention block with the monitor and QK-clip, sharded by a
layout; driven by test_sharded.py.

    python tests/helpers/sharded_job.py OUTPUT_DIR LAYOUT HEADS TAU

- ``fsdp`` (2 processes): ``fully_shard`` swaps the classes for ``FSDP<Class>`` and shards every
  parameter by rows (``Shard(0)``); with 3 heads of 4 rows, head 1's rows straddle the two shards.
  Each process runs its half of the global batch.
- ``tp`` (2 processes): ``ColwiseParallel`` query/key/value, ``RowwiseParallel`` output: each process
  computes half of the heads, on the whole global batch.
- ``fsdp_tp`` (4 processes, mesh dp=2 × tp=2): tensor parallel inside, FSDP2 over the data dim
  (strided shards); each data-parallel pair runs its half of the batch.
- ``manual_tp`` (2 processes): tensor parallelism without DTensor (Megatron-style): each process's
  query/key/value projections are plain ``nn.Linear`` holding half of the heads (rows sliced from
  the full block), told to the monitor by ``capture.head_shard``; the whole global batch on each.
  No QK-clip (refused with ``head_shard``).
- ``pipeline`` (2 processes): a stack of two blocks split in two stages, as pipeline schedules split
  a model (each stage keeps the full model's module names and drops the other stage's layers);
  stage 0 sends its activations to stage 1 (the whole global batch).

Rank 0 writes the published scalars and the full weights after QK-clip (under ``pipeline``, each
stage writes its own block's).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: run as a script

HEAD_DIM, SEQ, BATCH = 4, 6, 4
WORLD = {"fsdp": 2, "tp": 2, "fsdp_tp": 4, "manual_tp": 2, "pipeline": 2}


class SelfAttention(nn.Module):
    """Causal multi-head self-attention through SDPA, heads derived from the projection width."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        dim = heads * HEAD_DIM
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, dtype=torch.float64) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, -1, HEAD_DIM).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, heads: int) -> None:
        super().__init__()
        self.attn = SelfAttention(heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x)


def build(heads: int, seed: int = 0) -> Block:
    """The block every run starts from (query and key weights ×3: logits of a few units)."""
    torch.manual_seed(seed)
    block = Block(heads)
    with torch.no_grad():
        block.attn.q.weight.mul_(3.0)
        block.attn.k.weight.mul_(3.0)
    return block


class Stack(nn.Module):
    def __init__(self, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([build(heads), build(heads, seed=1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def global_batch(heads: int) -> torch.Tensor:
    return torch.randn(BATCH, SEQ, heads * HEAD_DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _shard(block: Block, layout: str, rank: int) -> tuple[int, int]:
    """Shard ``block`` as ``layout`` says; returns ``(data-parallel rank, data-parallel size)``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {"q": ColwiseParallel(), "k": ColwiseParallel(), "v": ColwiseParallel(), "o": RowwiseParallel()}
    if layout == "fsdp":
        fully_shard(block.attn)
        fully_shard(block)
        return rank, WORLD[layout]
    if layout == "tp":
        parallelize_module(block.attn, init_device_mesh("cpu", (2,)), plan)
        return 0, 1
    if layout == "manual_tp":  # this process's half of the heads: rows of q, k, v; columns of o
        rows = slice(rank * block.attn.q.out_features // 2, (rank + 1) * block.attn.q.out_features // 2)
        for name in "qkv":
            full = getattr(block.attn, name)
            part = nn.Linear(full.in_features, rows.stop - rows.start, dtype=torch.float64)
            part.weight.data, part.bias.data = full.weight.data[rows].clone(), full.bias.data[rows].clone()
            setattr(block.attn, name, part)
        o = nn.Linear(rows.stop - rows.start, block.attn.o.out_features, dtype=torch.float64)
        o.weight.data = block.attn.o.weight.data[:, rows].clone()
        block.attn.o = o
        return 0, 1
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    parallelize_module(block.attn, mesh["tp"], plan)
    fully_shard(block.attn, mesh=mesh["dp"])
    fully_shard(block, mesh=mesh["dp"])
    return mesh["dp"].get_local_rank(), 2


def _run(rank: int, output: Path, layout: str, heads: int, tau: float, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD[layout])
    from attnmonitor.integrations.loop import AttentionMonitorLoop

    options = dict(
        capture={"statistics": ["entropy", "max_logit"]},
        schedule={"every_n_steps": 1, "val_batches": 0},
        dashboards={"per_head": True, "heatmaps": None, "analyses": False},
        qk_clip={"tau": tau},
    )
    if layout == "pipeline":
        model = Stack(heads)
        model.blocks[1 - rank] = nn.Identity()  # this stage's layers only, under the full model's names
        x = global_batch(heads)
        with AttentionMonitorLoop(model, **options) as monitor:
            with monitor.step(0, None), torch.no_grad():
                if rank == 0:
                    dist.send(model.blocks[0](x), dst=1)
                else:
                    dist.recv(x, src=0)
                    model.blocks[1](x)
            scalars = monitor.log()
        weights = {f"blocks.{rank}.{name}": p.detach() for name, p in model.blocks[rank].named_parameters()}
        torch.save({"scalars": scalars, "weights": weights, "class": "SelfAttention"}, output / f"result_rank{rank}.pt")
        finish()
        return
    block = build(heads)
    dp_rank, dp_size = _shard(block, layout, rank)
    if layout == "manual_tp":
        options.update(capture={**options["capture"], "head_shard": [rank, 2]}, qk_clip=None)
    x = global_batch(heads)[dp_rank * BATCH // dp_size : (dp_rank + 1) * BATCH // dp_size]
    with AttentionMonitorLoop(block, **options) as monitor:
        with monitor.step(0, None):
            block(x).sum().backward()
        scalars = monitor.log()
    # collective on every rank (manual_tp: this process's slices, not compared)
    weights = {name: p.full_tensor() if hasattr(p, "full_tensor") else p.detach() for name, p in block.named_parameters()}
    if rank == 0:
        torch.save({"scalars": scalars, "weights": weights, "class": type(block.attn).__name__}, output / "result.pt")
    finish()


def finish() -> None:
    """Leave together and exit at once: under load, tearing the gloo group down (or the interpreter's
    own shutdown) aborted a process with 'terminate called without an active exception' after its work
    was done; the results are written before this, and exit code 0 tells ``mp.spawn`` all went well."""
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    out, layout, heads, tau = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    mp.spawn(_run, args=(out, layout, heads, tau, 29500 + os.getpid() % 1000), nprocs=WORLD[layout])
