"""AttentionMonitor on a Hugging Face encoder-decoder trained with Lightning: cross-attention logged
without position statistics, its heatmap and table labelled with the decoder's tokens."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from attnmonitor import AttentionMonitor
from tests.helpers.events import read_events
from tests.helpers.trainer import ignore_few_batches, make_trainer

transformers = pytest.importorskip("transformers")

CROSS = "model.model.decoder.layers.0.encoder_attn"
DECODER_SELF = "model.model.decoder.layers.0.self_attn"


class Seq2Seq(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        config = transformers.BartConfig(
            vocab_size=30,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=16,
        )
        self.model = transformers.BartForConditionalGeneration._from_config(config, attn_implementation="sdpa")

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(n):
        ids = torch.randint(4, 30, (2, 8), generator=generator)
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[1, 5:] = 0
        decoder_ids = torch.randint(4, 30, (2, 8), generator=generator)  # as long as the source
        decoder_mask = torch.ones(2, 8, dtype=torch.long)
        decoder_mask[0, 6:] = 0
        labels = decoder_ids.masked_fill(decoder_mask == 0, -100)
        batches.append(
            {
                "input_ids": ids,
                "attention_mask": mask,
                "decoder_input_ids": decoder_ids,
                "decoder_attention_mask": decoder_mask,
                "labels": labels,
            }
        )
    return batches


# incidental: 4 training batches an epoch, fewer than Lightning's default logging interval
@ignore_few_batches
def test_encoder_decoder_run_logs_cross_attention_with_its_own_meanings(tmp_path):
    torch.manual_seed(0)
    monitor = AttentionMonitor(
        schedule={"every_n_steps": 2, "atlas_every_n_steps": 2},
        dashboards={"heatmaps": {"every_n_steps": 2}, "tokenizer": lambda ids: [f"w{i}" for i in ids]},
    )
    trainer = make_trainer(tmp_path, [monitor], max_steps=4)
    batches = _batches()
    trainer.fit(Seq2Seq(), DataLoader(batches, batch_size=None))
    events = read_events(tmp_path / "tb" / "version_0")
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    assert f"attn_train_layers/entropy/{CROSS}" in scalars
    assert f"attn_train_layers/distance/{DECODER_SELF}" in scalars
    for name in ("distance", "self_weight", "prev_token_weight", "next_token_weight"):
        assert f"attn_train_layers/{name}/{CROSS}" not in scalars
    assert f"attn_train_heatmap/{CROSS}/head_0" in images
    table = events.Tensors(f"attn_train_example/interpretation/{CROSS}/text_summary")[0].tensor_proto.string_val[0].decode()
    first_decoder_token = f"w{int(batches[1]['decoder_input_ids'][0, 0])}"  # step 1 is the first captured (every 2)
    assert table.splitlines()[0] == "| query | attends to (weight) | entropy |"
    assert table.splitlines()[2].startswith(f"| {first_decoder_token} |")
