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
    assert sorted({e.step for e in events.Scalars("attn_train/entropy")}) == [1, 3]
    assert [e.step for e in events.Images("attn_train/heatmap/net.layers.0")] == [1, 3]
    assert "attn_val/atlas/entropy" in events.Tags()["images"]
