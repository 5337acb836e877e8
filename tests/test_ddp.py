"""Real DDP processes (CPU, gloo): synced statistics equal one process over the same global data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from attnmonitor import AttentionCapture
from tests.ddp_job import SKIP_BELOW, build_model, samples

JOB = Path(__file__).with_name("ddp_job.py")


@pytest.mark.slow
def test_ddp_statistics_equal_a_single_process_over_the_global_batch(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_"))}
    result = subprocess.run([sys.executable, str(JOB), str(tmp_path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    events_files = list(tmp_path.rglob("events.out.tfevents.*"))
    assert len(events_files) == 1, events_files  # only global rank zero writes
    events = EventAccumulator(str(events_files[0].parent), size_guidance={"scalars": 0, "images": 0})
    events.Reload()

    # the validation probe: rank 0 took samples 0 and 2, rank 1 samples 1 and 3 (no shuffling in validation)
    data = samples()
    rank_batches = [[data[0], data[2]], [data[1], data[3]]]
    model = build_model().eval()
    sums, counts = {}, {}
    for batch in rank_batches:
        ids = torch.stack([s["input_ids"] for s in batch])
        mask = torch.stack([s["attention_mask"] for s in batch])
        assert (int(mask.sum()) < SKIP_BELOW) == (batch is rank_batches[1])  # rank 1 skips layer 1
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
            logged = [e.value for e in events.Scalars(f"attn/val/{name}/net.{layer}")]
            assert logged[-1] == pytest.approx(expected, rel=1e-5, abs=1e-6), (layer, name)
    assert sorted({e.step for e in events.Scalars("attn/train/entropy")}) == [0, 2]
    assert [e.step for e in events.Images("attn/train/heatmap/net.layers.0")] == [0, 2]
    assert "attn/val/atlas/entropy" in events.Tags()["images"]
