"""Simulated context parallelism (CPU, gloo): each process holds some positions of every sequence of a
two-block model; driven by test_context_parallel.py.

    python tests/helpers/context_parallel_job.py OUTPUT_DIR WORLD LAYOUT MODE TAU

PyTorch's ``context_parallel`` does not run on CPU, so a :class:`~torch.overrides.TorchFunctionMode`
stands in for it: the model calls ``F.scaled_dot_product_attention`` on its local queries, keys and
values, as under PyTorch's context parallelism, and the mode computes that call exactly over every
process's keys (gathered, in global order, with the causal mask of global positions). ``MODE``:

- ``causal``: causal attention, no padding;
- ``padded``: bidirectional attention with a key-padding mask ``[B, 1, 1, L]`` (right padding);
- ``causal_padded``: causal attention, right padding told by the batch's ``attention_mask`` (queries).

Rank 0 writes the published scalars and the weights after QK-clip.
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
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: run as a script

from attnmonitor.capture.context_parallel import shard_positions  # noqa: E402
from tests.helpers import sharded_job  # noqa: E402

HEADS, HEAD_DIM, SEQ, BATCH = 4, 4, 16, 2
LENGTHS = (SEQ, 11)  # real tokens of each sequence (right padding)


class SelfAttention(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        dim = HEADS * HEAD_DIM
        self.causal = causal
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, dtype=torch.float64) for _ in range(4))

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, HEADS, HEAD_DIM).transpose(1, 2)

        mask = None if key_padding is None else key_padding[:, None, None, :]
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), attn_mask=mask, is_causal=self.causal)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.attn = SelfAttention(causal)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        return x + self.attn(x, key_padding)


class Stack(nn.Module):
    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(causal), Block(causal)])

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, key_padding)
        return x


def build(mode: str) -> Stack:
    """The model every run starts from (query and key weights ×3: logits of a few units)."""
    torch.manual_seed(0)
    model = Stack(causal=mode != "padded")
    with torch.no_grad():
        for block in model.blocks:
            block.attn.q.weight.mul_(3.0)
            block.attn.k.weight.mul_(3.0)
    return model


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """``(x [B, L, C], real tokens [B, L] bool)``."""
    x = torch.randn(BATCH, SEQ, HEADS * HEAD_DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return x, torch.arange(SEQ) < torch.tensor(LENGTHS)[:, None]


class AllGatherContextParallel(TorchFunctionMode):
    """Computes each ``scaled_dot_product_attention`` of local shards over the keys of every process."""

    def __init__(self, positions: list[torch.Tensor]) -> None:
        super().__init__()
        self.positions = positions  # each rank's global positions
        self.order = torch.cat(positions).argsort()  # gathered (rank-major) -> global order

    def _gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in self.positions]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts, dim).index_select(dim, self.order)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask, causal = kwargs.get("attn_mask"), kwargs.get("is_causal", False)
        keys, values = self._gather(k, -2), self._gather(v, -2)
        full = torch.ones(q.shape[0], 1, q.shape[-2], keys.shape[-2], dtype=torch.bool)
        if mask is not None:
            full = full & self._gather(mask, -1)
        if causal:
            mine = self.positions[dist.get_rank()]
            full = full & (torch.arange(keys.shape[-2]) <= mine[:, None])
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=full)


def _run(rank: int, output: Path, world: int, layout: str, mode: str, tau: float, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from attnmonitor import STATISTICS
    from attnmonitor.integrations.loop import AttentionMonitorLoop

    positions = [shard_positions(layout, r, world, SEQ // world) for r in range(world)]
    x, real = global_batch()
    x, real = x[:, positions[rank]], real[:, positions[rank]]
    model = build(mode)
    capture = {"statistics": list(STATISTICS), "context_parallel": layout}
    if world == 4:  # the group as a 1-D DeviceMesh (default: every process)
        from torch.distributed.device_mesh import init_device_mesh

        capture["context_parallel_group"] = init_device_mesh("cpu", (world,))
    options = dict(
        capture=capture,
        schedule={"every_n_steps": 1, "val_batches": 0},
        dashboards={"per_head": True, "heatmaps": None, "analyses": False},
        qk_clip={"tau": tau},
        batch={"query_mask_key": "attention_mask"},
    )
    batch = {"input_ids": torch.zeros_like(real, dtype=torch.long), "attention_mask": real} if mode == "causal_padded" else None
    with AttentionMonitorLoop(model, **options) as monitor:
        with monitor.step(0, batch), AllGatherContextParallel(positions), torch.no_grad():
            model(x, real if mode == "padded" else None)
        scalars = monitor.log()
    if rank == 0:
        weights = {name: p.detach() for name, p in model.named_parameters()}
        torch.save({"scalars": scalars, "weights": weights}, output / "result.pt")
    sharded_job.finish()


if __name__ == "__main__":
    out, world, layout, mode, tau = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
    mp.spawn(_run, args=(out, world, layout, mode, tau, 29500 + os.getpid() % 1000), nprocs=world)
