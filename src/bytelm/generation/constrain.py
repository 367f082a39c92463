"""Structured outputs: decoding constrained by a JSON schema, exactly, over the 256 byte values.

A token model's grammar mask fights token boundaries (a token may straddle a string's end and the next key); a byte
model's vocabulary *is* the bytes, so the mask is exact: at every step the grammar says which of the 256 bytes may
come next, the others get -inf before sampling, and every finished document parses and validates. The grammar library
is llguidance (Microsoft's, also under vLLM and SGLang), chosen by measurement over xgrammar and outlines-core
(benchmarks/grammar.py, results in benchmarks/results/grammar.md): it honours every schema feature measured (bounds,
required fields, additionalProperties false, enums, array lengths, string formats, UTF-8 built byte by byte), builds
a matcher in about a millisecond, costs 10-40 µs per byte (more for bounded numbers) and its wheel has no
dependencies. xgrammar is ~4x faster per byte but takes 2.4 s to start and pulls in transformers and triton (1 GB);
outlines-core ignores numeric bounds and took 16-23 s to compile `{"type": "object"}`.

The end of a document: a byte vocabulary has no end-of-text token. The matcher's vocabulary is the 256 bytes plus
one end token; when the grammar may end (a complete top-level number, say) the end is offered to the model as byte
0x0A, "\\n": the grammar never allows a raw newline inside the document (JSON strings escape it, and the output is
compact: ", " and ": " between items, no other whitespace), and a newline is what ends a reply in bytelm's chat
template. Sampling it ends the request ("stop") without sending it. When the grammar can only end (the object's
closing brace), the request ends at once, without a model step.

Imported lazily: `pip install 'bytelm[structured]'` (llguidance) is needed only when a request asks for a schema.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import GenerationError

END = 256  # the matcher's end-of-document token
END_BYTE = 0x0A  # the byte that offers it to the model (see the module's docstring)
WORDS = 9  # 32-bit words of a mask over 257 entries
# Compact JSON, as json.dumps writes it: no other whitespace, so a random model cannot pad a document forever
JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise GenerationError("structured outputs (a JSON schema) need llguidance: pip install 'bytelm[structured]'"
                              ) from e
    return llguidance


@functools.cache
def _tokenizer():
    llg = _llguidance()

    class Bytes:  # what llguidance's TokenizerWrapper reads: one token per byte value, then the end token
        eos_token_id, bos_token_id, special_token_ids = END, None, [END]
        tokens = [*(bytes([i]) for i in range(256)), b"\xff[END]"]  # a leading 0xff marks a special token

        def __call__(self, s):
            return list(s)

    return llg.LLTokenizer(llg.TokenizerWrapper(Bytes()))


@functools.lru_cache(maxsize=256)
def _compile(schema: str) -> str:
    """A JSON schema (canonical JSON text) as llguidance's grammar, or a GenerationError naming what is wrong."""
    llg = _llguidance()
    try:
        grammar = llg.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except ValueError as e:
        raise GenerationError(f"invalid JSON schema: {e}") from e
    failed, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, _tokenizer())
    if failed:
        raise GenerationError(f"cannot use this JSON schema: {messages[0]}")
    return grammar


@dataclass(frozen=True)
class JsonSchema:
    """Constrain the output to one JSON document valid under `schema` (a dict, or its JSON text); `JsonSchema()`
    (no schema, or {"type": "object"}) is OpenAI's `json_object`: any JSON object. Hashable: kept as JSON text."""

    schema: Any = field(default='{"type": "object"}')  # a dict or JSON text; kept as JSON text

    def __post_init__(self) -> None:
        s = self.schema
        if isinstance(s, str):
            try:
                s = json.loads(s)
            except ValueError as e:
                raise GenerationError(f"invalid JSON schema: not JSON ({e})") from e
        if not isinstance(s, dict):
            raise GenerationError(f"a JSON schema must be an object, got {type(s).__name__}")
        # keys keep their order: the output's properties come in the schema's order (as OpenAI's structured outputs)
        object.__setattr__(self, "schema", json.dumps(s, ensure_ascii=False))

    def check(self) -> None:
        """Compile it now (cached): a schema that cannot be honoured is refused before any work."""
        _compile(self.schema)

    def matcher(self) -> Matcher:
        return Matcher(_compile(self.schema))


class Matcher:
    """One request's position in its grammar: which bytes may come next, advanced by each byte sampled."""

    def __init__(self, grammar: str) -> None:
        llg = _llguidance()
        self.m = llg.LLMatcher(_tokenizer(), grammar, log_level=0)
        if self.m.is_error():
            raise GenerationError(f"cannot use this JSON schema: {self.m.get_error()}")

    def fill(self, address: int) -> None:
        """Write the next allowed set as WORDS little-endian 32-bit words at this memory address: bit i of the set
        is entry i (END for the end)."""
        self.m.unsafe_compute_mask_ptr(address, WORDS * 4)

    def advance(self, byte: int) -> bool:
        """Take a sampled byte (END_BYTE: the end of the document); True when the document is now complete."""
        ok = self.m.consume_token(END if byte == END_BYTE else byte)
        if not ok or self.m.is_error():  # the mask allowed it, so this is a bug, never the model's doing
            raise GenerationError(f"the grammar refused byte {byte}: {self.m.get_error()}")
        return byte == END_BYTE or self.m.is_stopped()


def allowed_bytes(matchers: list[Matcher]) -> torch.Tensor:
    """(n, 256) bool: the bytes each matcher allows next, the end offered as END_BYTE (see the module's docstring).
    A row with none (a matcher in an error state) must end with an error."""
    # in numpy, a few µs a row (torch's small ops cost tens of µs each, per byte generated)
    words = np.empty((len(matchers), WORDS), dtype=np.uint32)
    base = words.ctypes.data
    for i, m in enumerate(matchers):
        m.fill(base + i * WORDS * 4)
    bits = np.unpackbits(words.astype("<u4", copy=False).view(np.uint8), axis=-1, bitorder="little").view(bool)
    bits[:, END_BYTE] |= bits[:, END]
    return torch.from_numpy(bits[:, :256])
