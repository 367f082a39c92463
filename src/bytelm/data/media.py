"""What a model's bytes are: plain bytes, an image or a sound, and how each is laid out as one sequence of bytes.

    bytes   any file's raw bytes (text, code, binaries)
    image   raw pixels, as in the MEGABYTE paper (section 4, ImageNet as raw RGB bytes): row-major, the channels of a
            pixel next to each other (H x W x C bytes: 64x64 RGB is 12,288). One image is one sequence.
    audio   raw samples at a stated rate, mono, in a stated sample format:
              mulaw   8-bit G.711 mu-law (256 values, one byte per sample: the paper's audio is 256-valued)
              pcm8    8-bit unsigned linear PCM (one byte)
              pcm16   16-bit signed linear PCM, little-endian (two bytes: low byte first)

A model's config records its modality as a spec string (`image:64x64x3`, `audio:16000:mulaw`, `bytes`), so a model
folder knows what it generates. Which kind a file is goes by its extension (`kind_of`), overridable by the user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

MODALITIES = ("bytes", "image", "audio")
SAMPLE_FORMATS = {"mulaw": 1, "pcm8": 1, "pcm16": 2}  # bytes per sample
IMAGE_FITS = ("none", "resize", "crop", "pad")  # what `--image-fit` may say (bytelm.data.images)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                              ".pbm", ".pnm", ".npy"})
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".oga", ".opus", ".aiff", ".aif", ".aifc", ".au", ".snd",
                              ".mp3"})
MAX_SAMPLE_RATE = 384_000  # past any audio interface's rate


@dataclass(frozen=True)
class ImageFormat:
    """Images of height x width pixels of `channels` bytes each (1 grey, 2 grey + alpha, 3 RGB, 4 RGBA)."""

    height: int
    width: int
    channels: int

    kind = "image"

    def __post_init__(self) -> None:
        if min(self.height, self.width) < 1 or not 1 <= self.channels <= 4:
            raise ConfigError(f"an image format needs height and width >= 1 and 1..4 channels, got "
                              f"{self.height}x{self.width}x{self.channels}")

    @property
    def seq_len(self) -> int:
        """Bytes in one image: its whole sequence."""
        return self.height * self.width * self.channels

    @property
    def row_bytes(self) -> int:
        return self.width * self.channels

    @property
    def spec(self) -> str:
        return f"image:{self.height}x{self.width}x{self.channels}"

    def describe(self) -> str:
        what = {1: "grey", 2: "grey + alpha", 3: "RGB", 4: "RGBA"}[self.channels]
        return f"{self.height}x{self.width} {what} images ({self.seq_len:,} bytes each)"


@dataclass(frozen=True)
class AudioFormat:
    """Mono audio at `sample_rate` samples per second, each sample in `sample_format` (SAMPLE_FORMATS)."""

    sample_rate: int
    sample_format: str = "mulaw"

    kind = "audio"

    def __post_init__(self) -> None:
        if self.sample_format not in SAMPLE_FORMATS:
            raise ConfigError(f"sample format must be one of {', '.join(SAMPLE_FORMATS)}, got {self.sample_format!r}")
        if not 1 <= self.sample_rate <= MAX_SAMPLE_RATE:
            raise ConfigError(f"sample rate must be in 1..{MAX_SAMPLE_RATE:,} Hz, got {self.sample_rate}")

    @property
    def bytes_per_sample(self) -> int:
        return SAMPLE_FORMATS[self.sample_format]

    @property
    def bytes_per_second(self) -> int:
        return self.sample_rate * self.bytes_per_sample

    @property
    def spec(self) -> str:
        return f"audio:{self.sample_rate}:{self.sample_format}"

    def describe(self) -> str:
        return f"mono {self.sample_format} audio at {self.sample_rate:,} Hz ({self.bytes_per_second:,} bytes/s)"


Media = ImageFormat | AudioFormat | None  # None: plain bytes


def parse_modality(spec: str) -> Media:
    """`bytes` -> None, `image:HxWxC` -> ImageFormat, `audio:RATE:FORMAT` -> AudioFormat; ConfigError otherwise."""
    if spec == "bytes":
        return None
    if m := re.fullmatch(r"image:(\d+)x(\d+)x(\d+)", spec):
        return ImageFormat(*map(int, m.groups()))
    if m := re.fullmatch(r"audio:(\d+):(\w+)", spec):
        return AudioFormat(int(m.group(1)), m.group(2))
    raise ConfigError(f"modality must be `bytes`, `image:HxWxC` (e.g. image:64x64x3) or `audio:RATE:FORMAT` (e.g. "
                      f"audio:16000:mulaw), got {spec!r}")


def parse_image_size(text: str) -> tuple[int, int, int | None]:
    """`--image-size`: 'HxW' or 'HxWxC' (height first, as the array's shape) -> (H, W, C or None)."""
    m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*(?:x\s*(\d+)\s*)?", text)
    if not m or min(int(m.group(1)), int(m.group(2))) < 1 or (m.group(3) and not 1 <= int(m.group(3)) <= 4):
        raise ConfigError(f"image size must be HEIGHTxWIDTH or HEIGHTxWIDTHxCHANNELS (1..4 channels), e.g. 64x64 "
                          f"or 64x64x3, got {text!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3)) if m.group(3) else None


def kind_of(path: Path) -> str:
    """What a file holds, by its extension: image, audio or bytes."""
    ext = path.suffix.lower()
    return "image" if ext in IMAGE_EXTENSIONS else "audio" if ext in AUDIO_EXTENSIONS else "bytes"


__all__ = ["AUDIO_EXTENSIONS", "IMAGE_EXTENSIONS", "IMAGE_FITS", "MODALITIES", "SAMPLE_FORMATS", "AudioFormat",
           "ImageFormat", "Media", "kind_of", "parse_image_size", "parse_modality"]
