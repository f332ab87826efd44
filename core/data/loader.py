"""Streaming fixed-length windows out of a prepared split, in a seeded order that resumes exactly.

The split's token stream is cut into windows of `seq_len + 1` tokens with stride `seq_len` (inputs and their
next-token targets share the overlapping token). The train split visits the windows in a random permutation
drawn from (seed, epoch), a new one each epoch; the eval split goes in order. A *global* batch is the next
`batch_size` windows of that order, and rank r of `world_size` takes the r-th contiguous slice of it, so
2 ranks × B/2 see exactly the windows 1 process × B sees. The position is global too: every rank's state
is the same, and a state saved with one world size resumes under another.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from hyloom.data.documents import DataError
from hyloom.data.shards import open_shards


class TokenLoader:
    def __init__(self, prepared_dir: str | Path, split: str = "train", seq_len: int = 256, batch_size: int = 8,
                 rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool | None = None):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..world_size-1 (world_size {world_size})")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of world_size {world_size}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.dir = Path(prepared_dir)
        manifest_file = self.dir / "manifest.json"
        if not manifest_file.is_file():
            raise DataError(f"{self.dir} is not a prepared data folder (no manifest.json); run `hyloom data prepare`")
        manifest = json.loads(manifest_file.read_text())
        if split not in manifest["splits"]:
            raise DataError(f"no split {split!r} in {self.dir} (splits: {', '.join(manifest['splits'])})")
        info = manifest["splits"][split]
        self._arrays = open_shards(self.dir, info["shards"], manifest["dtype"])
        self._starts = np.cumsum([0] + [len(a) for a in self._arrays])  # stream offset of each shard
        self.n_tokens = int(self._starts[-1])
        if self.n_tokens < seq_len + 1:
            raise DataError(f"the {split} split of {self.dir} has {self.n_tokens} tokens, fewer than one window of "
                            f"seq_len + 1 = {seq_len + 1}; use a smaller seq_len or more data")
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.shuffle = split == "train" if shuffle is None else shuffle
        self.n_windows = (self.n_tokens - 1) // seq_len
        self.epoch, self.position = 0, 0  # next window: order(epoch)[position]
        self._order_cache: tuple[int, np.ndarray] | None = None

    # ---- order -------------------------------------------------------------------------------------------

    def order(self, epoch: int) -> np.ndarray:
        """The window indices of one epoch, in visiting order."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            if self.shuffle:
                rng = np.random.default_rng([self.seed % 2**63, epoch])
                order = rng.permutation(self.n_windows)
            else:
                order = np.arange(self.n_windows)
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def _take_global(self) -> np.ndarray:
        """The next `batch_size` windows, running into the next epoch when this one ends."""
        out = []
        need = self.batch_size
        while need:
            order = self.order(self.epoch)
            part = order[self.position:self.position + need]
            out.append(part)
            need -= len(part)
            self.position += len(part)
            if self.position == self.n_windows:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(out)

    # ---- reading -----------------------------------------------------------------------------------------

    def window(self, index: int) -> np.ndarray:
        """Tokens [index * seq_len, index * seq_len + seq_len + 1) of the stream (may span shard files)."""
        start, length = index * self.seq_len, self.seq_len + 1
        pieces = []
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        while length:
            offset = start - self._starts[k]
            piece = self._arrays[k][offset:offset + length]
            pieces.append(piece)
            length -= len(piece)
            start += len(piece)
            k += 1
        return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]

    def _batch(self, windows: np.ndarray) -> torch.Tensor:
        rows = [self.window(int(i)).astype(np.int64) for i in windows]
        if not rows:
            return torch.empty(0, self.seq_len + 1, dtype=torch.long)
        return torch.from_numpy(np.stack(rows))

    def _local(self, windows: np.ndarray) -> np.ndarray:
        return np.array_split(windows, self.world_size)[self.rank]

    def next_batch(self) -> torch.Tensor:
        """This rank's rows of the next global batch: LongTensor [batch_size // world_size, seq_len + 1]."""
        return self._batch(self._local(self._take_global()))

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def iter_eval(self, max_batches: int | None = None) -> Iterator[torch.Tensor]:
        """Every window once, in stream order, independent of (and not moving) the position. Every rank yields
        the same number of batches; the last global batch may be short, and split unevenly between ranks (a
        rank may even get zero rows), so weight losses by the rows or tokens each batch has."""
        n = -(-self.n_windows // self.batch_size)
        if max_batches is not None:
            n = min(n, max_batches)
        for b in range(n):
            windows = np.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.n_windows))
            yield self._batch(self._local(windows))

    # ---- resume ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"split": self.split, "seq_len": self.seq_len, "seed": self.seed, "shuffle": self.shuffle,
                "n_windows": self.n_windows, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        for key in ("split", "seq_len", "seed", "shuffle", "n_windows"):
            if state[key] != getattr(self, key):
                raise DataError(f"loader state was saved with {key}={state[key]!r}, but this loader has "
                                f"{key}={getattr(self, key)!r}: the positions would not mean the same windows")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
