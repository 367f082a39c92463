"""What every endpoint handler shares: the engine, the served model's name and kind, the check of a request's `model`
field, and `Submission`, one engine request seen from asyncio, whose refusals become HTTP errors by their type."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from fastapi import Request

from ..errors import ContextLengthError, GenerationError
from ..generation import SamplingParams
from ..generation.engine import Engine, EngineFull, Output
from . import media as served
from .metrics import Metrics
from .protocol import ApiError

DISCONNECT_CHECK_S = 1.0  # how often a request asks whether its client is still there


@dataclass(frozen=True)
class ServerLimits:
    max_request_bytes: int = 1 << 20  # a request body larger than this gets 413
    retry_after_s: int = 1  # the Retry-After of a 429
    drain_timeout_s: float = 30.0  # on shutdown, running streams get this long to finish


class Submission:
    """One engine request seen from asyncio: the engine's thread hands outputs to the event loop."""

    def __init__(self, engine: Engine, prompt: bytes, params: SamplingParams, retry_after_s: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        try:
            self.req = engine.submit(prompt, params, self._put)
        except EngineFull as e:  # a GenerationError too: caught first
            raise ApiError(429, str(e), "rate_limit_error", code="server_busy",
                           headers={"Retry-After": str(retry_after_s)}) from e
        except ContextLengthError as e:
            raise ApiError(400, str(e), code="context_length_exceeded") from e
        except GenerationError as e:
            raise ApiError(400, str(e)) from e

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


class Serving:
    """The base of the endpoint handlers: one served model over one engine."""

    def __init__(self, engine: Engine, model_name: str, metrics: Metrics, limits: ServerLimits) -> None:
        self.engine, self.model_name, self.metrics, self.limits = engine, model_name, metrics, limits
        self.media = engine.model.config.media  # None (bytes), an ImageFormat or an AudioFormat

    def check_model(self, body, want: str) -> None:
        """A 404 for another model's name, a 400 when this model does not make what the endpoint gives."""
        if body.model not in (None, self.model_name):
            raise ApiError(404, f"model {body.model!r} is not served here; this server has {self.model_name!r}",
                           param="model", code="model_not_found")
        served.require(self.media, want)

    def submit(self, prompt: bytes, params: SamplingParams) -> Submission:
        return Submission(self.engine, prompt, params, self.limits.retry_after_s)

    def submit_all(self, jobs: list[tuple[bytes, SamplingParams]], field: str) -> list[Submission]:
        """One engine request per (prompt, params), all admitted or none: a 429 (or a 400 for one of them) cancels
        the ones already queued. More than the engine ever holds at once is a 400 naming `field`."""
        most = self.engine.max_streams + self.engine.max_queue
        if len(jobs) > most:
            raise ApiError(400, f"{field}: this server runs at most {most} streams at once (running and queued), "
                                f"got {len(jobs)}", param=field)
        subs: list[Submission] = []
        try:
            for prompt, params in jobs:
                subs.append(self.submit(prompt, params))
        except ApiError:
            for sub in subs:
                sub.req.cancel()
            raise
        return subs

    def observe_ttfb(self, sub: Submission) -> None:
        if sub.req.first_byte_at is not None:
            self.metrics.ttfb.observe(sub.req.first_byte_at - sub.req.arrived)
