"""Byte data for training and evaluation: files and directories read as one stream of bytes.

There is no tokenizer: a corpus is the raw bytes of its files (text, code or binary), logically concatenated.
Large files are memory-mapped, so a corpus can be far bigger than RAM. The split into train and validation is
deterministic (no RNG involved) and stated in plain words by `load_split`, so a run's log says exactly what it
trained and evaluated on.

The embedded default corpus is the Python standard library's own source on the running machine: real, varied
code (~30 MB) that every Python install already has, so the library can train out of the box without a download.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

# Files at least this big are memory-mapped; smaller ones are read into RAM. Every memmap pins an open file
# descriptor (mmap dups it), and a directory of thousands of small files (the stdlib alone has ~1,800) would run
# into the common limit of 1,024 open files; small files cost little RAM each.
_MMAP_MIN_BYTES = 1 << 20

_EXCLUDED_STDLIB_DIRS = ("site-packages", "dist-packages")


class DataError(ValueError):
    """Unusable data: a missing path, an empty file or directory, a corpus too short for one window."""


def _check_separator(separator: int | None) -> None:
    if separator is not None and (isinstance(separator, bool) or not isinstance(separator, (int, np.integer))
                                  or not 0 <= separator <= 255):
        raise DataError(f"separator must be a byte value in 0..255 or None, got {separator!r}")


def _fmt_bytes(n: int) -> str:
    return f"{n:,} bytes" if n < 1_000_000 else f"{n / 1e6:.1f} MB"


def _load(path: Path) -> np.ndarray:
    """The bytes of one file as a uint8 array: memory-mapped when large, never a whole large file in RAM."""
    size = path.stat().st_size
    if size == 0:  # np.memmap cannot map zero bytes
        raise DataError(f"file is empty (0 bytes): {path}")
    if size < _MMAP_MIN_BYTES:
        return np.fromfile(path, dtype=np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r")


class ByteDataset:
    """Byte arrays (usually memmapped files) read as one logical stream.

    With `separator=None` (the default) the parts are plainly concatenated. With a separator byte, that byte is
    inserted between consecutive parts (not after the last), so a model can see where one file ends; it counts
    toward `len()`. Empty parts are dropped.
    """

    def __init__(self, parts: Sequence[np.ndarray], separator: int | None = None, name: str = "data",
                 paths: Sequence[Path] = ()):
        _check_separator(separator)
        self.parts = [p for p in parts if len(p) > 0]
        self.separator = separator
        self.name = name  # "train" / "val": used in error messages
        self.paths = list(paths)  # source files, for messages and reports only
        gap = 0 if separator is None else 1
        sizes = [len(p) + gap for p in self.parts]
        if sizes:
            sizes[-1] -= gap  # no separator after the last part
        # offsets[i] is where part i starts in the stream; offsets[-1] is the total length.
        self.offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)

    @classmethod
    def from_files(cls, paths: Sequence[str | Path], separator: int | None = None, name: str = "data") -> ByteDataset:
        paths = [Path(p) for p in paths]
        return cls([_load(p) for p in paths], separator=separator, name=name, paths=paths)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_files(self) -> int:
        return len(self.parts)

    def describe(self) -> str:
        n = self.num_files
        return f"{n:,} file{'' if n == 1 else 's'}, {_fmt_bytes(len(self))}"

    def read(self, start: int, length: int) -> np.ndarray:
        """`length` bytes of the stream from `start`, gathered across part boundaries (a fresh uint8 array)."""
        start, length = int(start), int(length)
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"read({start}, {length}) out of range for {self.name} of {len(self):,} bytes")
        out = np.empty(length, dtype=np.uint8)
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1  # the part that holds `start`
        pos, filled = start, 0
        while filled < length:
            part = self.parts[i]
            local = pos - int(self.offsets[i])
            if local < len(part):
                n = min(len(part) - local, length - filled)
                out[filled:filled + n] = part[local:local + n]
            else:  # past the part's bytes: we stand on the separator after it
                n = 1
                out[filled] = self.separator
            filled += n
            pos += n
            if pos == self.offsets[i + 1]:
                i += 1
        return out


def default_corpus_files() -> list[Path]:
    """The standard library's own `*.py` files on this machine (sorted), without site-/dist-packages."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Installed third-party packages are not the stdlib and differ from machine to machine.
        dirnames[:] = [d for d in dirnames if d not in _EXCLUDED_STDLIB_DIRS]
        files += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    if not files:
        raise DataError(f"no Python standard library sources (*.py) found under {root}; pass data paths explicitly")
    return sorted(files)


def _walk(root: Path) -> list[Path]:
    """Non-empty regular files under `root`, sorted, skipping hidden files and directories (.git and the like)."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            p = Path(dirpath) / f
            if not f.startswith(".") and p.is_file() and p.stat().st_size > 0:
                files.append(p)
    if not files:
        raise DataError(f"directory contains no non-empty files (hidden ones are skipped): {root}")
    return sorted(files)


def _collect(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """(file, key) for every file named or found under a directory; key = posix path relative to its root."""
    found: dict[Path, str] = {}
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"path does not exist: {p}")
        if p.is_dir():
            for f in _walk(p):
                found.setdefault(f.resolve(), f.relative_to(p).as_posix())
        elif p.is_file():
            if p.stat().st_size == 0:
                raise DataError(f"file is empty (0 bytes): {p}")
            found.setdefault(p.resolve(), p.name)
        else:
            raise DataError(f"not a regular file or directory: {p}")
    return list(found.items())


def _val_score(key: str) -> float:
    """A stable number in [0, 1) per relative path: same split on every machine and run, no RNG."""
    return zlib.crc32(key.encode("utf-8")) / 2**32


def _tail_split(path: Path, val_fraction: float, separator: int | None) -> tuple[ByteDataset, ByteDataset, str]:
    data = _load(path)
    n_val = max(1, round(len(data) * val_fraction))
    cut = len(data) - n_val
    # Slicing a memmap is a view: neither half is copied into RAM.
    train = ByteDataset([data[:cut]], separator, name="train", paths=[path])
    val = ByteDataset([data[cut:]], separator, name="val", paths=[path])
    pct = f"{val_fraction * 100:g}%"
    text = (f"train: first {cut:,} bytes | val: last {n_val:,} bytes "
            f"(split by tail of one file, last {pct} of bytes: {path})")
    return train, val, text


def load_split(paths: Sequence[str | Path] | None, val_fraction: float = 0.05,
               separator: int | None = None) -> tuple[ByteDataset, ByteDataset, str]:
    """Deterministic train/validation split of the given files/directories (None: the stdlib default corpus).

    One file: its last `val_fraction` of bytes is validation. Several files: whole files go to validation when
    the crc32 of their path (relative to the directory given) falls below `val_fraction`, with at least one file
    on each side. Returns (train, val, a one-line statement of the split).
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    _check_separator(separator)
    if paths is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [(f, f.relative_to(root).as_posix()) for f in default_corpus_files() if f.stat().st_size > 0]
    else:
        if isinstance(paths, (str, os.PathLike)):  # a lone path is a Sequence of characters: wrap it
            paths = [paths]
        if not paths:
            raise DataError("no data paths given")
        files = _collect(paths)
    if len(files) == 1:
        return _tail_split(files[0][0], val_fraction, separator)

    scores = [_val_score(key) for _, key in files]
    is_val = [s < val_fraction for s in scores]
    # Hashing can put every file on one side of a small corpus; move the nearest file across so both are usable.
    if not any(is_val):
        is_val[int(np.argmin(scores))] = True
    elif all(is_val):
        is_val[int(np.argmax(scores))] = False
    train_files = [f for (f, _), v in zip(files, is_val, strict=True) if not v]
    val_files = [f for (f, _), v in zip(files, is_val, strict=True) if v]
    train = ByteDataset.from_files(train_files, separator, name="train")
    val = ByteDataset.from_files(val_files, separator, name="val")
    text = (f"train: {train.describe()} | val: {val.describe()} "
            f"(split by file, crc32 of path, {val_fraction * 100:g}%)")
    return train, val, text


class WindowSampler:
    """Random windows of `seq_len` bytes, start offsets uniform over every valid position.

    Data-parallel: all ranks share `seed` and draw the same global batch of `batch_size * world_size` windows;
    rank r keeps the r-th slice, so the ranks together see exactly what one process with the global batch would.
    """

    def __init__(self, dataset: ByteDataset, seq_len: int, batch_size: int, seed: int, rank: int = 0,
                 world_size: int = 1):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
        if len(dataset) < seq_len:
            where = f" ({dataset.paths[0]})" if len(dataset.paths) == 1 else ""
            raise DataError(f"{dataset.name} data{where} has {len(dataset):,} bytes, fewer than one window of "
                            f"seq_len={seq_len:,} bytes: use a smaller --seq-len or more data")
        self.dataset, self.seq_len, self.batch_size = dataset, seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.rng = np.random.default_rng(seed)  # its own PCG64, so other code drawing numbers cannot shift ours
        self.step = 0

    def next_batch(self) -> torch.Tensor:
        """A (batch_size, seq_len) LongTensor of byte values 0..255."""
        n_starts = len(self.dataset) - self.seq_len + 1
        starts = self.rng.integers(0, n_starts, size=self.batch_size * self.world_size)
        mine = starts[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        batch = np.stack([self.dataset.read(s, self.seq_len) for s in mine])
        self.step += 1
        return torch.from_numpy(batch).long()

    def state_dict(self) -> dict:
        """JSON-serializable: the generator state (a dict of ints) and the number of batches drawn."""
        return {"rng": self.rng.bit_generator.state, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.step = int(state["step"])
