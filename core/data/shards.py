"""Packed token shards: each split is one flat stream `doc EOS doc EOS ...` cut into files of raw integers.

Files are plain little-endian arrays (`train-00000.bin`, ...) read back with `numpy.memmap`; their dtype is
uint16 when every id fits, else uint32. `manifest.json` lists them with their token counts.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

SHARD_TOKENS = 1 << 27  # 128 Mi tokens (256 MB as uint16) a file: big enough to be few, small enough to copy


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


class ShardWriter:
    """Appends documents (token ids + EOS) to `{split}-{k:05d}.bin` files, opening a new one every SHARD_TOKENS."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, eos_id: int, shard_tokens: int | None = None):
        self.folder, self.split, self.dtype, self.eos = folder, split, dtype, eos_id
        self.shard_tokens = shard_tokens or SHARD_TOKENS
        self.shards: list[dict] = []
        self._file = None

    def add(self, ids) -> None:
        tokens = np.append(np.asarray(ids, dtype=self.dtype), np.asarray(self.eos, dtype=self.dtype))
        while len(tokens):
            if self._file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            part.tofile(self._file)
            self.shards[-1]["tokens"] += len(part)

    def _open(self) -> None:
        self._close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.folder / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def _close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def open_shards(folder: Path, shards: list[dict], dtype: str) -> list[np.ndarray]:
    """Memory-map the shard files of one split (empty files give empty arrays: memmap refuses size 0)."""
    arrays = []
    for s in shards:
        if s["tokens"] == 0:
            arrays.append(np.zeros(0, dtype=dtype))
        else:
            arrays.append(np.memmap(folder / s["file"], dtype=dtype, mode="r", shape=(s["tokens"],)))
    return arrays


def token_counts(arrays: list[np.ndarray], vocab_size: int) -> np.ndarray:
    counts = np.zeros(vocab_size, dtype=np.int64)
    for a in arrays:
        for start in range(0, len(a), 1 << 24):  # in pieces, so a huge shard is never copied whole
            counts += np.bincount(a[start:start + (1 << 24)], minlength=vocab_size)[:vocab_size]
    return counts


def unigram_loss(train_counts: np.ndarray, eval_counts: np.ndarray) -> float:
    """Cross-entropy (nats/token) of the eval tokens under the train split's unigram distribution, add-one
    smoothed over the vocabulary: the loss of a model that learned only token frequencies."""
    vocab = len(train_counts)
    log_p = np.log(train_counts + 1.0) - math.log(train_counts.sum() + vocab)
    n_eval = eval_counts.sum()
    return float(-(eval_counts * log_p).sum() / n_eval) if n_eval else float("nan")
