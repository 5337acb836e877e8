"""Real sharded processes (CPU, gloo): FSDP2, tensor parallel (DTensor), both on a 2-D mesh, a 2-stage
pipeline (plain loop), and Lightning's ``ModelParallelStrategy``. Per-head statistics and QK-clip equal
one process over the global batch, with discovery by behaviour (no ``targets``) through FSDP2's
swapped classes and DTensor parameters."""

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import fabric_job, model_parallel_job, sharded_job

JOB = Path(sharded_job.__file__)
CLASSES = {
    "fsdp": "FSDPSelfAttention",
    "tp": "SelfAttention",
    "fsdp_tp": "FSDPSelfAttention",
    "manual_tp": "SelfAttention",
    "pipeline": "SelfAttention",
}
PREFIXES = {"pipeline": ["blocks.0.", "blocks.1."]}
"""Module-name prefixes of the layers of each layout's model (one block without a prefix otherwise)."""


def _reference(heads: int, prefixes: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Float64, written out, over the global batch: ``{layer: [H]}`` mean row entropy and largest logit of
    each layer (blocks in sequence), and the initial weights."""
    model = sharded_job.Stack(heads) if len(prefixes) > 1 else sharded_job.build(heads)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    x = sharded_job.global_batch(heads)
    b, t, _ = x.shape
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    entropy, max_logit = {}, {}

    def project(prefix, name, y):
        heads_of = (y @ weights[f"{prefix}attn.{name}.weight"].T + weights[f"{prefix}attn.{name}.bias"]).view(b, t, heads, -1)
        return heads_of.transpose(1, 2)  # [B, H, T, D]

    for prefix in prefixes:
        q, k, v = (project(prefix, name, x) for name in "qkv")
        logits = (q @ k.transpose(-2, -1) / math.sqrt(sharded_job.HEAD_DIM)).masked_fill(~causal, float("-inf"))  # [B, H, T, T]
        probs = logits.softmax(-1)
        entropy[f"{prefix}attn"] = -(probs * probs.clamp_min(1e-300).log()).sum(-1).mean((0, 2))
        max_logit[f"{prefix}attn"] = logits.amax((0, 2, 3))
        mixed = (probs @ v).transpose(1, 2).reshape(b, t, -1)
        x = x + mixed @ weights[f"{prefix}attn.o.weight"].T + weights[f"{prefix}attn.o.bias"]  # the block's output
    return entropy, max_logit, weights


def _results(tmp_path: Path, layout: str) -> dict:
    """Rank 0's published scalars and the weights after QK-clip (under ``pipeline``, each stage's own)."""
    if layout != "pipeline":
        return torch.load(tmp_path / "result.pt")
    stages = [torch.load(tmp_path / f"result_rank{rank}.pt") for rank in range(2)]
    return {**stages[0], "weights": {**stages[0]["weights"], **stages[1]["weights"]}}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("layout", "heads"),
    [
        ("fsdp", 4),
        ("fsdp", 3),
        ("tp", 4),
        ("fsdp_tp", 4),
        ("manual_tp", 4),
        ("pipeline", 4),
    ],  # fsdp, 3 heads of 4 rows on 2 shards: head 1 straddles them
)
def test_sharded_statistics_and_qk_clip_equal_one_process(tmp_path, layout, heads):
    entropy, max_logit, weights = _reference(heads, PREFIXES.get(layout, [""]))
    tau = float(torch.cat(list(max_logit.values())).median())  # some heads clipped, some not
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_", "RANK"))}
    command = [sys.executable, str(JOB), str(tmp_path), layout, str(heads), repr(tau)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    result = _results(tmp_path, layout)
    assert result["class"] == CLASSES[layout]  # found by behaviour through FSDP2's class swap, named as unwrapped
    scalars = result["scalars"]
    clipped = 0
    for layer in entropy:  # every layer published by rank 0, its stage's or not
        for h in range(heads):
            assert scalars[f"attn_train_heads/entropy/{layer}/head_{h}"] == pytest.approx(float(entropy[layer][h]), rel=1e-5)
            assert scalars[f"attn_train_heads/max_logit/{layer}/head_{h}"] == pytest.approx(float(max_logit[layer][h]), rel=1e-5)
        prefix, over = layer.removesuffix("attn"), max_logit[layer] > tau
        clipped += int(over.sum())
        factor = torch.where(over, (tau / max_logit[layer]).sqrt(), 1.0).repeat_interleave(sharded_job.HEAD_DIM)  # [rows]
        for name in ("q.weight", "q.bias", "k.weight", "k.bias"):
            key = f"{prefix}attn.{name}"
            weights[key] = weights[key] * (factor.view(-1, 1) if name.endswith("weight") else factor)
    if layout == "manual_tp":  # no QK-clip: the statistics only
        return
    assert 0 < clipped < heads * len(entropy) and scalars["attn_reg/qk_clipped_heads"] == clipped
    for name, expected in weights.items():
        torch.testing.assert_close(result["weights"][name], expected, rtol=1e-6, atol=1e-12, msg=name)


def _assert_clipped_block(actual: dict, initial: dict, max_logit: torch.Tensor, tau: float) -> None:
    """The weights of one block after QK-clip are its initial ones with the rows of heads above ``tau`` scaled."""
    factor = torch.where(max_logit > tau, (tau / max_logit).sqrt(), 1.0).repeat_interleave(sharded_job.HEAD_DIM)  # [rows]
    for name, expected in initial.items():
        if name.startswith(("attn.q.", "attn.k.")):
            expected = expected * (factor.view(-1, 1) if expected.dim() == 2 else factor)
        torch.testing.assert_close(actual[name], expected, rtol=1e-6, atol=1e-12, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(("dp", "tp"), [(1, 2), (2, 2)])
def test_lightning_model_parallel_strategy_equals_one_process(tmp_path, dp, tp):
    entropy, max_logit, weights = _reference(model_parallel_job.HEADS, [""])
    tau = float(max_logit["attn"].median())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_", "RANK"))}
    command = [sys.executable, str(Path(model_parallel_job.__file__)), str(tmp_path), str(dp), str(tp), repr(tau)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    (row,) = list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))
    for h in range(model_parallel_job.HEADS):  # the LightningModule's attribute `block` prefixes the layer
        assert float(row[f"attn_train_heads/entropy/block.attn/head_{h}"]) == pytest.approx(float(entropy["attn"][h]), rel=1e-5)
        assert float(row[f"attn_train_heads/max_logit/block.attn/head_{h}"]) == pytest.approx(float(max_logit["attn"][h]), rel=1e-5)
    _assert_clipped_block(torch.load(tmp_path / "weights.pt"), weights, max_logit["attn"], tau)


@pytest.mark.slow
@pytest.mark.parametrize(("dp", "tp"), [(2, 1), (1, 2)])
def test_fabric_model_parallel_strategy_equals_one_process(tmp_path, dp, tp):
    """Fabric's ``setup_module`` wrapper is not part of the layer names; FSDP2 or TP, statistics and QK-clip exact."""
    entropy, max_logit, weights = _reference(fabric_job.HEADS, [""])
    tau = float(max_logit["attn"].median())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_", "RANK"))}
    command = [sys.executable, str(Path(fabric_job.__file__)), str(tmp_path), str(dp), str(tp), repr(tau)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    result = torch.load(tmp_path / "result.pt")
    assert result["class"] == ("FSDPSelfAttention" if dp > 1 else "SelfAttention")
    for h in range(fabric_job.HEADS):
        assert result["scalars"][f"attn_train_heads/entropy/attn/head_{h}"] == pytest.approx(float(entropy["attn"][h]), rel=1e-5)
        assert result["scalars"][f"attn_train_heads/max_logit/attn/head_{h}"] == pytest.approx(float(max_logit["attn"][h]), rel=1e-5)
    _assert_clipped_block(result["weights"], weights, max_logit["attn"], tau)


def test_qk_clip_is_refused_without_dtensor_head_placement():
    from attnmonitor import MonitorOptions

    with pytest.raises(ValueError, match=r"`qk_clip` with `capture.head_shard` .* is not supported"):
        MonitorOptions(capture={"head_shard": [0, 2]}, qk_clip={"tau": 10})
    with pytest.raises(ValueError, match=r"`capture.head_shard` needs 0 <= index < count, got \[2, 2\]"):
        MonitorOptions(capture={"head_shard": [2, 2]})


def test_processes_disagreeing_on_head_counts_are_warned():
    from attnmonitor.metrics.state import merge_layers

    with pytest.warns(RuntimeWarning, match=r"different head counts for \{'attn': \[4, 6\]\}"):
        merged = merge_layers([{"attn": 4, "mlp_attn": 2}, {"attn": 6, "mlp_attn": 2}], {})
    assert merged == {"attn": 6, "mlp_attn": 2}
