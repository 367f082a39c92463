"""Byte data for training and evaluation: files and directories read as one stream of bytes.

There is no tokenizer: a corpus is the raw bytes of its files (text, code or binary), logically concatenated.
Large files are memory-mapped, so a corpus can be far bigger than RAM. The split into train and validation is
deterministic (no RNG involved) and stated in plain words by `load_split`, so a run's log says exactly what it
trained and evaluated on.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import DataError
from .media import AudioFormat, Media

# Files at least this big are memory-mapped; smaller ones are read into RAM. Every memmap pins an open file
# descriptor (mmap dups it), and a directory of thousands of small files (the stdlib alone has ~1,800) would run
# into the common limit of 1,024 open files; small files cost little RAM each.
_MMAP_MIN_BYTES = 1 << 20


def check_separator(separator: int | None) -> None:
    if separator is not None and (isinstance(separator, bool) or not isinstance(separator, (int, np.integer))
                                  or not 0 <= separator <= 255):
        raise DataError(f"separator must be a byte value in 0..255 or None, got {separator!r}")


def _fmt_bytes(n: int) -> str:
    return f"{n:,} bytes" if n < 1_000_000 else f"{n / 1e6:.1f} MB"


def read_file_bytes(path: Path) -> np.ndarray:
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

    `media` (bytelm.data.media) says what the bytes are; an image or audio dataset is `bounded`: each part (an
    image, a clip) is a sequence of its own, and no training or evaluation window crosses from one part into the
    next. Windows start at multiples of `align` bytes into a part (a sample's bytes: a 16-bit window never starts
    on a sample's high byte).
    """

    def __init__(self, parts: Sequence[np.ndarray], separator: int | None = None, name: str = "data",
                 paths: Sequence[Path] = (), media: Media = None):
        check_separator(separator)
        self.media = media
        self.bounded = media is not None
        self.align = media.bytes_per_sample if isinstance(media, AudioFormat) else 1
        if self.bounded and separator is not None:
            raise DataError("a separator joins documents of bytes; images and sounds are sequences of their own")
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
        return cls([read_file_bytes(p) for p in paths], separator=separator, name=name, paths=paths)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_files(self) -> int:
        return len(self.parts)

    def describe(self) -> str:
        n = self.num_files
        what = {None: "file", "image": "image", "audio": "clip"}[getattr(self.media, "kind", None)]
        return f"{n:,} {what}{'' if n == 1 else 's'}, {_fmt_bytes(len(self))}"

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
