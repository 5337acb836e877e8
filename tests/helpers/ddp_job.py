"""A real 2-process DDP run (CPU, gloo) of a small SDPA model with the monitor; driven by test_ddp.py.

    python tests/helpers/ddp_job.py OUTPUT_DIR

Lightning's DDP launcher re-runs this script for rank 1. Rank 1's first batch has few real tokens, so
the model skips its second layer there: ranks see different numbers of valid rows and layers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: run as a script, `tests` is not importable

from attnmonitor import AttentionMonitor  # noqa: E402
from tests.helpers.models import SdpaAttention, TinyTransformer  # noqa: E402
from tests.helpers.trainer import make_trainer  # noqa: E402

LENGTHS = [8, 2, 7, 3, 6, 1, 8, 5, 4, 2]  # real tokens per sample; 10 samples: uneven last batches
SKIP_BELOW = 10  # the model skips layer 1 on batches with fewer real tokens


def samples() -> list[dict[str, torch.Tensor]]:
    """The job's 10 samples, ``input_ids`` and ``attention_mask`` of length 8 (``LENGTHS`` real tokens)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for length in LENGTHS:
        mask = torch.zeros(8, dtype=torch.long)
        mask[:length] = 1
        out.append({"input_ids": torch.randint(50, (8,), generator=g), "attention_mask": mask})
    return out


class SkippingTransformer(TinyTransformer):
    """TinyTransformer that skips its second layer on batches with fewer than ``SKIP_BELOW`` real tokens."""

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        mask = attention_mask.bool()[:, None, None, :]
        for index, layer in enumerate(self.layers):
            if index == 1 and int(attention_mask.sum()) < SKIP_BELOW:
                continue
            x = x + layer(x, mask)
        return x


def build_model() -> SkippingTransformer:
    """The job's model, with the weights every rank starts from (seed 0, no dropout)."""
    torch.manual_seed(0)
    return SkippingTransformer(SdpaAttention, dropout=0.0)


class Module(L.LightningModule):
    """The model with a plain loss and a frozen SGD optimizer (learning rate 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = build_model()

    def training_step(self, batch, batch_idx):
        return self.net(batch["input_ids"], attention_mask=batch["attention_mask"]).square().mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.net(batch["input_ids"], attention_mask=batch["attention_mask"]).square().mean(), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)  # weights stay put: the test recomputes them


def main(output: str) -> None:
    """Fit for 4 steps on 2 CPU processes, logging to ``output/tb/version_0`` (rank 0 only)."""
    data = samples()
    monitor = AttentionMonitor(
        schedule={"every_n_steps": 2, "val_batches": 1, "atlas_every_n_steps": 2},
        dashboards={"heatmaps": {"every_n_steps": 2, "max_tokens": 8}, "per_head": True},
    )
    trainer = make_trainer(
        output,
        [monitor],
        strategy="ddp_find_unused_parameters_true",  # rank 1 skips a layer: its parameters get no gradient
        accelerator="cpu",
        devices=2,
        max_steps=4,
        num_sanity_val_steps=1,
    )
    trainer.fit(Module(), DataLoader(data, batch_size=2), DataLoader(data[:6], batch_size=2))


if __name__ == "__main__":
    main(sys.argv[1])
