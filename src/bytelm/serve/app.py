"""The FastAPI application: OpenAI's /v1/completions and /v1/chat/completions (streamed as server-sent events or
not) for a bytes model, OpenAI's /v1/images/generations (PNGs) for an image model, bytelm's /v1/audio/generations
(WAVs) for an audio model, /v1/models, /health and /metrics, over one `Engine` that batches every stream of every
request. An endpoint asked of a model that makes something else is a 400 naming the endpoint that fits.

Faults are answered, never crashed on: a bad body is a 400 with OpenAI's error shape, a wrong or missing key a 401, a
prompt that does not fit the context a 400, a full engine a 429 with Retry-After, an oversized body a 413. A client
that goes away mid-stream cancels its request, and the engine frees its slot at its next step.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import secrets
import time
from dataclasses import dataclass

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from ..data import files
from ..errors import GenerationError
from ..generation.engine import ByteLogprob, Engine, EngineFull, Output, SamplingParams
from . import media as served
from .metrics import Metrics
from .protocol import (
    CHAT_STOP,
    ApiError,
    AudioGenerationRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ImageGenerationRequest,
    byte_token,
    chat_prompt,
    error_body,
)

DISCONNECT_CHECK_S = 1.0  # how often a request asks whether its client is still there


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 1 << 20  # a request body larger than this gets 413
    retry_after_s: int = 1  # the Retry-After of a 429
    drain_timeout_s: float = 30.0  # on shutdown, running streams get this long to finish


class Guard:
    """Pure ASGI middleware (it leaves streaming and disconnects alone, unlike BaseHTTPMiddleware): counts responses
    by path and status, and refuses a body over the limit with 413 before it is read (Content-Length) or as soon as
    it passes the limit (a chunked body)."""

    def __init__(self, app, limit: int, count) -> None:
        self.app, self.limit, self.count = app, limit, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(msg):
            if msg["type"] == "http.response.start":
                self.count(scope["path"], msg["status"])
            await send(msg)

        await self._guarded(scope, receive, counted)

    async def _guarded(self, scope, receive, send):
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            body = json.dumps(error_body(f"request body over the server's limit of {self.limit} bytes",
                                         code="request_too_large")).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
            return await send({"type": "http.response.body", "body": body})
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"request body over the server's limit of {self.limit} bytes")
            return msg

        await self.app(scope, limited, send)


class Submission:
    """One engine request seen from asyncio: the engine's thread hands outputs to the event loop."""

    def __init__(self, engine: Engine, prompt: bytes, params: SamplingParams, retry_after_s: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        try:
            self.req = engine.submit(prompt, params, self._put)
        except EngineFull as e:
            raise ApiError(429, str(e), "rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(retry_after_s)}) from e
        except GenerationError as e:
            raise ApiError(400, str(e), code="context_length_exceeded" if "max_seq_len" in str(e) else None) from e

    def _put(self, out: Output) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)

    async def outputs(self, request: Request):
        """The outputs until the last; a client that disconnects cancels the request (it is asked every second, also
        while outputs keep coming: a non-streamed request, an image, sends nothing that would fail before the end)."""
        checked = time.monotonic()
        try:
            while True:
                try:
                    out = await asyncio.wait_for(self.queue.get(), timeout=DISCONNECT_CHECK_S)
                except asyncio.TimeoutError:
                    out = None
                if out is None or time.monotonic() - checked >= DISCONNECT_CHECK_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if out is None:
                    continue
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            self.req.cancel()  # a no-op once finished; otherwise the slot is freed at the engine's next step


def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               limits: ServerLimits = ServerLimits()) -> FastAPI:
    """The server for one model. The app starts the engine's thread on startup and drains it on shutdown."""
    metrics = Metrics(engine)
    max_len = engine.max_len
    media = engine.model.config.media  # None (bytes), an ImageFormat or an AudioFormat

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, True, limits.drain_timeout_s)

    app = FastAPI(title="bytelm", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(Guard, limit=limits.max_request_bytes,
                       count=lambda path, code: metrics.requests.labels(path, str(code)).inc())

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not secrets.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body("the body is not valid JSON"), status_code=400)
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse(error_body(f"{where or 'body'}: {first.get('msg')}", param=where or None),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error" if e.status_code < 500 else
                                       "server_error"), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "active_streams": engine.active, "queue_length": engine.queued}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "bytelm", "max_model_len": max_len,
                                            "modality": served.modality(media)}]}

    def check_model(body, want: str) -> None:
        """A 404 for another model's name, a 400 when this model does not make what the endpoint gives."""
        if body.model not in (None, model_name):
            raise ApiError(404, f"model {body.model!r} is not served here; this server has {model_name!r}",
                           param="model", code="model_not_found")
        served.require(media, want)

    def params_of(body, prompt: bytes, max_new: int | None, logprobs: int | None, stops: tuple[bytes, ...]):
        check_model(body, "bytes")
        field = body.unsupported()
        if field is not None:
            raise ApiError(400, f"{field}: not supported by this server", param=field)
        if max_new is None:  # as much as the context holds
            max_new = max(0, max_len - len(prompt))
        return SamplingParams(max_new_bytes=max_new, temperature=body.temperature, top_k=body.top_k,
                              top_p=None if body.top_p >= 1 else body.top_p, seed=body.seed, stop=stops,
                              logprobs=logprobs)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        prompt = body.prompt_bytes()
        params = params_of(body, prompt, body.max_tokens, body.logprobs, body.stops())
        return await respond(request, body, prompt, params, chat=False)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        prompt = chat_prompt(body.messages)
        max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        n_top = (body.top_logprobs or 0) if body.logprobs else None
        params = params_of(body, prompt, max_new, n_top, body.stops() + (CHAT_STOP.encode(),))
        return await respond(request, body, prompt, params, chat=True)

    async def respond(request: Request, body, prompt: bytes, params: SamplingParams, chat: bool):
        sub = Submission(engine, prompt, params, limits.retry_after_s)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(request, sub, head, len(prompt), chat, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        data, lps, last = [], [], None
        async for last in sub.outputs(request):
            data.append(last.data)
            lps.extend(last.logprobs or ())
        if last is None or last.finish_reason == "cancelled":
            return Response(status_code=499)  # the client has gone
        observe_ttfb(sub)
        if last.finish_reason == "error":
            raise ApiError(500, f"generation failed: {last.error}", "server_error")
        text = b"".join(data).decode("utf-8", errors="replace")
        lp = logprobs_json(lps, chat, 0) if params.logprobs is not None else None
        choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": lp}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        return {**head, "choices": [choice], "usage": usage(len(prompt), last.generated)}

    @app.post("/v1/images/generations", dependencies=[Depends(check_key)])
    async def image_generations(body: ImageGenerationRequest, request: Request):
        """OpenAI's image generation: n whole images (or completions of the top rows of `image`), each a PNG."""
        check_model(body, "image")
        prompt = served.image_prompt(body, media)
        made = await generate_n(request, body, prompt, media.seq_len - len(prompt))
        if isinstance(made, Response):
            return made
        pngs = await asyncio.to_thread(lambda: [files.to_file(prompt + data, media) for data, _ in made])
        return {"created": int(time.time()), "data": [{"b64_json": served.to_b64(png), "seed": seed}
                                                      for png, (_, seed) in zip(pngs, made, strict=True)],
                "size": served.image_size(media), "output_format": "png", "usage": media_usage(prompt, made)}

    @app.post("/v1/audio/generations", dependencies=[Depends(check_key)])
    async def audio_generations(body: AudioGenerationRequest, request: Request):
        """bytelm's audio generation: n clips from nothing (or continuing `audio`), each a WAV of the model's rate and
        sample format."""
        check_model(body, "audio")
        prompt, context, n = served.audio_request(body, media, max_len)
        made = await generate_n(request, body, context, n)
        if isinstance(made, Response):
            return made
        keep = prompt if body.echo else b""
        wavs = await asyncio.to_thread(lambda: [files.to_file(keep + data, media) for data, _ in made])
        return {"created": int(time.time()), "data": [{"b64_json": served.to_b64(wav), "seed": seed}
                                                      for wav, (_, seed) in zip(wavs, made, strict=True)],
                "output_format": "wav", "sample_rate": media.sample_rate, "sample_format": media.sample_format,
                "usage": media_usage(context, made)}

    async def generate_n(request: Request, body, prompt: bytes, n_bytes: int) -> list[tuple[bytes, int]] | Response:
        """body.n streams of n_bytes each after `prompt`, one engine request each (they decode in one batch): the
        bytes and seed of each, in order; or a 499 when the client has gone. All are admitted or none (429); one that
        fails fails the request (500), the others cancelled: never a partial image or clip."""
        if body.n > engine.max_streams + engine.max_queue:
            raise ApiError(400, f"n: this server runs at most {engine.max_streams + engine.max_queue} streams at "
                                f"once (running and queued), got {body.n}", param="n")
        subs: list[Submission] = []
        seeds = served.seeds(body.seed, body.n)
        try:
            for seed in seeds:
                params = SamplingParams(max_new_bytes=n_bytes, temperature=body.temperature, top_k=body.top_k,
                                        top_p=None if body.top_p >= 1 else body.top_p, seed=seed)
                subs.append(Submission(engine, prompt, params, limits.retry_after_s))
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
            observe_ttfb(sub)
        failed = next((last for _, last in got if last is not None and last.finish_reason == "error"), None)
        if failed is not None:
            raise ApiError(500, f"generation failed: {failed.error}", "server_error")
        if any(last is None or last.finish_reason != "length" for _, last in got):
            return Response(status_code=499)  # the client has gone
        if any(len(data) != n_bytes for data, _ in got):
            raise ApiError(500, f"generation failed: a stream ended short of its {n_bytes} bytes", "server_error")
        return [(data, seed) for (data, _), seed in zip(got, seeds, strict=True)]

    def observe_ttfb(sub: Submission) -> None:
        if sub.req.first_byte_at is not None:
            metrics.ttfb.observe(sub.req.first_byte_at - sub.req.arrived)

    async def sse(request: Request, sub: Submission, head: dict, prompt_len: int, chat: bool, include_usage: bool):
        """OpenAI's stream: `data: {chunk}` events, text always whole UTF-8 characters, then `data: [DONE]`."""
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        offset, first = 0, True

        def event(choice: dict, **extra) -> str:
            payload = {**head, "choices": [choice], **extra}
            if include_usage:
                payload.setdefault("usage", None)
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        if chat:
            yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None})
        last = None
        async for last in sub.outputs(request):
            if last.finish_reason == "error":
                yield f"data: {json.dumps(error_body(f'generation failed: {last.error}', 'server_error'))}\n\n"
                return
            if last.finish_reason == "cancelled":
                return
            if first and last.data:
                observe_ttfb(sub)
                first = False
            text = decoder.decode(last.data, final=last.finish_reason is not None)  # holds a partial character
            if not (text or last.logprobs or last.finish_reason):
                continue
            lp = logprobs_json(last.logprobs, chat, offset) if last.logprobs is not None else None
            offset += len(last.data)
            choice = {"index": 0, "logprobs": lp, "finish_reason": last.finish_reason}
            choice.update({"delta": {"content": text} if text else {}} if chat else {"text": text})
            yield event(choice)
        if last is None:
            return
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(prompt_len, last.generated)})}\n\n"
        yield "data: [DONE]\n\n"

    return app


def media_usage(prompt: bytes, made: list[tuple[bytes, int]]) -> dict:
    """The images API's usage, in bytes over all n streams: the prompt bytes each read, the bytes each made."""
    read, out = len(prompt) * len(made), sum(len(data) for data, _ in made)
    return {"input_tokens": read, "output_tokens": out, "total_tokens": read + out,
            "input_tokens_details": {"image_tokens": read, "text_tokens": 0}}


def usage(prompt_bytes: int, generated: int) -> dict:
    """Usage in bytes: a byte is this model's token."""
    return {"prompt_tokens": prompt_bytes, "completion_tokens": generated, "total_tokens": prompt_bytes + generated}


def logprobs_json(lps: tuple[ByteLogprob, ...] | list[ByteLogprob], chat: bool, offset: int) -> dict:
    """OpenAI's logprobs: chat's `content` list (with `bytes`), or completions' parallel lists."""
    if chat:
        return {"content": [{"token": byte_token(x.byte), "logprob": x.logprob, "bytes": [x.byte],
                             "top_logprobs": [{"token": byte_token(b), "logprob": v, "bytes": [b]} for b, v in x.top]}
                            for x in lps]}
    return {"tokens": [byte_token(x.byte) for x in lps], "token_logprobs": [x.logprob for x in lps],
            "top_logprobs": [{byte_token(b): v for b, v in x.top} for x in lps],
            "text_offset": list(range(offset, offset + len(lps)))}
