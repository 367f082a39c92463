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
from . import audio, images
from .dataset import ByteDataset, check_separator, read_file_bytes
from .media import MODALITIES, AudioFormat, ImageFormat, Media, kind_of, parse_image_size

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


def _kinds(files: list[tuple[Path, str]]) -> str:
    """The one kind (image, audio, bytes) all files are by extension; a mix is a DataError saying what it holds."""
    by_kind: dict[str, list[str]] = {}
    for f, key in files:
        by_kind.setdefault(kind_of(f), []).append(key)
    if len(by_kind) == 1:
        return next(iter(by_kind))
    mix = "; ".join(f"{len(keys):,} {kind} file{'s' * (len(keys) > 1)} ({', '.join(keys[:2])}"
                    f"{', ...' if len(keys) > 2 else ''})" for kind, keys in sorted(by_kind.items()))
    raise DataError(f"the data mixes kinds of files: {mix}. Give one kind, or --modality bytes to train on every "
                    "file's raw bytes")


def resolve_media(paths: Sequence[str | Path] | None, modality: str = "auto", image_size: str = "",
                  sample_rate: int = 0, sample_format: str = "mulaw") -> tuple[Media, bool]:
    """What the data is (None: bytes) and whether its shape was stated (then images' channels are converted to it
    and sounds resampled to its rate; unstated, it is the first file's, and every other must match). Reads file
    names and the first file's header only, so a run can be sized before its data is decoded."""
    if modality not in ("auto", *MODALITIES):
        raise DataError(f"modality must be auto, {', '.join(MODALITIES)}; got {modality!r}")
    if paths is None or modality == "bytes":
        if modality in ("image", "audio"):
            raise DataError(f"a {modality} model needs its data: name {modality} files or folders with --data")
        return None, False
    files = _collect([paths] if isinstance(paths, (str, os.PathLike)) else paths)
    kind = _kinds(files) if modality == "auto" else modality
    first = files[0][0]
    if kind == "image":
        if image_size:
            h, w, c = parse_image_size(image_size)
            return ImageFormat(h, w, c or images.probe(first)[2]), c is not None
        return ImageFormat(*images.probe(first)), False
    if kind == "audio":
        return AudioFormat(sample_rate or audio.probe(first), sample_format), sample_rate > 0
    return None, False


def _media_parts(path: Path, media: Media, fit: str, convert: bool) -> list[np.ndarray]:
    """One file's images (a `.npy` stack holds many) or its one clip, as arrays of bytes."""
    if isinstance(media, ImageFormat):
        return images.read_images(path, media, fit, convert)
    if not convert and (rate := audio.probe(path)) != media.sample_rate:
        raise DataError(f"{path} is sampled at {rate:,} Hz where the other clips are at {media.sample_rate:,} Hz: "
                        "state the rate to resample every clip to with --sample-rate")
    return [audio.read_audio(path, media)]


def _media_split(files: list[tuple[Path, str]], val_fraction: float, media: Media, fit: str, convert: bool
                 ) -> tuple[ByteDataset, ByteDataset, str]:
    """Images or clips split like files: by crc32 of the path, or, from one file, its last images or the tail of its
    one clip (cut at a sample)."""
    if len(files) == 1:
        path = files[0][0]
        parts = _media_parts(path, media, fit, convert)
        if isinstance(media, ImageFormat):
            if len(parts) < 2:
                raise DataError(f"{path} holds one image: a run needs at least two, one to validate on")
            n_val = max(1, round(len(parts) * val_fraction))
            train_parts, val_parts, how = parts[:-n_val], parts[-n_val:], f"last {n_val:,} images"
        else:
            clip = parts[0]
            n_val = max(1, round(len(clip) / media.bytes_per_sample * val_fraction)) * media.bytes_per_sample
            if n_val >= len(clip):
                raise DataError(f"{path} is too short to split into training and validation audio")
            train_parts, val_parts, how = [clip[:-n_val]], [clip[-n_val:]], f"last {n_val:,} bytes"
        train = ByteDataset(train_parts, name="train", paths=[path], media=media)
        val = ByteDataset(val_parts, name="val", paths=[path], media=media)
        text = (f"{media.describe()} | train: {train.describe()} | val: {val.describe()} (split by tail of one "
                f"file, {how}: {path})")
        return train, val, text
    is_val = _val_sides(files, val_fraction)
    sides: dict[bool, tuple[list, list]] = {False: ([], []), True: ([], [])}
    for (f, _), v in zip(files, is_val, strict=True):
        parts = _media_parts(f, media, fit, convert)
        sides[v][0].extend(parts)
        sides[v][1].extend([f] * len(parts))
    train = ByteDataset(sides[False][0], name="train", paths=sides[False][1], media=media)
    val = ByteDataset(sides[True][0], name="val", paths=sides[True][1], media=media)
    text = (f"{media.describe()} | train: {train.describe()} | val: {val.describe()} (split by file, crc32 of "
            f"path, {val_fraction * 100:g}%)")
    return train, val, text


def _val_sides(files: list[tuple[Path, str]], val_fraction: float) -> list[bool]:
    """Per file: does it go to validation (crc32 of its key below val_fraction, at least one file each side)."""
    scores = [_val_score(key) for _, key in files]
    is_val = [s < val_fraction for s in scores]
    # Hashing can put every file on one side of a small corpus; move the nearest file across so both are usable.
    if not any(is_val):
        is_val[int(np.argmin(scores))] = True
    elif all(is_val):
        is_val[int(np.argmax(scores))] = False
    return is_val


def load_split(paths: Sequence[str | Path] | None, val_fraction: float = 0.05, separator: int | None = None,
               media: Media = None, fit: str = "none", convert: bool = False
               ) -> tuple[ByteDataset, ByteDataset, str]:
    """Deterministic train/validation split of the given files/directories (None: the stdlib default corpus).

    One file: its last `val_fraction` of bytes is validation. Several files: whole files go to validation when
    the crc32 of their path (relative to the directory given) falls below `val_fraction`, with at least one file
    on each side. Returns (train, val, a one-line statement of the split).

    With `media` (images or audio, as `resolve_media` found it) every file is decoded to its raw pixels or
    samples, `fit` bringing images to size (bytelm.data.images) and `convert` converting channels and rates; one
    `.npy` stack or one clip is split by its tail (its last images, the end of the clip).
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    check_separator(separator)
    if paths is None:
        if media is not None:
            raise DataError(f"a {media.kind} model needs its data: name {media.kind} files or folders with --data")
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [(f, f.relative_to(root).as_posix()) for f in default_corpus_files() if f.stat().st_size > 0]
    else:
        if isinstance(paths, (str, os.PathLike)):  # a lone path is a Sequence of characters: wrap it
            paths = [paths]
        if not paths:
            raise DataError("no data paths given")
        files = _collect(paths)
    if media is not None:
        if separator is not None:
            raise DataError("--separator joins documents of bytes; images and sounds are sequences of their own")
        return _media_split(files, val_fraction, media, fit, convert)
    if len(files) == 1:
        return _tail_split(files[0][0], val_fraction, separator)

    is_val = _val_sides(files, val_fraction)
    train_files = [f for (f, _), v in zip(files, is_val, strict=True) if not v]
    val_files = [f for (f, _), v in zip(files, is_val, strict=True) if v]
    train = ByteDataset.from_files(train_files, separator, name="train")
    val = ByteDataset.from_files(val_files, separator, name="val")
    text = (f"train: {train.describe()} | val: {val.describe()} "
            f"(split by file, crc32 of path, {val_fraction * 100:g}%)")
    return train, val, text
