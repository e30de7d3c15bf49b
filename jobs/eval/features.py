"""Encoded features on disk: written batch by batch, read back block by block (memory-mapped float32).

Late interaction scores token sets, so an evaluation set's features are N x n x d floats:
5,000 images of 257 tokens at d = 256 are 1.3 GB. They go to files in the stage folder and
scoring reads two blocks at a time, so a set larger than memory can be evaluated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from models.filip import Encoded


class FeatureFile:
    """Append `Encoded` batches; then `len()`, `block(a, b)` and `blocks(size)` read them back."""

    def __init__(self, folder: Path, name: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = {part: folder / f"{name}.{part}" for part in ("tokens", "mask", "pooled")}
        self.files = {part: open(path, "wb") for part, path in self.paths.items()}
        self.count = 0
        self.shape: tuple[int, int] | None = None  # (n tokens, d)
        self._maps: dict[str, np.memmap] = {}

    def append(self, enc: Encoded) -> None:
        b, n, d = enc.tokens.shape
        if self.shape is None:
            self.shape = (n, d)
        elif self.shape != (n, d):
            raise ValueError(f"token shape changed from {self.shape} to {(n, d)}")
        self.files["tokens"].write(enc.tokens.detach().float().contiguous().numpy().tobytes())
        self.files["mask"].write(enc.mask.detach().to(torch.uint8).contiguous().numpy().tobytes())
        self.files["pooled"].write(enc.pooled.detach().float().contiguous().numpy().tobytes())
        self.count += b

    def close(self) -> "FeatureFile":
        for f in self.files.values():
            f.close()
        if self.count:
            n, d = self.shape  # type: ignore[misc]
            self._maps = {
                "tokens": np.memmap(self.paths["tokens"], np.float32, "r", shape=(self.count, n, d)),
                "mask": np.memmap(self.paths["mask"], np.uint8, "r", shape=(self.count, n)),
                "pooled": np.memmap(self.paths["pooled"], np.float32, "r", shape=(self.count, d)),
            }
        return self

    def __len__(self) -> int:
        return self.count

    def block(self, start: int, stop: int) -> Encoded:
        m = self._maps
        return Encoded(torch.from_numpy(np.array(m["tokens"][start:stop])),
                       torch.from_numpy(np.array(m["mask"][start:stop])).bool(),
                       torch.from_numpy(np.array(m["pooled"][start:stop])))

    def take(self, index: torch.Tensor) -> Encoded:
        """Rows `index` (any order), for scoring matched pairs."""
        idx = index.numpy()
        m = self._maps
        return Encoded(torch.from_numpy(np.array(m["tokens"][idx])), torch.from_numpy(np.array(m["mask"][idx])).bool(),
                       torch.from_numpy(np.array(m["pooled"][idx])))

    def blocks(self, size: int) -> Iterator[tuple[int, Encoded]]:
        for start in range(0, self.count, size):
            yield start, self.block(start, min(start + size, self.count))

    def remove(self) -> None:
        self._maps = {}
        for path in self.paths.values():
            path.unlink(missing_ok=True)
