"""Random training windows over a byte stream, reproducible and resumable, split across data-parallel ranks."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DataError
from .dataset import ByteDataset


class WindowSampler:
    """Random windows of `seq_len` bytes, start offsets uniform over every valid position: anywhere in a stream of
    bytes; inside one part of a bounded dataset (an image, a clip: bytelm.data.dataset), at a multiple of its
    `align`. A part shorter than a window is never drawn (`skipped` counts them).

    Data-parallel: all ranks share `seed` and draw the same global batch of `batch_size * world_size` windows;
    rank r keeps the r-th slice, so the ranks together see exactly what one process with the global batch would.
    """

    def __init__(self, dataset: ByteDataset, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if seq_len < 1 or batch_size < 1:
            raise DataError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise DataError(f"rank must be in 0..{world_size - 1}, got {rank}")
        if len(dataset) < seq_len:
            where = f" ({dataset.paths[0]})" if len(dataset.paths) == 1 else ""
            raise DataError(f"{dataset.name} data{where} has {len(dataset):,} bytes, fewer than one window of "
                            f"seq_len={seq_len:,} bytes: use a smaller --seq-len or more data")
        self.dataset, self.seq_len, self.batch_size = dataset, seq_len, batch_size
        self.skipped = 0
        if dataset.bounded:  # windows per part, and where each part's first window starts in the stream
            sizes = np.diff(dataset.offsets)
            fits = np.where(sizes >= seq_len, (sizes - seq_len) // dataset.align + 1, 0)
            self.skipped = int((fits == 0).sum())
            if not fits.any():
                raise DataError(f"no {dataset.media.kind} of the {dataset.name} data holds one window of "
                                f"seq_len={seq_len:,} bytes (the longest has {int(sizes.max()):,}): use a smaller "
                                "--seq-len")
            self._ends = np.cumsum(fits)
        self.rank, self.world_size = rank, world_size
        self.rng = np.random.default_rng(seed)  # its own PCG64, so other code drawing numbers cannot shift ours
        self.step = 0

    def next_batch(self) -> torch.Tensor:
        """A (batch_size, seq_len) LongTensor of byte values 0..255."""
        if self.dataset.bounded:
            starts = self._bounded_starts(self.rng.integers(0, int(self._ends[-1]), size=self.batch_size *
                                                            self.world_size))
        else:
            n_starts = len(self.dataset) - self.seq_len + 1
            starts = self.rng.integers(0, n_starts, size=self.batch_size * self.world_size)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        batch = np.stack([self.dataset.read(s, self.seq_len) for s in mine])
        self.step += 1
        return torch.from_numpy(batch).long()

    def _bounded_starts(self, u: np.ndarray) -> np.ndarray:
        """Window numbers u (in 0..windows-1, counted part by part) -> their start offsets in the stream."""
        part = np.searchsorted(self._ends, u, side="right")  # the part holding window u
        before = np.where(part > 0, self._ends[part - 1], 0)
        return self.dataset.offsets[part] + (u - before) * self.dataset.align

    def state_dict(self) -> dict:
        """JSON-serializable: the generator state (a dict of ints) and the number of batches drawn."""
        return {"rng": self.rng.bit_generator.state, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.step = int(state["step"])
