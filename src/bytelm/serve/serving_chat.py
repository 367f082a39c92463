"""POST /v1/chat/completions: the messages rendered with the byte-level chat template (protocol.chat_prompt), the
reply generated until the next role marker; `max_completion_tokens` (or `max_tokens`) bytes at most, by default
what the context holds; `logprobs` + `top_logprobs` as chat's `content` list, each entry with its byte."""

from __future__ import annotations

from ..generation.engine import ByteLogprob
from .protocol import CHAT_STOP, ChatCompletionRequest, Prompt, byte_token, chat_prompt
from .serving_text import TextServing


class ServingChat(TextServing):
    id_prefix, object, chunk_object = "chatcmpl", "chat.completion", "chat.completion.chunk"

    def prompts(self, body: ChatCompletionRequest) -> list[Prompt]:
        return [Prompt(chat_prompt(body.messages))]

    def max_new(self, body: ChatCompletionRequest) -> int | None:
        return body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens

    def top_logprobs(self, body: ChatCompletionRequest) -> int | None:
        return (body.top_logprobs or 0) if body.logprobs else None

    def stops(self, body: ChatCompletionRequest) -> tuple[bytes, ...]:
        return body.stops() + (CHAT_STOP.encode(),)  # the reply ends where the next turn would begin

    def message(self, text: str) -> dict:
        return {"message": {"role": "assistant", "content": text}}

    def delta(self, text: str) -> dict:
        return {"delta": {"content": text} if text else {}}

    def opening(self, index: int) -> list[dict]:
        return [{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                 "finish_reason": None}]

    def logprobs_json(self, lps: list[ByteLogprob | None], offset: int) -> dict:
        """Chat's `content` list: each byte's token, logprob and `bytes`, with its likeliest alternatives."""
        return {"content": [{"token": byte_token(x.byte), "logprob": x.logprob, "bytes": [x.byte],
                             "top_logprobs": [{"token": byte_token(b), "logprob": v, "bytes": [b]} for b, v in x.top]}
                            for x in lps]}
