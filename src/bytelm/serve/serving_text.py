"""What /v1/completions and /v1/chat/completions share: a typed request becomes prompts and `SamplingParams`, and
the engine's outputs become OpenAI's response, whole or as server-sent events. Each endpoint's handler
(serving_completion.py, serving_chat.py) says only what differs: its request's fields and its response's shape.

A request may hold several prompts (completions: `prompt` as a list): one engine request each, all decoded in the
same batch, one choice each with its `index`; streamed events carry their choice's index, and usage sums them all.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from ..errors import GenerationError
from ..generation import JsonSchema, SamplingParams
from ..generation.engine import ByteLogprob, Output
from .protocol import EOT_TEXT, ApiError, ChatCompletionRequest, CompletionRequest, Prompt, error_body
from .serving import Serving, Submission

TextRequest = CompletionRequest | ChatCompletionRequest


class TextServing(Serving):
    id_prefix: str  # of a response's id
    object: str  # a whole response's
    chunk_object: str  # a streamed event's

    # --- what each endpoint says -----------------------------------------------------------------------------------
    def prompts(self, body: TextRequest) -> list[Prompt]:
        raise NotImplementedError

    def max_new(self, body: TextRequest) -> int | None:
        """Bytes to generate; None: as much as the context holds."""
        raise NotImplementedError

    def top_logprobs(self, body: TextRequest) -> int | None:
        """None for no logprobs, n >= 0 for the chosen byte's and the n likeliest bytes'."""
        raise NotImplementedError

    def echo(self, body: TextRequest) -> bool:
        """Whether a choice starts with its prompt (and the prompt's logprobs, when logprobs are asked for)."""
        return False

    def stops(self, body: TextRequest) -> tuple[bytes, ...]:
        return body.stops()

    def message(self, text: str) -> dict:
        """A whole response's choice holds the text as this."""
        raise NotImplementedError

    def delta(self, text: str) -> dict:
        """A streamed event's choice holds new text as this."""
        raise NotImplementedError

    def opening(self, index: int) -> list[dict]:
        """Choice `index`'s events streamed before anything else."""
        return []

    def logprobs_json(self, lps: list[ByteLogprob | None], offset: int) -> dict:
        """Logprobs of these bytes (None: the <|endoftext|> a prompt started with), the first at byte `offset` of
        the choice's text."""
        raise NotImplementedError

    # --- the shared part ---------------------------------------------------------------------------------------------
    def params(self, body: TextRequest, prompt: Prompt, schema: JsonSchema | None) -> SamplingParams:
        max_new = self.max_new(body)
        if max_new is None:
            max_new = max(0, self.engine.max_len - len(prompt.data))
        logprobs = self.top_logprobs(body)
        return SamplingParams(max_new_bytes=max_new, temperature=body.temperature, top_k=body.top_k,
                              top_p=None if body.top_p >= 1 else body.top_p, seed=body.seed, stop=self.stops(body),
                              logprobs=logprobs, prompt_logprobs=logprobs if self.echo(body) else None,
                              grammar=schema)

    def check_stops(self, stops: tuple[bytes, ...]) -> None:
        """The client's stop sequences within the server's bounds (the chat endpoint adds its own turn marker)."""
        most, longest = self.limits.max_stops, self.limits.max_stop_bytes
        if len(stops) > most or any(len(s) > longest for s in stops):
            raise ApiError(400, f"stop: at most {most} stop sequences of at most {longest} bytes each (UTF-8), got "
                           f"{len(stops)} of up to {max(map(len, stops))} bytes", param="stop")

    async def create(self, body: TextRequest, request: Request):
        self.check_model(body, "bytes")
        field = body.unsupported()
        if field is not None:
            raise ApiError(400, f"{field}: not supported by this server", param=field)
        self.check_stops(body.stops())
        prompts = self.prompts(body)
        schema = grammar(body)  # compiled once; each prompt's request gets its own matcher
        subs = self.submit_all([(p.data, self.params(body, p, schema)) for p in prompts], "prompt")
        head = {"id": f"{self.id_prefix}-{secrets.token_hex(12)}", "object": self.object, "created": int(time.time()),
                "model": self.model_name}
        choices = [Choice(self, i, p, self.echo(body), self.top_logprobs(body) is not None)
                   for i, p in enumerate(prompts)]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self.sse(request, subs, choices, head, include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async with contextlib.aclosing(merged(subs, request)) as outs:
            async for i, out in outs:
                choices[i].take(out)
                if out.finish_reason == "error":
                    raise ApiError(500, f"generation failed: {out.error}", "server_error")
        if not all(c.finished for c in choices):
            return Response(status_code=499)  # the client has gone
        for sub in subs:
            self.observe_ttfb(sub)
        return {**head, "choices": [c.whole() for c in choices], "usage": usage(choices)}

    async def sse(self, request: Request, subs: list[Submission], choices: list[Choice], head: dict,
                  include_usage: bool):
        """OpenAI's stream: `data: {chunk}` events, text always whole UTF-8 characters, each event one choice's
        (with its index); an echoed prompt first; then `data: [DONE]`."""
        head = {**head, "object": self.chunk_object}

        def event(choice: dict, **extra) -> str:
            payload = {**head, "choices": [choice], **extra}
            if include_usage:
                payload.setdefault("usage", None)
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        for c in choices:
            for opening in self.opening(c.index):
                yield event(opening)
        async with contextlib.aclosing(merged(subs, request)) as outs:
            async for i, out in outs:
                c = choices[i]
                if out.finish_reason == "error":
                    yield f"data: {json.dumps(error_body(f'generation failed: {out.error}', 'server_error'))}\n\n"
                    return
                if out.finish_reason == "cancelled":
                    return
                if c.last is None and out.data:
                    self.observe_ttfb(subs[i])
                for e in c.events(out):
                    yield event(e)
        if not all(c.finished for c in choices):
            return
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(choices)})}\n\n"
        yield "data: [DONE]\n\n"


class Choice:
    """One prompt's choice as its outputs come: the text (the prompt first when echoed) and its logprobs."""

    def __init__(self, serving: TextServing, index: int, prompt: Prompt, echo: bool, want_logprobs: bool) -> None:
        self.serving, self.index, self.prompt, self.echo, self.want = serving, index, prompt, echo, want_logprobs
        self.data = bytearray()
        self.lps: list[ByteLogprob | None] = []
        self.prompt_lps: list[ByteLogprob | None] | None = None
        self.last: Output | None = None
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.offset = 0  # bytes of the text streamed so far

    def _prompt_lps(self, out: Output) -> list[ByteLogprob | None]:
        return [None] * self.prompt.eot + list(out.prompt_logprobs or ())

    def take(self, out: Output) -> None:
        if self.last is None and self.echo:
            self.prompt_lps = self._prompt_lps(out)
        self.data += out.data
        self.lps.extend(out.logprobs or ())
        self.last = out

    def whole(self) -> dict:
        """The whole response's choice."""
        head = EOT_TEXT if self.echo and self.prompt.eot else ""
        body = (self.prompt.data if self.echo else b"") + bytes(self.data)
        lps = (self.prompt_lps or []) + self.lps if self.echo else self.lps
        lp = self.serving.logprobs_json(lps, 0) if self.want else None
        return {"index": self.index, "finish_reason": self.last.finish_reason, "logprobs": lp,
                **self.serving.message(head + body.decode("utf-8", errors="replace"))}

    def events(self, out: Output) -> list[dict]:
        """The streamed events for this output: the echoed prompt before the first, then new text (whole UTF-8
        characters only: the decoder holds a partial one)."""
        got = []
        if self.last is None and self.echo:
            text = (EOT_TEXT if self.prompt.eot else "") + self.decoder.decode(self.prompt.data)
            lp = self.serving.logprobs_json(self._prompt_lps(out), 0) if self.want else None
            self.offset = len(EOT_TEXT) * self.prompt.eot + len(self.prompt.data)
            got.append({"index": self.index, "logprobs": lp, "finish_reason": None, **self.serving.delta(text)})
        self.take(out)
        text = self.decoder.decode(out.data, final=out.finish_reason is not None)
        if text or out.logprobs or out.finish_reason:
            lp = self.serving.logprobs_json(list(out.logprobs), self.offset) if out.logprobs is not None else None
            self.offset += len(out.data)
            got.append({"index": self.index, "logprobs": lp, "finish_reason": out.finish_reason,
                        **self.serving.delta(text)})
        return got

    @property
    def finished(self) -> bool:
        """Whether the engine finished this choice (not cancelled: its client has gone)."""
        return self.last is not None and self.last.finish_reason not in (None, "cancelled")

    @property
    def prompt_tokens(self) -> int:
        return self.prompt.tokens

    @property
    def generated(self) -> int:
        return self.last.generated if self.last is not None else 0


async def merged(subs: list[Submission], request: Request) -> AsyncIterator[tuple[int, Output]]:
    """Every submission's outputs as they come, each with its submission's index, until all have ended. Leaving
    early (an error, a client gone) cancels those still running."""
    q: asyncio.Queue[tuple[int, Output | None]] = asyncio.Queue()

    async def pump(i: int, sub: Submission) -> None:
        try:
            async for out in sub.outputs(request):
                q.put_nowait((i, out))
        finally:
            q.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, sub)) for i, sub in enumerate(subs)]
    try:
        left = len(tasks)
        while left:
            i, out = await q.get()
            if out is None:
                left -= 1
            else:
                yield i, out
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t


def grammar(body: TextRequest) -> JsonSchema | None:
    """The JSON schema `response_format` asks for, compiled now: one it cannot honour is a 400 naming the problem."""
    if body.response_format is None:
        return None
    try:
        schema = body.response_format.schema_dict()
        if schema is None:
            return None
        g = JsonSchema(schema)
        g.check()
        return g
    except (ValueError, GenerationError) as e:  # GenerationError is a ValueError too: one answer
        raise ApiError(400, f"response_format: {e}", param="response_format") from e



def usage(choices: list[Choice]) -> dict:
    """Usage in tokens (bytes, and a leading <|endoftext|>), summed over every prompt of the request."""
    prompt, generated = sum(c.prompt_tokens for c in choices), sum(c.generated for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}
