"""Token shards for training: memmap reading, random training windows, fixed evaluation windows.

Every optimizer step draws one *global* batch of window offsets from a seeded generator that all
processes share; each process reads only its own rows. So one process with k accumulation steps
and k processes with one step each see exactly the same sequences, and the generator's state in
`trainer_state.json` makes a resumed run draw what the uninterrupted run would have drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import UserError, read_json
from .tokenizer import FORMAT_VERSION, find_tokenized


class Shards:
    """The shards of one split, as memmaps."""

    def __init__(self, folder: Path, split: str, meta: dict[str, Any]) -> None:
        dtype = np.dtype(meta["dtype"]).newbyteorder("<")
        self.arrays = []
        for shard in meta["splits"][split]["shards"]:
            path = folder / shard["file"]
            if not path.exists() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise UserError(f"shard {path} is missing or truncated; run 02_train_tokenizer.py again.")
            self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        self.lengths = np.array([a.size for a in self.arrays], dtype=np.int64)
        self.tokens = int(self.lengths.sum())


class TokenData:
    def __init__(self, path: str | Path) -> None:
        self.folder = find_tokenized(path)
        self.meta = read_json(self.folder / "meta.json", "token metadata")
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{self.folder} was written by another minigpt version; run 02_train_tokenizer.py again.")
        self.train = Shards(self.folder, "train", self.meta)
        self.val = Shards(self.folder, "val", self.meta)
        self.vocab_size: int = self.meta["vocab_size"]
        self.bytes_per_token: float = self.meta["bytes_per_token"]["val"]

    def check_context(self, block_size: int) -> None:
        if self.train.lengths.max(initial=0) <= block_size + 1:
            raise UserError(
                f"the train split ({self.train.tokens} tokens) is shorter than one context of {block_size} "
                "tokens; add text or choose a smaller --block-size."
            )
        if self.val.tokens <= block_size + 1:
            raise UserError(
                f"the val split has {self.val.tokens} tokens, less than one context of {block_size}; "
                "raise --val-fraction in 01_prepare_data.py or choose a smaller --block-size."
            )


class BatchSampler:
    """Random windows of `block_size + 1` tokens from the train shards; resumable."""

    def __init__(self, shards: Shards, block_size: int, seed: int) -> None:
        self.shards, self.T = shards, block_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        # a shard is chosen in proportion to the windows it holds
        windows = np.maximum(shards.lengths - block_size - 1, 0).astype(np.float64)
        self.p = windows / windows.sum()

    def global_batch(self, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, offset) for `rows` windows: the same on every process."""
        shard = self.rng.choice(len(self.p), size=rows, p=self.p) if len(self.p) > 1 else np.zeros(rows, np.int64)
        high = self.shards.lengths[shard] - self.T - 1
        return shard, (self.rng.random(rows) * high).astype(np.int64)

    def read(self, shard: np.ndarray, offset: np.ndarray) -> torch.Tensor:
        """The windows as one int64 tensor of shape (rows, block_size + 1)."""
        out = np.empty((len(offset), self.T + 1), dtype=np.int64)
        for i, (s, o) in enumerate(zip(shard, offset, strict=True)):
            out[i] = self.shards.arrays[s][o : o + self.T + 1]
        return torch.from_numpy(out)

    def state(self) -> dict[str, Any]:
        return self.rng.bit_generator.state

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


def eval_windows(shards: Shards, block_size: int, max_tokens: int) -> list[tuple[int, int]]:
    """Fixed, non-overlapping (shard, offset) windows covering up to `max_tokens` of val, in order."""
    windows = []
    for s, n in enumerate(shards.lengths):
        for offset in range(0, int(n) - block_size - 1 + 1, block_size):
            if len(windows) * block_size >= max_tokens:
                return windows
            windows.append((s, offset))
    return windows
