"""The FastAPI application: OpenAI's /v1/completions and /v1/chat/completions (streamed as server-sent events or
not) and vLLM's /tokenize, /detokenize and /tokenizer_info for a bytes model, OpenAI's /v1/images/generations (PNGs)
for an image model, bytelm's /v1/audio/generations (WAVs) for an audio model, /v1/models, /health and /metrics, over
one `Engine` that batches every stream of every request; and a page to try the model in a browser at /
(serving_playground.py). An endpoint asked of a model that makes something else is a 400 naming the endpoint that fits.

Each endpoint has its handler (serving_*.py), which turns its typed request (protocol.py) into `SamplingParams` and
the engine's outputs into its typed response; this module only wires routes to them.

Faults are answered, never crashed on (a schemathesis run from /openapi.json is a test): a bad body is a 400 with
OpenAI's error shape naming the field, a wrong or missing key a 401 (checked before the body is read, middleware.py),
a prompt that does not fit the context a 400, a full engine a 429 with Retry-After, an oversized body a 413, a body
that stops arriving a 408, a foreign Host on a loopback server a 400. A client that goes away cancels its request,
streamed or not, and the engine frees its slot at its next step. POST /v1/responses is a 404 naming the endpoint to
use instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..generation.engine import Engine
from .metrics import Metrics, route_label
from .middleware import Guard
from .protocol import (
    ApiError,
    AudioGenerationRequest,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ImageGenerationRequest,
    TokenizeRequest,
    error_body,
)
from .serving import ServerLimits
from .serving_chat import ServingChat
from .serving_completion import ServingCompletion
from .serving_media import ServingAudio, ServingImages
from .serving_models import ServingHealth, ServingModels
from .serving_playground import Playground
from .serving_tokenize import ServingDetokenize, ServingTokenize, ServingTokenizerInfo

DEFAULT_LIMITS = ServerLimits()


def create_app(engine: Engine, model_name: str, api_key: str | None = None,
               limits: ServerLimits = DEFAULT_LIMITS, allowed_hosts: tuple[str, ...] | None = None) -> FastAPI:
    """The server for one model. The app starts the engine's thread on startup and drains it on shutdown.
    api_key: required on every path but /health, /metrics, /openapi.json, / and /static/ (middleware.OPEN_PATHS).
    allowed_hosts: the `Host` names it answers to (None: any; `bytelm serve` on loopback: middleware.LOOPBACK_HOSTS
    and those of --allowed-hosts)."""
    metrics = Metrics(engine)
    served = (engine, model_name, metrics, limits)
    completion, chat = ServingCompletion(*served), ServingChat(*served)
    images, audio = ServingImages(*served), ServingAudio(*served)
    models, health = ServingModels(*served), ServingHealth(*served)
    playground = Playground()
    tokenizer_info, tokenize, detokenize = (ServingTokenizerInfo(*served), ServingTokenize(*served),
                                            ServingDetokenize(*served))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, True, limits.drain_timeout_s)

    app = FastAPI(title="bytelm", lifespan=lifespan, docs_url=None, redoc_url=None)
    def count(scope, code: int) -> None:
        metrics.requests.labels(route_label(scope, app.routes), str(code)).inc()

    app.add_middleware(Guard, limit=limits.max_request_bytes, timeout=limits.body_timeout_s, api_key=api_key,
                       allowed_hosts=allowed_hosts, count=count)
    answer_errors(app)

    @app.get("/", include_in_schema=False)  # the page holds no data: open, as are its assets; its API calls are keyed
    async def playground_route():
        return playground.page()

    @app.get("/static/{name}", include_in_schema=False)
    async def static_route(name: str):
        return playground.asset(name)

    @app.get("/health")
    async def health_route():
        return health.health()

    @app.get("/metrics")
    async def metrics_route():
        return health.metrics_page()

    @app.get("/v1/models")
    async def models_route():
        return models.list()

    @app.post("/v1/completions")
    async def completions_route(body: CompletionRequest, request: Request):
        return await completion.create(body, request)

    @app.post("/v1/chat/completions")
    async def chat_route(body: ChatCompletionRequest, request: Request):
        return await chat.create(body, request)

    # vLLM's paths (at the root, not under /v1): lm-evaluation-harness finds them there
    @app.get("/tokenizer_info")
    async def tokenizer_info_route():
        return tokenizer_info.info()

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest):
        return tokenize.tokenize(body)

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest):
        return detokenize.detokenize(body)

    @app.post("/v1/images/generations")
    async def images_route(body: ImageGenerationRequest, request: Request):
        return await images.create(body, request)

    @app.post("/v1/audio/generations")
    async def audio_route(body: AudioGenerationRequest, request: Request):
        return await audio.create(body, request)

    @app.post("/v1/responses", status_code=404, responses={404: {"description": "not served: see the message"}})
    async def responses_route():
        raise ApiError(404, "POST /v1/responses (OpenAI's Responses API) is not served by bytelm: use "
                       "/v1/chat/completions (or /v1/completions) instead", code="unsupported_endpoint")

    return app


def answer_errors(app: FastAPI) -> None:
    """Every error as OpenAI's error body: ours with their status, a body that does not parse as a 400 naming the
    field, starlette's (404, 405) as they are, anything else a 500 that names only the exception's type."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return ErrorResponse(e.body, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, e: RequestValidationError):
        errors = e.errors() or [{"loc": (), "msg": "invalid request"}]
        if errors[0].get("type") == "json_invalid":
            return ErrorResponse(error_body("the body is not valid JSON"), status_code=400)
        where, msg = invalid_field(errors)
        return ErrorResponse(error_body(f"{where or 'body'}: {msg}", param=where or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return ErrorResponse(error_body(str(e.detail), "invalid_request_error" if e.status_code < 500 else
                                        "server_error"), status_code=e.status_code, headers=e.headers)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        return ErrorResponse(error_body(f"internal error: {type(e).__name__}", "server_error"), status_code=500)


class ErrorResponse(JSONResponse):
    """JSON in ASCII: an error may quote what the client sent, lone surrogates included, which UTF-8 cannot encode
    (JSONResponse's ensure_ascii=False would then fail, a 500)."""

    def render(self, content) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode()


def invalid_field(errors: list[dict]) -> tuple[str, str]:
    """The field to name for a body that does not validate, as 'messages[0].content[1].text', and what is wrong.
    pydantic reports a union's failure once per member, tagged ('prompt', 'list[str]', 0): the tags are dropped and
    the deepest field is named (the member the value came closest to), with each member's complaint about it."""
    def field(loc) -> str:
        out = ""
        for x in loc:
            if isinstance(x, int):
                out += f"[{x}]"
            elif x != "body" and x.isidentifier() and x not in UNION_TAGS:
                out += f".{x}" if out else x
        return out

    fields = [field(err.get("loc", ())) for err in errors]
    deepest = max(fields, key=lambda f: f.count(".") + f.count("["))
    msgs = dict.fromkeys(str(err.get("msg")) for err, f in zip(errors, fields, strict=True) if f == deepest)
    return deepest, "; or ".join(msgs)


UNION_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none", "function-after"})


__all__ = ["ServerLimits", "create_app"]
