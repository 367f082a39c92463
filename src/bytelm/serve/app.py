"""The FastAPI application: OpenAI's /v1/completions and /v1/chat/completions (streamed as server-sent events or
not) and vLLM's /tokenize, /detokenize and /tokenizer_info for a bytes model, OpenAI's /v1/images/generations (PNGs)
for an image model, bytelm's /v1/audio/generations (WAVs) for an audio model, /v1/models, /health and /metrics, over
one `Engine` that batches every stream of every request; and a page to try the model in a browser at /
(serving_playground.py). An endpoint asked of a model that makes something else is a 400 naming the endpoint that fits.

Each endpoint has its handler (serving_*.py), which turns its typed request (protocol.py) into `SamplingParams` and
the engine's outputs into its typed response; this module only wires routes to them.

Faults are answered, never crashed on: a bad body is a 400 with OpenAI's error shape, a wrong or missing key a 401, a
prompt that does not fit the context a 400, a full engine a 429 with Retry-After, an oversized body a 413. A client
that goes away mid-stream cancels its request, and the engine frees its slot at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..generation.engine import Engine
from .metrics import Metrics
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
               limits: ServerLimits = DEFAULT_LIMITS) -> FastAPI:
    """The server for one model. The app starts the engine's thread on startup and drains it on shutdown."""
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
    app.add_middleware(Guard, limit=limits.max_request_bytes,
                       count=lambda path, code: metrics.requests.labels(path, str(code)).inc())
    answer_errors(app)
    keyed = [Depends(key_check(api_key))]  # /health and /metrics stay open: probes and scrapers hold no key

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

    @app.get("/v1/models", dependencies=keyed)
    async def models_route():
        return models.list()

    @app.post("/v1/completions", dependencies=keyed)
    async def completions_route(body: CompletionRequest, request: Request):
        return await completion.create(body, request)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_route(body: ChatCompletionRequest, request: Request):
        return await chat.create(body, request)

    # vLLM's paths (at the root, not under /v1): lm-evaluation-harness finds them there
    @app.get("/tokenizer_info", dependencies=keyed)
    async def tokenizer_info_route():
        return tokenizer_info.info()

    @app.post("/tokenize", dependencies=keyed)
    async def tokenize_route(body: TokenizeRequest):
        return tokenize.tokenize(body)

    @app.post("/detokenize", dependencies=keyed)
    async def detokenize_route(body: DetokenizeRequest):
        return detokenize.detokenize(body)

    @app.post("/v1/images/generations", dependencies=keyed)
    async def images_route(body: ImageGenerationRequest, request: Request):
        return await images.create(body, request)

    @app.post("/v1/audio/generations", dependencies=keyed)
    async def audio_route(body: AudioGenerationRequest, request: Request):
        return await audio.create(body, request)

    return app


def key_check(api_key: str | None):
    """The dependency that refuses a request without `Authorization: Bearer API_KEY` (none: every request passes)."""

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not secrets.compare_digest(got.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")

    return check_key


def answer_errors(app: FastAPI) -> None:
    """Every error as OpenAI's error body: ours with their status, a body that does not parse as a 400 naming the
    field, starlette's (404, 405) as they are, anything else a 500 that names only the exception's type."""

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


__all__ = ["ServerLimits", "create_app"]
