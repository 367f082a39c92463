"""Sound to raw sample bytes and back, through soundfile (libsndfile) and soxr (resampling).

A clip becomes mono samples at the format's rate (bytelm.data.media.AudioFormat): channels are averaged, other rates
resampled (soxr, high quality), and each sample written in the sample format: mu-law by libsndfile's G.711 encoder,
linear PCM by rounding. Writing the bytes back as a WAV of that format and reading it again gives the same bytes,
with one exception: mu-law has two codes for silence (0x7F and 0xFF); bytelm's encoding only uses 0xFF, and a
generated 0x7F is written as 0xFF (the same sound).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..errors import DataError, NoSamplesError
from .media import AudioFormat

_MULAW_ZERO, _MULAW_NEGATIVE_ZERO = 0xFF, 0x7F  # G.711's two codes for 0: libsndfile writes both, decodes both to 0
SUBTYPES = {"mulaw": "ULAW", "pcm8": "PCM_U8", "pcm16": "PCM_16"}  # libsndfile's names


def _sf():
    try:
        import soundfile
    except (ImportError, OSError):  # pragma: no cover - soundfile is a dependency of bytelm[media]
        raise DataError("audio needs soundfile: pip install 'bytelm[media]'") from None
    return soundfile


def probe(path: Path) -> int:
    """A sound file's sample rate (its header only); a file libsndfile cannot read is a DataError naming it."""
    sf = _sf()
    try:
        return int(sf.info(str(path)).samplerate)
    except (RuntimeError, sf.LibsndfileError, OSError) as e:
        raise DataError(f"cannot read audio {path}: {e}") from None


def _int16(x: np.ndarray) -> np.ndarray:
    """Samples in [-1, 1) (float) -> int16, rounded and clipped: exact for what was int16 (k / 32768) to begin with."""
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def encode(samples: np.ndarray, fmt: AudioFormat) -> np.ndarray:
    """Mono float samples in [-1, 1) at fmt's rate -> fmt's bytes (uint8, bytes_per_sample per sample)."""
    pcm = _int16(np.asarray(samples, dtype=np.float64))
    if fmt.sample_format == "pcm16":
        return pcm.astype("<i2").view(np.uint8)
    if fmt.sample_format == "pcm8":
        return ((pcm.astype(np.int32) + 32768 + 128) >> 8).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    _sf().write(buf, pcm, fmt.sample_rate, format="RAW", subtype="ULAW")
    out = np.frombuffer(buf.getvalue(), dtype=np.uint8).copy()
    out[out == _MULAW_NEGATIVE_ZERO] = _MULAW_ZERO  # one code for silence, so that bytes -> WAV -> bytes is exact
    return out


def decode(data: bytes | np.ndarray, fmt: AudioFormat) -> np.ndarray:
    """fmt's bytes -> int16 samples (a trailing partial sample is dropped)."""
    raw = np.frombuffer(bytes(data), dtype=np.uint8)
    raw = raw[: len(raw) - len(raw) % fmt.bytes_per_sample]
    if fmt.sample_format == "pcm16":
        return raw.view("<i2").astype(np.int16)
    if fmt.sample_format == "pcm8":
        return ((raw.astype(np.int16) - 128) << 8).astype(np.int16)
    if not len(raw):
        return np.zeros(0, np.int16)
    pcm, _ = _sf().read(io.BytesIO(raw.tobytes()), format="RAW", subtype="ULAW", samplerate=fmt.sample_rate,
                        channels=1, dtype="int16")
    return pcm


def _load(source, fmt: AudioFormat, where: str) -> np.ndarray:
    """A sound file (a path or a file object; WAV, FLAC, OGG, ... what libsndfile reads) -> fmt's bytes (uint8)."""
    sf = _sf()
    try:
        x, rate = sf.read(source, dtype="float64", always_2d=True)  # (frames, channels)
    except (RuntimeError, sf.LibsndfileError, OSError) as e:
        raise DataError(f"cannot read audio {where}: {e}") from None
    if not len(x):
        raise NoSamplesError(f"{where} holds no audio samples")
    x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    if rate != fmt.sample_rate:
        import soxr

        x = soxr.resample(x, rate, fmt.sample_rate, quality="HQ")
    return encode(x, fmt)


def read_audio(path: Path, fmt: AudioFormat) -> np.ndarray:
    """A sound file -> fmt's bytes (uint8)."""
    return _load(str(path), fmt, str(path))


def prompt_tail(prompt: bytes, room: int, fmt: AudioFormat) -> bytes:
    """The end of a prompt clip that fits in `room` bytes, cut at a sample: what a model whose context is shorter
    than prompt + new bytes reads of it."""
    if len(prompt) <= room:
        return prompt
    room -= room % fmt.bytes_per_sample
    return prompt[len(prompt) - room:]


def bytes_to_wav(data: bytes | np.ndarray, fmt: AudioFormat) -> bytes:
    """fmt's bytes -> the bytes of a WAV file of that rate and sample format."""
    buf = io.BytesIO()
    _sf().write(buf, decode(data, fmt), fmt.sample_rate, format="WAV", subtype=SUBTYPES[fmt.sample_format])
    return buf.getvalue()


def wav_to_bytes(wav: bytes, fmt: AudioFormat, where: str = "the audio") -> bytes:
    """A sound file's bytes (any format libsndfile reads) -> fmt's bytes."""
    return _load(io.BytesIO(wav), fmt, where).tobytes()
