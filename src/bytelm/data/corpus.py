"""Which bytes a run trains and validates on: files and folders collected, and split deterministically.

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

from ..errors import DataError
from .dataset import ByteDataset, check_separator, read_file_bytes

_EXCLUDED_STDLIB_DIRS = ("site-packages", "dist-packages")


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
    data = read_file_bytes(path)
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
    check_separator(separator)
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
