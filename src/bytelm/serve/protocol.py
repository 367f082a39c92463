"""OpenAI's request and response shapes for /v1/completions, /v1/chat/completions and /v1/images/generations (and
bytelm's /v1/audio/generations), as pydantic models, and the byte-level chat template.

Bytes are tokens here: `max_tokens` counts bytes, usage counts bytes, and a prompt may be given as a list of
token ids (the bytes themselves, 0..255, and 256 = <|endoftext|>, the start of the stream, first only) as well as
text; /v1/completions takes a list of such prompts too (one choice each). Fields OpenAI has and a byte model cannot
honour (penalties, logit_bias, n > 1, suffix, best_of, tools) are refused with a 400 naming the field, not silently
ignored.

Types are strict (pydantic's strict mode): `"max_tokens": "10"`, `"stream": "true"` or a prompt `[true, false]` is a
400, not a guess; a JSON integer is still a number where a float is asked for. Text that does not encode as UTF-8 (a
lone surrogate such as "\ud800", which JSON can spell) is a 400 naming its field when it is encoded (`utf8`).
`response_format` (json_object, json_schema) is honoured exactly: decoding is constrained byte by byte
(bytelm.generation.constrain), and a schema that cannot be honoured is a 400 naming the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# The byte tokenizer (vLLM's /tokenize and /detokenize; lm-evaluation-harness counts contexts with it): token ids
# 0..255 are the bytes, 256 is <|endoftext|>, the stream boundary. Every bytelm stream starts from the empty context,
# so 256 first means exactly that start and is dropped before the model; it is both the eos and the bos the
# tokenizer endpoints report (lm-eval's rolling loglikelihood prefixes every document with it). A byte model has
# no use for it anywhere else: there it is refused.
EOT_ID = 256
EOT_TEXT = "<|endoftext|>"
MAX_PROMPTS = 64  # prompts in one /v1/completions request (LangChain sends 20, lm-eval its --batch_size)


@dataclass(frozen=True)
class Prompt:
    """One prompt as the engine sees it: its bytes, and whether it was given starting with <|endoftext|>."""

    data: bytes
    eot: bool = False

    @property
    def tokens(self) -> int:
        return len(self.data) + self.eot


def text_tokens(text: str, field: str) -> list[int]:
    """Text as token ids: its UTF-8 bytes, and <|endoftext|> at its very start as 256 (where a token-list prompt
    may hold it; anywhere else it is just text). Text that is not Unicode is a 400 naming `field` (`utf8`)."""
    if text.startswith(EOT_TEXT):
        return [EOT_ID, *utf8(text[len(EOT_TEXT):], field)]
    return list(utf8(text, field))


def as_prompt(x: str | list[int], where: str) -> Prompt:
    """A prompt from text or token ids, or a 400 naming where (`where`: its place in the request) it is wrong."""
    if isinstance(x, str):
        return Prompt(utf8(x, where))
    for i, t in enumerate(x):
        if not 0 <= t <= EOT_ID:
            raise ApiError(400, f"{where}[{i}]: token id {t} is not a byte (0..255) or <|endoftext|> (256)",
                           param="prompt")
        if t == EOT_ID and i > 0:
            raise ApiError(400, f"{where}[{i}]: <|endoftext|> (256) is allowed only first, where it means the start "
                                "of the stream; a byte model has no other use for it", param="prompt")
    eot = bool(x) and x[0] == EOT_ID
    return Prompt(bytes(x[eot:]), eot)


MAX_SEED = 2**64 - 1  # torch.Generator's range; negative seeds are refused, not wrapped


def utf8(text: str, field: str) -> bytes:
    """text as UTF-8, or a 400 naming the field (JSON's \uD800 escapes decode to lone surrogates, which do not
    encode)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{field}: not valid Unicode text (a lone surrogate {text[e.start]!r} at character "
                       f"{e.start}); send UTF-8 text", param=field) from None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """OpenAI's `response_format.json_schema`. `strict` or not, the output follows the schema (as vLLM's)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # `schema` would shadow BaseModel's
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`{"type": "text"}` (the default), `{"type": "json_object"}` (any JSON object) or `{"type": "json_schema",
    "json_schema": {"name", "schema", "strict", "description"}}`."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def schema_dict(self) -> dict | None:
        """The JSON schema the output must follow, or None (text)."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "object"}
        if self.json_schema is None or self.json_schema.schema_ is None:
            raise ValueError("response_format of type json_schema needs json_schema.schema")
        return self.json_schema.schema_


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # extra: fields of newer API versions, accepted, unused

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Literal[-1] | Annotated[int, Field(ge=1, le=256)] | None = None  # vLLM's extension; -1 or absent: off
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None

    @field_validator("top_k")
    @classmethod
    def _top_k_off(cls, v: int | None) -> int | None:
        return None if v == -1 else v

    def unsupported(self) -> str | None:
        """The first field set to something this server cannot do, or None."""
        if self.n != 1:
            return "n"
        if self.presence_penalty or self.frequency_penalty:
            return "presence_penalty" if self.presence_penalty else "frequency_penalty"
        if self.logit_bias:
            return "logit_bias"
        return None

    def stops(self) -> tuple[bytes, ...]:
        if isinstance(self.stop, str):
            return (utf8(self.stop, "stop"),) if self.stop else ()
        return tuple(utf8(x, f"stop[{i}]") for i, x in enumerate(self.stop or []) if x)


class CompletionRequest(_Common):
    # OpenAI's four forms: text, token ids, a list of texts, a list of token-id lists (one choice per prompt)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False  # the prompt comes back before the completion, with its logprobs when those are asked for
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1):
            return "best_of"
        return super().unsupported()

    def prompts(self) -> list[Prompt]:
        """Every prompt of the request, or a 400 naming the one that is wrong (or that there are too many)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [as_prompt(p, "prompt")]
        if not p:
            return [Prompt(b"")]  # [] is an empty prompt of token ids, as OpenAI's
        if len(p) > MAX_PROMPTS:
            raise ApiError(400, f"prompt: {len(p)} prompts in one request; at most {MAX_PROMPTS} (send several "
                                "requests)", param="prompt")
        return [as_prompt(x, f"prompt[{i}]") for i, x in enumerate(p)]


class TextPart(BaseModel):
    """A chat content part. Only text: a byte model reads no images or sound, so any other part type (image_url,
    input_audio, file) is a 400 naming it, not silently dropped."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A chat turn; `tool` turns (a tool's result, sent back after a tool call) are rendered as their own
    <|tool|> turn, their `tool_call_id` unused."""

    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts, in order
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list | None = None

    def unsupported(self) -> str | None:
        return "tools" if self.tools else super().unsupported()


# --- vLLM's tokenizer endpoints (POST /tokenize, POST /detokenize, GET /tokenizer_info) ----------------------------
class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: `prompt` text, or chat `messages` rendered with the chat template. `add_special_tokens`
    (vLLM's default true) puts <|endoftext|> first, as a tokenizer with a BOS token does."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True  # with messages: end with the assistant's marker
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[int]


# --- images and sound -----------------------------------------------------------------------------------------------
# An image or audio model makes pixels or samples, not text, and nothing conditions it but the start of its own
# output: a text `prompt` is refused (not ignored), and the top rows of an image (`image`) or the start of a clip
# (`audio`) are the only prompts. Each of `n` outputs is one engine stream; image i of a seeded request uses seed
# (seed + i) mod 2**64, so it is the image a request for one with that seed gets.
MAX_OUTPUTS = 10  # n: as OpenAI's images API


class _MediaCommon(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)  # extra: fields of newer API versions, accepted, unused

    model: str | None = None
    prompt: str = ""  # must be empty (or absent): these models are not text-conditioned
    n: Annotated[int, Field(ge=1, le=MAX_OUTPUTS)] = 1
    response_format: Literal["b64_json", "url"] | None = None  # "url": refused, nothing is hosted
    user: str | None = None
    stream: bool = False
    # bytelm's extensions: sampling, as /v1/completions
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=1, le=256)] | None = None
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] | None = None

    def unsupported(self) -> str | None:
        return "stream" if self.stream else None


class ImageGenerationRequest(_MediaCommon):
    """OpenAI's POST /v1/images/generations, for a model of one image size; `image` and `prompt_rows` are bytelm's:
    an image (base64 PNG, ...) whose top rows the model completes."""

    size: str | None = None  # OpenAI's WIDTHxHEIGHT; absent or "auto": the model's (any other is refused)
    output_format: Literal["png"] | None = None
    quality: str | None = None
    style: str | None = None
    image: str | None = None
    prompt_rows: Annotated[int, Field(ge=1)] | None = None

    def unsupported(self) -> str | None:
        if self.quality not in (None, "auto", "standard"):
            return "quality"
        return "style" if self.style is not None else super().unsupported()


class AudioGenerationRequest(_MediaCommon):
    """bytelm's POST /v1/audio/generations: sound from nothing, or continuing `audio` (a base64 WAV, FLAC, ...);
    `seconds` or `max_bytes` of it (default: 1 s, or what the context holds)."""

    seconds: Annotated[float, Field(gt=0, le=86400)] | None = None
    max_bytes: Annotated[int, Field(ge=1)] | None = None
    audio: str | None = None
    echo: bool = True  # the returned clip starts with the prompt clip (as the model hears it), as `bytelm generate`
    output_format: Literal["wav"] | None = None


# --- the chat template --------------------------------------------------------------------------------------------
# A byte model reads bytes, so the template is plain text; a turn ends where the next role marker would begin, which
# is also the chat endpoint's stop sequence: the model's reply ends at its first "\n<|".
CHAT_TURN = "<|{role}|>\n{content}\n"
CHAT_REPLY = "<|assistant|>\n"
CHAT_STOP = "\n<|"


def chat_prompt(messages: list[ChatMessage]) -> bytes:
    """<|system|>\\n...\\n<|user|>\\n...\\n<|assistant|>\\n: the reply is generated after the last marker."""
    roles = {"developer": "system"}
    for i, m in enumerate(messages):
        utf8(m.text(), f"messages[{i}].content")
    turns = "".join(CHAT_TURN.format(role=roles.get(m.role, m.role), content=m.text()) for m in messages)
    return (turns + CHAT_REPLY).encode("utf-8")


class ApiError(Exception):
    """An error answered with OpenAI's error body (`error_body`) and this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.body, self.headers = status, error_body(message, type_, param, code), headers


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def byte_token(b: int) -> str:
    """A byte as OpenAI's `token` string: the character for printable ASCII, else vLLM's 'bytes:\\xNN' form (the
    byte value itself is in `bytes`)."""
    return chr(b) if 32 <= b < 127 or b in (9, 10, 13) else f"bytes:\\x{b:02x}"
