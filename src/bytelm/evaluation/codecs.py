"""What a bits-per-byte number means beside real lossless codecs on the same raw bytes: the PNG and WebP files of
the same images, the FLAC files of the same clips (linear PCM: FLAC's predictor does not fit mu-law's codes, and
FLAC of the 16-bit samples they decode to is larger than the 8-bit codes), and xz over the whole split (every
modality).

Each image and each clip is compressed as a file of its own, headers included, as it would be stored; xz sees the
split as one stream, so it can use what images or files have in common. A codec's bits per byte is 8 x its output
bytes / the raw bytes; a model below a codec would, with arithmetic coding, store the data in fewer bits than it.
"""

from __future__ import annotations

import io
import lzma

import numpy as np

from ..data import ByteDataset
from ..data import audio as audio_io
from ..data.images import pixels_to_png, to_pil
from ..data.media import AudioFormat, ImageFormat

MAX_CODEC_BYTES = 64 << 20  # the codecs see at most the first 64 MiB (xz at preset 9 runs at ~1 MB/s)


def _parts(ds: ByteDataset, limit: int):
    """The dataset's parts (images, clips) up to `limit` bytes in all (the last one cut)."""
    seen = 0
    for p in ds.parts:
        if seen >= limit:
            return
        p = p[: limit - seen]
        seen += len(p)
        yield np.asarray(p)


def _webp(arr: np.ndarray, fmt: ImageFormat) -> int | None:
    from PIL import features

    if not features.check("webp") or fmt.channels == 2:  # WebP has no grey + alpha
        return None
    buf = io.BytesIO()
    to_pil(arr, fmt).save(buf, format="WEBP", lossless=True, quality=100, method=6)
    return len(buf.getvalue())


def _flac(arr: np.ndarray, fmt: AudioFormat) -> int:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, audio_io.decode(arr, fmt), fmt.sample_rate, format="FLAC",
             subtype="PCM_S8" if fmt.sample_format == "pcm8" else "PCM_16")
    return len(buf.getvalue())


def codec_bpb(ds: ByteDataset, limit: int = MAX_CODEC_BYTES) -> dict[str, float]:
    """Bits per byte of lossless codecs on the dataset's first `limit` bytes: {codec: bpb} (see the module doc)."""
    parts = list(_parts(ds, limit))
    raw = sum(len(p) for p in parts)
    if raw == 0:
        return {}
    sizes: dict[str, int | None] = {}
    media = ds.media
    if isinstance(media, ImageFormat):
        whole = [p for p in parts if len(p) == media.seq_len]  # an image cut by `limit` is no image
        raw_images = len(whole) * media.seq_len
        sizes["png"] = sum(len(pixels_to_png(p, media, optimize=True)) for p in whole)
        webp = [_webp(p, media) for p in whole]
        sizes["webp"] = None if None in webp else sum(webp)  # type: ignore[arg-type]
        out = {k: 8 * v / raw_images for k, v in sizes.items() if v is not None and raw_images}
    elif isinstance(media, AudioFormat) and media.sample_format != "mulaw":  # FLAC codes linear PCM, not mu-law
        out = {"flac": 8 * sum(_flac(p, media) for p in parts) / raw}
    else:
        out = {}
    xz = lzma.LZMACompressor(preset=9 | lzma.PRESET_EXTREME)
    n = sum(len(xz.compress(p.tobytes())) for p in parts) + len(xz.flush())
    return {**out, "xz": 8 * n / raw}


def per_unit(bpb: float, media) -> dict[str, float]:
    """A bits-per-byte figure in the units of its modality: bits per pixel, or bits per sample and kbit/s."""
    if isinstance(media, ImageFormat):
        return {"bits_per_pixel": bpb * media.channels}
    if isinstance(media, AudioFormat):
        return {"bits_per_sample": bpb * media.bytes_per_sample, "kbit_per_s": bpb * media.bytes_per_second / 1000}
    return {}
