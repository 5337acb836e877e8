"""Sequence reversal: a task whose correct attention is known (output ``t`` reads input ``L − 1 − t``)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset


class _Reversals(Dataset):
    def __init__(self, n: int, seq_len: int, vocab_size: int, seed: int) -> None:
        self.src = torch.randint(vocab_size, (n, seq_len), generator=torch.Generator().manual_seed(seed))
        self.alignments = torch.arange(seq_len - 1, -1, -1)  # [L]: source position of each output position

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        src = self.src[i]
        return {"input_ids": src, "labels": src.flip(0), "alignments": self.alignments}


class ReversalDataModule(L.LightningDataModule):
    """Batches ``{"input_ids" [B, L], "labels" [B, L] (reversed), "alignments" [B, L]}``."""

    def __init__(self, seq_len: int = 12, vocab_size: int = 24, batch_size: int = 64, train_size: int = 20000, val_size: int = 512) -> None:
        super().__init__()
        self.seq_len, self.vocab_size, self.batch_size = seq_len, vocab_size, batch_size
        self.train_set = _Reversals(train_size, seq_len, vocab_size, seed=0)
        self.val_set = _Reversals(val_size, seq_len, vocab_size, seed=1)

    def decode(self, ids: list[int]) -> list[str]:
        return [f"s{i}" for i in ids]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class ReversalModel(L.LightningModule):
    """Encoder self-attention, then output positions cross-attend to the encoded input.

    Logs ``<stage>/alignment_accuracy``: how often the cross-attention's argmax (mean over heads)
    is the true source position.
    """

    def __init__(self, vocab_size: int, seq_len: int = 12, dim: int = 64, heads: int = 2, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab_size, dim)
        self.src_pos = nn.Parameter(torch.randn(seq_len, dim) * 0.1)
        self.out_pos = nn.Parameter(torch.randn(seq_len, dim) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``[B, L]`` ids to ``([B, L, vocab] logits, [B, L, L] head-mean cross-attention)``."""
        memory = self.encoder(self.embed(input_ids) + self.src_pos)
        queries = self.out_pos.expand(input_ids.shape[0], -1, -1)
        out, weights = self.cross_attn(queries, memory, memory, need_weights=True)
        return self.head(out), weights

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits, weights = self(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
        accuracy = (weights.argmax(-1) == batch["alignments"]).float().mean()
        self.log(f"{stage}/loss", loss, prog_bar=True)
        self.log(f"{stage}/alignment_accuracy", accuracy, prog_bar=True)
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
