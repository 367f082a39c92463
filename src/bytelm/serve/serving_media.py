"""POST /v1/images/generations (OpenAI's: PNGs) and /v1/audio/generations (bytelm's: WAVs) for an image or audio
model: a request, checked field by field in media.py, becomes `n` engine streams of one length, each with its own
seed, that decode in one batch; the answer is every output whole, or an error, never a partial image or clip."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import Response

from ..data import files
from ..generation import SamplingParams
from ..generation.engine import Output
from . import media as served
from .protocol import ApiError, AudioGenerationRequest, ImageGenerationRequest
from .serving import Serving, Submission

MediaRequest = ImageGenerationRequest | AudioGenerationRequest


class MediaServing(Serving):
    def params(self, body: MediaRequest, n_bytes: int, seed: int) -> SamplingParams:
        return SamplingParams(max_new_bytes=n_bytes, temperature=body.temperature, top_k=body.top_k,
                              top_p=None if body.top_p >= 1 else body.top_p, seed=seed)

    async def generate_n(self, request: Request, body: MediaRequest, prompt: bytes, n_bytes: int
                         ) -> list[tuple[bytes, int]] | Response:
        """body.n streams of n_bytes each after `prompt`, one engine request each (they decode in one batch): the
        bytes and seed of each, in order; or a 499 when the client has gone. All are admitted or none (429); one that
        fails fails the request (500), the others cancelled: never a partial image or clip."""
        most = self.engine.max_streams + self.engine.max_queue
        if body.n > most:
            raise ApiError(400, f"n: this server runs at most {most} streams at once (running and queued), got "
                                f"{body.n}", param="n")
        subs: list[Submission] = []
        seeds = served.seeds(body.seed, body.n)
        try:
            for seed in seeds:
                subs.append(self.submit(prompt, self.params(body, n_bytes, seed)))
        except ApiError:
            for sub in subs:
                sub.req.cancel()
            raise

        async def collect(sub: Submission) -> tuple[bytes, Output | None]:
            data, last = bytearray(), None
            async for last in sub.outputs(request):
                data += last.data
                if last.finish_reason == "error":
                    for other in subs:
                        other.req.cancel()
            return bytes(data), last

        got = await asyncio.gather(*(collect(sub) for sub in subs))
        for sub in subs:
            self.observe_ttfb(sub)
        failed = next((last for _, last in got if last is not None and last.finish_reason == "error"), None)
        if failed is not None:
            raise ApiError(500, f"generation failed: {failed.error}", "server_error")
        if any(last is None or last.finish_reason != "length" for _, last in got):
            return Response(status_code=499)  # the client has gone
        if any(len(data) != n_bytes for data, _ in got):
            raise ApiError(500, f"generation failed: a stream ended short of its {n_bytes} bytes", "server_error")
        return [(data, seed) for (data, _), seed in zip(got, seeds, strict=True)]


class ServingImages(MediaServing):
    async def create(self, body: ImageGenerationRequest, request: Request):
        """OpenAI's image generation: n whole images (or completions of the top rows of `image`), each a PNG."""
        self.check_model(body, "image")
        fmt = self.media
        prompt = served.image_prompt(body, fmt)
        made = await self.generate_n(request, body, prompt, fmt.seq_len - len(prompt))
        if isinstance(made, Response):
            return made
        pngs = await asyncio.to_thread(lambda: [files.to_file(prompt + data, fmt) for data, _ in made])
        return {"created": int(time.time()), "data": [{"b64_json": served.to_b64(png), "seed": seed}
                                                      for png, (_, seed) in zip(pngs, made, strict=True)],
                "size": served.image_size(fmt), "output_format": "png", "usage": media_usage(prompt, made)}


class ServingAudio(MediaServing):
    async def create(self, body: AudioGenerationRequest, request: Request):
        """bytelm's audio generation: n clips from nothing (or continuing `audio`), each a WAV of the model's rate and
        sample format."""
        self.check_model(body, "audio")
        fmt = self.media
        prompt, context, n = served.audio_request(body, fmt, self.engine.max_len)
        made = await self.generate_n(request, body, context, n)
        if isinstance(made, Response):
            return made
        keep = prompt if body.echo else b""
        wavs = await asyncio.to_thread(lambda: [files.to_file(keep + data, fmt) for data, _ in made])
        return {"created": int(time.time()), "data": [{"b64_json": served.to_b64(wav), "seed": seed}
                                                      for wav, (_, seed) in zip(wavs, made, strict=True)],
                "output_format": "wav", "sample_rate": fmt.sample_rate, "sample_format": fmt.sample_format,
                "usage": media_usage(context, made)}


def media_usage(prompt: bytes, made: list[tuple[bytes, int]]) -> dict:
    """The images API's usage, in bytes over all n streams: the prompt bytes each read, the bytes each made."""
    read, out = len(prompt) * len(made), sum(len(data) for data, _ in made)
    return {"input_tokens": read, "output_tokens": out, "total_tokens": read + out,
            "input_tokens_details": {"image_tokens": read, "text_tokens": 0}}
