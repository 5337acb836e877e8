"""Real DDP processes (CPU, gloo): synced statistics equal one process over the same global data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnmonitor import AttentionCapture
from tests.helpers import ddp_job
from tests.helpers.events import read_events
from tests.helpers.models import layer_inputs, qk64

JOB = Path(ddp_job.__file__)  # run as a script: python tests/helpers/ddp_job.py OUTPUT_DIR


@pytest.mark.slow
def test_ddp_statistics_equal_a_single_process_over_the_global_batch(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    result = subprocess.run([sys.executable, str(JOB), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    events_files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert len(events_files) == 1, events_files  # only global rank zero writes
    events = read_events(events_files[0].parent)

    # the validation example: rank 0 took samples 0 and 2, rank 1 samples 1 and 3 (no shuffling in validation)
    data = ddp_job.samples()
    rank_batches = [[data[0], data[2]], [data[1], data[3]]]
    model = ddp_job.build_model().eval()
    sums, counts = {}, {}
    for batch in rank_batches:
        ids = torch.stack([s["input_ids"] for s in batch])
        mask = torch.stack([s["attention_mask"] for s in batch])
        assert (int(mask.sum()) < ddp_job.SKIP_BELOW) == (batch is rank_batches[1])  # rank 1 skips layer 1
        with AttentionCapture(model) as cap, torch.no_grad():
            model(ids, attention_mask=mask)
        for layer, layer_sums in cap.accumulator.sums.items():
            for name, value in layer_sums.items():
                sums.setdefault(layer, {}).setdefault(name, 0)
                sums[layer][name] = sums[layer][name] + value
            counts[layer] = counts.get(layer, 0) + cap.accumulator.counts[layer]
    assert set(sums) == {"layers.0", "layers.1"}
    for layer in sums:
        for name, total in sums[layer].items():
            expected = float((total / counts[layer]).mean())
            logged = [e.value for e in events.Scalars(f"attn_val_layers/{name}/net.{layer}")]
            assert logged[-1] == pytest.approx(expected, rel=1e-5, abs=1e-6), (layer, name)
    _assert_max_logit_is_the_maximum_over_both_ranks(events, model, rank_batches)
    assert sorted({e.step for e in events.Scalars("attn_train/entropy")}) == [1, 3]
    assert [e.step for e in events.Images("attn_train_heatmap/net.layers.0/head_0")] == [1, 3]
    assert "attn_val/atlas/entropy" in events.Tags()["images"]


def _assert_max_logit_is_the_maximum_over_both_ranks(events, model, rank_batches) -> None:
    """``max_logit`` (reduced with max, not summed): per head, the largest float64 logit over the valid
    rows and keys of the GLOBAL validation batch, recomputed here from the weights; the two ranks' maxima
    differ, so a sum, a mean or rank zero's own value would not match."""
    per_rank = []  # [{layer: [H] float64}] of each rank's batch
    for batch in rank_batches:
        ids = torch.stack([s["input_ids"] for s in batch])
        mask = torch.stack([s["attention_mask"] for s in batch]).bool()
        ran = [i for i in range(2) if i == 0 or int(mask.sum()) >= ddp_job.SKIP_BELOW]
        inputs = layer_inputs(model, [model.layers[i] for i in ran], ids, attention_mask=mask.long())
        maxima = {}
        for index, x in zip(ran, inputs, strict=True):
            q, k = qk64(model.layers[index], x)
            logits = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).detach()  # [B, H, L, L]
            valid = mask[:, None, :, None] & mask[:, None, None, :]  # real query rows, real keys
            maxima[f"layers.{index}"] = logits.masked_fill(~valid, float("-inf")).amax(dim=(0, 2, 3))
        per_rank.append(maxima)
    rank0, rank1 = per_rank[0]["layers.0"], per_rank[1]["layers.0"]
    assert bool((rank0 > rank1).any()) and bool((rank1 > rank0).any()), (rank0, rank1)  # each rank holds some maxima
    for layer in ("layers.0", "layers.1"):
        expected = torch.stack([m[layer] for m in per_rank if layer in m]).amax(0)
        for head, value in enumerate(expected.tolist()):
            logged = [e.value for e in events.Scalars(f"attn_val_heads/max_logit/net.{layer}/head_{head}")]
            assert logged[-1] == pytest.approx(value, rel=1e-5, abs=1e-5), (layer, head)
        logged = [e.value for e in events.Scalars(f"attn_val_layers/max_logit/net.{layer}")]
        assert logged[-1] == pytest.approx(float(expected.max()), rel=1e-5, abs=1e-5), layer
    overall = max(float(m[layer].max()) for m in per_rank for layer in m)
    assert [e.value for e in events.Scalars("attn_val/max_logit")][-1] == pytest.approx(overall, rel=1e-5, abs=1e-5)
    assert "attn_val/atlas/max_logit" in events.Tags()["images"]
