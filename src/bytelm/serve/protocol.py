"""OpenAI's request and response shapes for /v1/completions, /v1/chat/completions and /v1/images/generations (and
bytelm's /v1/audio/generations), as pydantic models, and the byte-level chat template.

Bytes are tokens here: `max_tokens` counts bytes, usage counts bytes, and a prompt may be given as a list of
integers 0..255 (the bytes themselves) as well as text. Fields OpenAI has and a byte model cannot honour (penalties,
logit_bias, n > 1, echo, suffix, best_of, tools) are refused with a 400 naming the field, not silently ignored.
`response_format` (json_object, json_schema) is honoured exactly: decoding is constrained byte by byte
(bytelm.generation.constrain), and a schema that cannot be honoured is a 400 naming the problem.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Byte = Annotated[int, Field(ge=0, le=255)]


class StreamOptions(BaseModel):
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
    model_config = ConfigDict(extra="allow")  # clients send fields of newer API versions: accepted, unused

    model: str | None = None
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=1, le=256)] | None = None  # vLLM's extension; -1 or absent: off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None

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
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return tuple(x.encode("utf-8") for x in s if x)


class CompletionRequest(_Common):
    prompt: str | list[Byte] | list[str]
    max_tokens: Annotated[int, Field(ge=0)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def unsupported(self) -> str | None:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            return "prompt"  # a batch of prompts in one request: send one request each
        if self.echo:
            return "echo"
        if self.suffix:
            return "suffix"
        if self.best_of not in (None, 1):
            return "best_of"
        return super().unsupported()

    def prompt_bytes(self) -> bytes:
        p = self.prompt
        if isinstance(p, str):
            return p.encode("utf-8")
        if p and isinstance(p[0], str):
            return p[0].encode("utf-8")
        return bytes(p)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: the text ones, in order
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[Any] | None = None

    def unsupported(self) -> str | None:
        return "tools" if self.tools else super().unsupported()


# --- images and sound -----------------------------------------------------------------------------------------------
# An image or audio model makes pixels or samples, not text, and nothing conditions it but the start of its own
# output: a text `prompt` is refused (not ignored), and the top rows of an image (`image`) or the start of a clip
# (`audio`) are the only prompts. Each of `n` outputs is one engine stream; image i of a seeded request uses seed
# (seed + i) mod 2**64, so it is the image a request for one with that seed gets.
MAX_OUTPUTS = 10  # n: as OpenAI's images API
MAX_SEED = 2**64 - 1


class _MediaCommon(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields of newer API versions: accepted, unused

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
