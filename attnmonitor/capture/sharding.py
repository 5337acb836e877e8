"""Which global heads a process holds of an attention module whose query projection is sharded by rows
(DTensor tensor parallelism: ``ColwiseParallel``, alone or under FSDP2).

Each process then computes its own heads only (same data as its tensor-parallel peers). Their sums
and counts go to the columns of their global head index, zeros elsewhere, so the one sum/max reduction
over every process gives each head its statistics exactly: a head is held by one process of each
tensor-parallel group, and the data-parallel replicas add their own data.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

QUERY_PROJECTIONS = ("q_proj", "query", "q_lin", "query_proj", "q")
"""Attribute names of separate query projections (see :data:`attnmonitor.interventions.qk_clip.SEPARATE`)."""


def head_placement(module: nn.Module, local_heads: int) -> tuple[int, int] | None:
    """``(first global head, global heads)`` of the ``local_heads`` a process computes in ``module``, or
    None when its query projection is not sharded by rows (every head is here)."""
    projection = next((getattr(module, n) for n in QUERY_PROJECTIONS if isinstance(getattr(module, n, None), nn.Linear)), None)
    weight = getattr(projection, "weight", None)
    if not isinstance(weight, DTensor) or local_heads < 1:
        return None
    local_shape, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    rows, global_rows = local_shape[0], weight.shape[0]
    if rows == global_rows or rows % local_heads:
        return None
    head_dim = rows // local_heads
    return offset[0] // head_dim, global_rows // head_dim
