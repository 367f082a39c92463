"""The FastAPI application: OpenAI's /v1/completions and /v1/chat/completions (streamed as server-sent events or
not), /v1/models, /health and /metrics, over one `Engine` that batches every stream of every request.

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

from ..errors import GenerationError
from ..generation.engine import ByteLogprob, Engine, EngineFull, Output, SamplingParams
from .metrics import Metrics
from .protocol import (
    CHAT_STOP,
    ChatCompletionRequest,
    CompletionRequest,
    byte_token,
    chat_prompt,
    error_body,
)


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 1 << 20  # a request body larger than this gets 413
    retry_after_s: int = 1  # the Retry-After of a 429
    drain_timeout_s: float = 30.0  # on shutdown, running streams get this long to finish


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


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
        """The outputs until the last; a client that disconnects cancels the request."""
        try:
            while True:
                try:
                    out = await asyncio.wait_for(self.queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
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
                                            "owned_by": "bytelm", "max_model_len": max_len}]}

    def params_of(body, prompt: bytes, max_new: int | None, logprobs: int | None, stops: tuple[bytes, ...]):
        if body.model not in (None, model_name):
            raise ApiError(404, f"model {body.model!r} is not served here; this server has {model_name!r}",
                           param="model", code="model_not_found")
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
