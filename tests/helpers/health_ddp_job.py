"""A real 2-process DDP run (CPU, gloo) of the demo GPT with QK-clip and alarms; driven by test_qk_clip.py.

    python tests/helpers/health_ddp_job.py OUTPUT_DIR

Each rank trains on its own half of the data, so the ranks' own per-head maxima differ. Each rank
writes the alarms it acted on (``firings_rank<r>.json``) and its weights after training
(``weights_rank<r>.pt``): they must be the same on both ranks.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: run as a script

from attnmonitor import AttentionMonitor  # noqa: E402
from attnmonitor.demo import TinyGPT  # noqa: E402
from tests.helpers.trainer import make_trainer  # noqa: E402

TAU = 3.0
STEPS = 8


class Recorder(L.Callback):
    """The firings this rank acted on, and its weights at the end."""

    def __init__(self, output: Path) -> None:
        self.output, self.firings = output, []

    def record(self, firings) -> None:
        self.firings += [[f.step, f.rule, f.layer, f.head, f.value] for f in firings]

    def on_train_end(self, trainer, pl_module) -> None:
        rank = trainer.global_rank
        (self.output / f"firings_rank{rank}.json").write_text(json.dumps(self.firings))
        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, self.output / f"weights_rank{rank}.pt")


def main(output: str) -> None:
    torch.manual_seed(0)
    model = TinyGPT(vocab_size=50, seq_len=16, dim=32, layers=2, heads=4, lr=0.05)
    ids = torch.randint(50, (64, 17), generator=torch.Generator().manual_seed(0))
    recorder = Recorder(Path(output))
    growth = {"span": 4, "factor": 1.0, "sustain": 1, "heads_fraction": 0.0, "floor": 0.0}  # any head not shrinking
    actions = {"warning": recorder.record, "critical": recorder.record}
    monitor = AttentionMonitor(
        qk_clip={"tau": TAU},
        alarms={"entropy_collapse": None, "sink_jump": None, "logit_growth": growth, "actions": actions, "every_n_steps": 1},
        schedule={"every_n_steps": 4},
        dashboards={"heatmaps": None, "analyses": False},
    )
    trainer = make_trainer(output, [monitor, recorder], accelerator="cpu", devices=2, strategy="ddp", max_steps=STEPS)
    trainer.fit(model, DataLoader(TensorDataset(ids[:, :-1], ids[:, 1:]), batch_size=8))


if __name__ == "__main__":
    main(sys.argv[1])
