"""POST /v1/completions: a prompt (text, or token ids: the bytes themselves, 256 = <|endoftext|> first) continued, or
a list of prompts (one choice each); `max_tokens` bytes at most (default 16, as OpenAI's; 0 with `echo`: the prompt
scored, nothing generated), `logprobs` as completions' parallel lists, `echo` the prompt first.

Echoed logprobs differ from OpenAI's in one place: OpenAI gives the first prompt token null (a token model has no
prediction for it), bytelm gives the first byte its real log-probability, predicted from the empty context every
bytelm stream starts from. It is what `bytelm eval` counts, so a client summing a prompt's logprobs gets the model's
own log-likelihood of it. A prompt given as token ids starting with <|endoftext|> (256) names that empty context
explicitly: that token is echoed with a null logprob, and the bytes after it as above.
"""

from __future__ import annotations

from ..generation.engine import ByteLogprob
from .protocol import EOT_TEXT, CompletionRequest, Prompt, byte_token
from .serving_text import TextServing


class ServingCompletion(TextServing):
    id_prefix, object, chunk_object = "cmpl", "text_completion", "text_completion"

    def prompts(self, body: CompletionRequest) -> list[Prompt]:
        return body.prompts()

    def max_new(self, body: CompletionRequest) -> int | None:
        return body.max_tokens

    def top_logprobs(self, body: CompletionRequest) -> int | None:
        return body.logprobs

    def echo(self, body: CompletionRequest) -> bool:
        return body.echo

    def message(self, text: str) -> dict:
        return {"text": text}

    def delta(self, text: str) -> dict:
        return {"text": text}

    def logprobs_json(self, lps: list[ByteLogprob | None], offset: int) -> dict:
        """Parallel lists: each token, its logprob, its likeliest alternatives, its byte offset in the text (the
        <|endoftext|> a prompt started with: its text, and null for the rest)."""
        tokens, values, tops, offsets = [], [], [], []
        for x in lps:
            offsets.append(offset)
            if x is None:
                tokens.append(EOT_TEXT)
                values.append(None)
                tops.append(None)
                offset += len(EOT_TEXT)
            else:
                tokens.append(byte_token(x.byte))
                values.append(x.logprob)
                tops.append({byte_token(b): v for b, v in x.top})
                offset += 1
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}
