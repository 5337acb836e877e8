"""Simulated context parallelism over real gloo processes (2 and 4 key shards, contiguous and head-tail
layouts, causal and padded): every per-head statistic and every QK-clipped weight equals one process
over the whole sequence, computed in float64 by naive code, with discovery by behaviour."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnmonitor.functional import OFFSET_WEIGHTS
from tests.helpers import context_parallel_job as job
from tests.helpers.reference import NAMES, attention_probs, head_max_logit, head_means


def _reference(mode: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """``{layer: {statistic: [H]}}`` of the two blocks over the whole sequence, and the initial weights."""
    model = job.build(mode)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, real = job.global_batch()
    b, t, _ = x.shape
    key_valid = torch.ones(b, 1, t, t, dtype=torch.bool)
    if mode != "padded":
        key_valid = key_valid & torch.ones(t, t, dtype=torch.bool).tril()
    else:
        key_valid = key_valid & real[:, None, None, :]
    query_valid = None if mode == "causal" else real[:, None, :]
    expected = {}
    for i in range(2):
        w = {name: weights[f"blocks.{i}.attn.{name}.weight"] for name in "qkvo"}
        bias = {name: weights[f"blocks.{i}.attn.{name}.bias"] for name in "qkvo"}
        q, k, v = ((x @ w[n].T + bias[n]).view(b, t, job.HEADS, -1).transpose(1, 2) for n in "qkv")
        probs = attention_probs(q, k, key_valid)
        stats = head_means(probs, key_valid, query_valid)
        stats["max_logit"] = head_max_logit(q, k, key_valid, query_valid)
        expected[f"blocks.{i}.attn"] = stats
        x = x + (probs @ v).transpose(1, 2).reshape(b, t, -1) @ w["o"].T + bias["o"]
    return expected, weights


@pytest.mark.slow
@pytest.mark.parametrize(
    ("world", "layout", "mode"),
    [
        (2, "contiguous", "causal"),
        (4, "head_tail", "causal"),
        (2, "head_tail", "padded"),
        (4, "contiguous", "padded"),
        (4, "head_tail", "causal_padded"),
    ],
)
def test_context_parallel_statistics_and_qk_clip_equal_one_process(tmp_path, world, layout, mode):
    expected, weights = _reference(mode)
    tau = float(torch.cat([stats["max_logit"] for stats in expected.values()]).median())  # some heads clipped
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_", "RANK"))}
    command = [sys.executable, str(Path(job.__file__)), str(tmp_path), str(world), layout, mode, repr(tau)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-4000:]
    result = torch.load(tmp_path / "result.pt")
    scalars, clipped = result["scalars"], 0
    for layer, stats in expected.items():
        for name in (*NAMES, "max_logit"):
            if name in OFFSET_WEIGHTS and not stats[name].any():  # 0 in every head (causal: the next token)
                assert f"attn_train_layers/{name}/{layer}" not in scalars  # masked by construction: not logged
                continue
            for h in range(job.HEADS):
                actual = scalars[f"attn_train_heads/{name}/{layer}/head_{h}"]
                assert actual == pytest.approx(float(stats[name][h]), rel=1e-5, abs=1e-6), (layer, name, h)
        over = stats["max_logit"] > tau
        clipped += int(over.sum())
        factor = torch.where(over, (tau / stats["max_logit"]).sqrt(), 1.0).repeat_interleave(job.HEAD_DIM)
        for name in ("q.weight", "q.bias", "k.weight", "k.bias"):
            key = f"{layer}.{name}"
            weights[key] = weights[key] * (factor.view(-1, 1) if name.endswith("weight") else factor)
    assert 0 < clipped < 2 * job.HEADS and scalars["attn_reg/qk_clipped_heads"] == clipped
    for name, value in weights.items():
        torch.testing.assert_close(result["weights"][name], value, rtol=1e-6, atol=1e-12, msg=name)
    assert math.isfinite(scalars["attn_train/entropy"])
