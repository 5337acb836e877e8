"""A word-level language-modelling corpus that needs no download: the prose of Python's documentation.

``pydoc_data.topics`` ships with CPython (the text behind ``help("TOPIC")``): about 120k words of English.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

_WORD = re.compile(r"[a-z]+|[0-9]+|[^\sa-z0-9]")
UNKNOWN = "<unk>"


def load_corpus_words() -> list[str]:
    """Every word and punctuation mark of ``pydoc_data.topics``, lower-cased, in document order."""
    from pydoc_data.topics import topics

    return _WORD.findall(" ".join(topics[name] for name in sorted(topics)).lower())


class WordVocabulary:
    """Words seen at least ``min_count`` times, most frequent first; id 0 is ``<unk>``."""

    def __init__(self, words: Sequence[str], min_count: int = 2) -> None:
        counts = Counter(words)
        self.itos = [UNKNOWN] + [w for w, c in counts.most_common() if c >= min_count]
        self.stoi = {w: i for i, w in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, words: Sequence[str]) -> Tensor:
        """``[N]`` long ids."""
        return torch.tensor([self.stoi.get(w, 0) for w in words], dtype=torch.long)

    def decode(self, ids: Tensor | Sequence[int]) -> list[str]:
        """One string per id (usable as the monitor's ``decoder``)."""
        return [self.itos[int(i)] for i in ids]

    __call__ = decode


class CorpusDataModule(L.LightningDataModule):
    """Next-word prediction on windows of ``seq_len + 1`` words; the last ``val_fraction`` is validation.

    Batches are ``(input_ids [B, seq_len], targets [B, seq_len])``.
    """

    def __init__(self, seq_len: int = 64, batch_size: int = 32, val_fraction: float = 0.1, min_count: int = 2) -> None:
        super().__init__()
        if seq_len < 2 or batch_size < 1 or not 0 < val_fraction < 1:
            raise ValueError(
                f"CorpusDataModule needs seq_len >= 2, batch_size >= 1, 0 < val_fraction < 1; got "
                f"seq_len={seq_len}, batch_size={batch_size}, val_fraction={val_fraction}"
            )
        self.seq_len, self.batch_size, self.val_fraction = seq_len, batch_size, val_fraction
        words = load_corpus_words()
        self.vocab = WordVocabulary(words, min_count)
        self.ids = self.vocab.encode(words)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Token strings of ids (the monitor's heatmap labels)."""
        return self.vocab.decode(ids)

    def _windows(self, ids: Tensor) -> TensorDataset:
        n = (len(ids) - 1) // self.seq_len
        x = ids[: n * self.seq_len].view(n, self.seq_len)
        y = ids[1 : n * self.seq_len + 1].view(n, self.seq_len)
        return TensorDataset(x, y)

    def setup(self, stage: str | None = None) -> None:
        split = int(len(self.ids) * (1 - self.val_fraction))
        self.train_set, self.val_set = self._windows(self.ids[:split]), self._windows(self.ids[split:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)
