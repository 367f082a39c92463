"""POST /v1/completions: a prompt (text, or the bytes themselves as integers) continued; `max_tokens` bytes at most
(default 16, as OpenAI's), `logprobs` as completions' parallel lists."""

from __future__ import annotations

from ..generation.engine import ByteLogprob
from .protocol import CompletionRequest, byte_token
from .serving_text import TextServing


class ServingCompletion(TextServing):
    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def prompt(self, body: CompletionRequest) -> bytes:
        return body.prompt_bytes()

    def max_new(self, body: CompletionRequest) -> int | None:
        return body.max_tokens

    def top_logprobs(self, body: CompletionRequest) -> int | None:
        return body.logprobs

    def message(self, text: str) -> dict:
        return {"text": text}

    def delta(self, text: str) -> dict:
        return {"text": text}

    def logprobs_json(self, lps: tuple[ByteLogprob, ...] | list[ByteLogprob], offset: int) -> dict:
        """Parallel lists: each byte's token, its logprob, its likeliest alternatives, its offset in the text."""
        return {"tokens": [byte_token(x.byte) for x in lps], "token_logprobs": [x.logprob for x in lps],
                "top_logprobs": [{byte_token(b): v for b, v in x.top} for x in lps],
                "text_offset": list(range(offset, offset + len(lps)))}
