"""A model's bytes as the file a person opens, and back: PNG for an image model, WAV for an audio model."""

from __future__ import annotations

from ..errors import DataError
from . import audio, images
from .media import AudioFormat, ImageFormat, Media


def suffix(media: Media) -> str:
    """The file extension of what `to_file` writes for `media`."""
    return ".png" if isinstance(media, ImageFormat) else ".wav" if isinstance(media, AudioFormat) else ""


def to_file(data: bytes, media: Media) -> bytes:
    """Raw pixels or samples -> the bytes of a PNG or WAV file of the model's shape, rate and sample format."""
    if isinstance(media, ImageFormat):
        return images.pixels_to_png(data, media)
    if isinstance(media, AudioFormat):
        return audio.bytes_to_wav(data, media)
    raise DataError("plain bytes have no file format of their own")


def from_file(blob: bytes, media: Media, where: str) -> bytes:
    """A PNG (or any image Pillow reads) or a sound file -> the model's raw pixels or samples (channels, rate and
    sample format converted; an image must already have the model's size)."""
    if isinstance(media, ImageFormat):
        return images.png_to_pixels(blob, media, where=where)
    if isinstance(media, AudioFormat):
        return audio.wav_to_bytes(blob, media, where)
    raise DataError("plain bytes have no file format of their own")
