"""Cost of the monitor's cross-process reduction by world size: collectives and bytes per capture, and
time, measured on real gloo processes (CPU) side by side with the same steps uncaptured.

    python benchmarks/scaling.py [--worlds 2 4 8] [--layers 12] [--heads 16] [--steps 20]

Each process runs a stack of ``layers`` attention blocks (``heads`` heads, its own data, as under DDP
or FSDP) through :class:`~attnmonitor.integrations.loop.AttentionMonitorLoop` capturing every other
step, with QK-clip on (its light capture of ``max_logit`` on the other steps), then off.
``torch.distributed`` collectives are counted (calls and payload bytes each process contributes) per
kind of step, and the time of ``monitor.log()`` (reduction, QK-clip, publication) is compared with the
step's.
On 2 cores, 8 processes share the cores: times grow with the oversubscription, counts and bytes do not.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

COUNTED = ("all_reduce", "all_gather", "all_gather_object", "broadcast", "reduce_scatter", "barrier")


class SelfAttention(nn.Module):
    def __init__(self, heads: int, head_dim: int = 16) -> None:
        super().__init__()
        dim = heads * head_dim
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.o(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c))


class Stack(nn.Module):
    def __init__(self, layers: int, heads: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(SelfAttention(heads) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


class Counting:
    """Counts calls and payload bytes of ``torch.distributed`` collectives while ``active``."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.active = False
        for name in COUNTED:
            setattr(dist, name, self._wrap(name, getattr(dist, name)))

    def _wrap(self, name, original):
        def counted(*args, **kwargs):
            if self.active:
                self.calls[name] += 1
                self.bytes[name] += _payload(name, args)
            return original(*args, **kwargs)

        return counted


def _payload(name: str, args: tuple) -> int:
    """Bytes this process contributes to one call."""
    if name == "all_gather_object":
        return len(pickle.dumps(args[1]))
    tensor = args[1] if name == "all_gather" else args[0] if args else None
    return tensor.numel() * tensor.element_size() if isinstance(tensor, torch.Tensor) else 0


def _measure(model: nn.Module, x: torch.Tensor, counting: Counting, steps: int, qk_clip: bool) -> dict:
    """Median step and ``log()`` times, and the collectives of the last step of each kind: full captures
    (odd steps) and the others (QK-clip's light capture of ``max_logit`` when on, else nothing)."""
    from attnmonitor.integrations.loop import AttentionMonitorLoop

    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    times: dict[bool, list[float]] = {True: [], False: []}
    log_times: dict[bool, list[float]] = {True: [], False: []}
    collectives: dict[bool, Counter] = {}
    with AttentionMonitorLoop(
        model,
        capture={"statistics": ["entropy", "normalized_entropy", "max_weight", "sink_mass", "max_logit"]},
        schedule={"every_n_steps": 2, "val_batches": 0, "atlas_every_n_steps": 10**6},
        dashboards={"per_head": True, "heatmaps": None, "analyses": False},
        qk_clip={"tau": 1e6} if qk_clip else None,
    ) as monitor:
        for step in range(steps + 2):
            captured = step % 2 == 1  # due(step, 2): steps 1, 3, ...
            dist.barrier()
            counting.calls.clear(), counting.bytes.clear()
            counting.active = True
            start = time.perf_counter()
            with monitor.step(step, None):
                model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            logged = time.perf_counter()
            monitor.log()
            end = time.perf_counter()
            counting.active = False
            if step >= 2:  # the first capture also gathers the layer names
                times[captured].append(end - start)
                log_times[captured].append(end - logged)
                collectives[captured] = Counter({f"{k} calls": v for k, v in counting.calls.items()})
                collectives[captured] += Counter({f"{k} bytes": v for k, v in counting.bytes.items()})
    return {
        "collectives": collectives,
        "step": {kind: statistics.median(t) for kind, t in times.items()},
        "log": {kind: statistics.median(t) for kind, t in log_times.items()},
    }


def _run(rank: int, world: int, layers: int, heads: int, steps: int, port: int, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counting = Counting()
    torch.manual_seed(0)
    model = Stack(layers, heads)
    x = torch.randn(4, 64, heads * 16, generator=torch.Generator().manual_seed(rank))
    result = {qk_clip: _measure(model, x, counting, steps, qk_clip) for qk_clip in (True, False)}
    if rank == 0:
        torch.save(result, out / f"world{world}.pt")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"attnmonitor_scaling_{os.getpid()}"
    out.mkdir(parents=True, exist_ok=True)
    grid = args.layers * args.heads
    print(f"{args.layers} layers x {args.heads} heads, 4 averaged statistics + max_logit; per process:")
    print("| processes | step kind | collectives | bytes sent per process | log() ms | step ms |")
    print("|---|---|---|---|---|---|")
    for world in args.worlds:
        port = 29500 + (os.getpid() + world) % 1000
        mp.spawn(_run, args=(world, args.layers, args.heads, args.steps, port, out), nprocs=world)
        result = torch.load(out / f"world{world}.pt")
        rows = [("full capture", result[True], True), ("QK-clip only", result[True], False), ("no capture", result[False], False)]
        for kind, measured, captured in rows:
            counts = measured["collectives"].get(captured, Counter())
            calls = ", ".join(f"{v} {k.removesuffix(' calls')}" for k, v in sorted(counts.items()) if k.endswith("calls")) or "none"
            sent = sum(v for k, v in counts.items() if k.endswith("bytes"))
            log_ms, step_ms = 1e3 * measured["log"][captured], 1e3 * measured["step"][captured]
            print(f"| {world} | {kind} | {calls} | {sent:,} | {log_ms:.2f} | {step_ms:.1f} |")
    full, light = 4 * 6 * grid + 4, 8 * grid + 4
    print(f"expected bytes: full capture 4 x (4 + 1 + 1) x {grid} + 4 = {full:,}; QK-clip only 4 x 2 x {grid} + 4 = {light:,}")


if __name__ == "__main__":
    main()
