"""What the image and audio endpoints make of a request: the model's kind checked, the prompt (the top rows of an
image, the start of a clip) decoded from base64, the bytes to generate, a seed for each output. Every fault is an
`ApiError` (400) naming its field, raised before anything is submitted to the engine.
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets

from ..data import AudioFormat, ImageFormat, Media
from ..data import audio as audio_data
from ..data import images as image_data
from ..errors import DataError, NoSamplesError, PromptRowsError
from .protocol import MAX_SEED, ApiError, AudioGenerationRequest, ImageGenerationRequest

ENDPOINTS = {"bytes": "POST /v1/completions or /v1/chat/completions", "image": "POST /v1/images/generations",
             "audio": "POST /v1/audio/generations"}


def kind(media: Media) -> str:
    return "bytes" if media is None else media.kind


def modality(media: Media) -> str:
    """The model's modality spec: `bytes`, `image:HxWxC` or `audio:RATE:FORMAT`."""
    return "bytes" if media is None else media.spec


def describe(media: Media) -> str:
    """What a model makes, in OpenAI's terms (an image's size WIDTHxHEIGHT), with its modality spec."""
    if media is None:
        return "text and other bytes (modality `bytes`)"
    if isinstance(media, ImageFormat):
        return f"{image_size(media)} images (WIDTHxHEIGHT; modality `{media.spec}`)"
    return f"{media.describe()} (modality `{media.spec}`)"


def require(media: Media, want: str) -> None:
    """A 400 unless the model makes `want` (bytes, image or audio), saying what it makes and where to ask for it."""
    got = kind(media)
    if got == want:
        return
    nouns = {"bytes": "text", "image": "images", "audio": "sound"}
    made = {"bytes": "bytes", "image": "pixels", "audio": "sound samples"}
    raise ApiError(400, f"this model makes {describe(media)}, not {nouns[want]}: its output is {made[got]}; use "
                        f"{ENDPOINTS[got]}", param="model", code="unsupported_modality")


def check_common(body: ImageGenerationRequest | AudioGenerationRequest, media: ImageFormat | AudioFormat) -> None:
    """What both endpoints refuse: a text prompt, a URL response, streaming and fields this server cannot honour."""
    if body.prompt.strip():
        how = ("completes the top rows of one; leave prompt empty, or send those rows as `image` (base64 PNG)"
               if media.kind == "image" else "continues a clip; leave prompt empty, or send the clip as `audio` "
               "(base64 WAV)")
        raise ApiError(400, f"prompt: this {media.kind} model is not text-conditioned (it makes "
                            f"{'images' if media.kind == 'image' else 'sound'} from nothing, or {how})",
                       param="prompt")
    if body.response_format == "url":
        raise ApiError(400, "response_format: 'url' is not supported (this server hosts no files); use 'b64_json'",
                       param="response_format")
    field = body.unsupported()
    if field is not None:
        raise ApiError(400, f"{field}: not supported by this server", param=field)


_DATA_URL = re.compile(r"data:[\w.+/-]*(;[\w=.+-]+)*;base64,", re.ASCII)


def b64_file(text: str, param: str) -> bytes:
    """A file sent as base64 (or as a `data:...;base64,` URL); a 400 naming `param` when it is not."""
    m = _DATA_URL.match(text)
    body = text[m.end():] if m else text
    try:
        blob = base64.b64decode(re.sub(r"\s+", "", body), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: not valid base64 (send the file's bytes base64-encoded)", param=param) from None
    if not blob:
        raise ApiError(400, f"{param}: empty", param=param)
    return blob


def image_size(fmt: ImageFormat) -> str:
    """The model's size as OpenAI writes one: WIDTHxHEIGHT."""
    return f"{fmt.width}x{fmt.height}"


def image_prompt(body: ImageGenerationRequest, fmt: ImageFormat) -> bytes:
    """The prompt pixels of an image request (nothing, or the top rows of `image`), every field checked."""
    check_common(body, fmt)
    if body.size not in (None, "auto", image_size(fmt)):
        raise ApiError(400, f"size: this model makes {image_size(fmt)} images (WIDTHxHEIGHT: {fmt.width} pixels wide, "
                            f"{fmt.height} rows), got {body.size!r}; send size {image_size(fmt)!r} or leave it out",
                       param="size")
    if body.image is None:
        if body.prompt_rows is not None:
            raise ApiError(400, "prompt_rows: send the image whose top rows to keep as `image`", param="prompt_rows")
        return b""
    blob = b64_file(body.image, "image")
    try:
        return image_data.top_rows_of(blob, fmt, body.prompt_rows, where="the image", rows_name="prompt_rows")
    except DataError as e:
        raise ApiError(400, str(e), param="prompt_rows" if isinstance(e, PromptRowsError) else "image") from None


def audio_request(body: AudioGenerationRequest, fmt: AudioFormat, max_len: int) -> tuple[bytes, bytes, int]:
    """(the prompt clip, the part of it the model reads, bytes to generate) of an audio request, every field
    checked. A prompt longer than the context leaves room for the new bytes: the model reads its end."""
    check_common(body, fmt)
    if body.seconds is not None and body.max_bytes is not None:
        raise ApiError(400, "seconds: give seconds or max_bytes, not both", param="seconds")
    prompt = b""
    if body.audio is not None:
        try:
            prompt = audio_data.wav_to_bytes(b64_file(body.audio, "audio"), fmt, "the clip")
        except NoSamplesError:
            raise ApiError(400, "audio: cannot read the clip as a sound file (WAV, FLAC, OGG, ...): it holds no "
                                "samples", param="audio") from None
        except DataError as e:  # libsndfile names the file object: keep its reason only
            why = str(e).rsplit(": ", 1)[-1]
            raise ApiError(400, f"audio: cannot read the clip as a sound file (WAV, FLAC, OGG, ...): {why}",
                           param="audio") from None
    bps = fmt.bytes_per_sample
    if body.max_bytes is not None:
        n, param = body.max_bytes, "max_bytes"
        if n % bps:
            raise ApiError(400, f"max_bytes: {n} is not a whole number of {fmt.sample_format} samples ({bps} bytes "
                                "each)", param=param)
    elif body.seconds is not None:
        n, param = round(body.seconds * fmt.sample_rate) * bps, "seconds"
        if n == 0:
            raise ApiError(400, f"seconds: {body.seconds} s is less than one sample at {fmt.sample_rate:,} Hz",
                           param=param)
    else:  # 1 s, or what the context holds: after a short prompt all the rest, after a long one half the context
        n, param = min(fmt.bytes_per_second, max_len - min(len(prompt), max_len // 2)), "seconds"
        n -= n % bps
    most = max_len - (bps if prompt else 0)
    if n > most:
        after = " after a prompt" if prompt else ""
        raise ApiError(400, f"{param}: {n:,} bytes ({n / fmt.bytes_per_second:.3g} s) do not fit this model's context "
                            f"of {max_len:,} bytes: generate at most {most - most % bps:,} bytes "
                            f"({(most - most % bps) / fmt.bytes_per_second:.3g} s){after}", param=param,
                       code="context_length_exceeded")
    return prompt, audio_data.prompt_tail(prompt, max_len - n, fmt), n


def seeds(seed: int | None, n: int) -> list[int]:
    """A seed for each of n outputs: (seed + i) mod 2**64, from a random seed when none is given (each output's is
    returned, so that any one of them can be made again alone)."""
    base = secrets.randbits(63) if seed is None else seed
    return [(base + i) % (MAX_SEED + 1) for i in range(n)]


def to_b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode("ascii")
