"""vLLM's tokenizer endpoints, for a byte model: GET /tokenizer_info, POST /tokenize, POST /detokenize. Token ids are
byte values (0..255) and 256, <|endoftext|>, the stream boundary: the eos and bos they report (see protocol.py).

lm-evaluation-harness probes these (its `local-completions` model with `tokenizer_backend=remote`, or "auto") to
count a loglikelihood request's context in tokens, and takes its prefix token (what a document is scored after)
from the eos/bos they report: 256 here, the empty context bytelm streams start from. vLLM's shapes
(vllm/entrypoints/openai/protocol.py: TokenizeRequest, TokenizeResponse, DetokenizeRequest, DetokenizeResponse).
"""

from __future__ import annotations

from .protocol import (
    CHAT_REPLY,
    CHAT_TURN,
    EOT_ID,
    EOT_TEXT,
    ApiError,
    DetokenizeRequest,
    TokenizeRequest,
    byte_token,
    chat_prompt,
    text_tokens,
)
from .serving import Serving

# The byte-level chat template (protocol.chat_prompt) as the Jinja template tokenizer_info carries: clients that
# render chats themselves (lm-eval's remote tokenizer) get the prompt the chat endpoint builds.
# Content as ChatMessage.text() reads it: a string, a list of text parts joined, or nothing (null).
_CONTENT = ("{% if m['content'] is string %}{{ m['content'] }}{% elif m['content'] %}"
            "{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{% endif %}")
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    + CHAT_TURN.format(role="{{ 'system' if m['role'] == 'developer' else m['role'] }}", content=_CONTENT)
    + "{% endfor %}{% if add_generation_prompt %}" + CHAT_REPLY + "{% endif %}"
)


class ServingTokenizerInfo(Serving):
    def info(self) -> dict:
        return {"tokenizer_class": "ByteTokenizer", "vocab_size": EOT_ID + 1, "model_max_length": self.engine.max_len,
                "max_model_len": self.engine.max_len, "eos_token": EOT_TEXT, "bos_token": EOT_TEXT,
                "eos_token_id": EOT_ID, "bos_token_id": EOT_ID, "pad_token": None, "unk_token": None,
                "chat_template": CHAT_TEMPLATE, "add_bos_token": False, "clean_up_tokenization_spaces": False}


class ServingTokenize(Serving):
    def tokenize(self, body: TokenizeRequest) -> dict:
        self.check_model(body, "bytes")
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give exactly one of prompt (text) and messages (a chat)", param="prompt")
        if body.messages is not None:
            data = chat_prompt(body.messages)
            if not body.add_generation_prompt:
                data = data[: -len(CHAT_REPLY.encode())]
            tokens = list(data)
        else:
            tokens = text_tokens(body.prompt, "prompt")
        if body.add_special_tokens and tokens[:1] != [EOT_ID]:
            tokens = [EOT_ID, *tokens]
        strs = [EOT_TEXT if t == EOT_ID else byte_token(t) for t in tokens] if body.return_token_strs else None
        return {"count": len(tokens), "max_model_len": self.engine.max_len, "tokens": tokens, "token_strs": strs}


class ServingDetokenize(Serving):
    def detokenize(self, body: DetokenizeRequest) -> dict:
        """Token ids back to text: the bytes as UTF-8 (an invalid sequence as U+FFFD), 256 as <|endoftext|>."""
        self.check_model(body, "bytes")
        bad = next((i for i, t in enumerate(body.tokens) if not 0 <= t <= EOT_ID), None)
        if bad is not None:
            raise ApiError(400, f"tokens[{bad}]: token id {body.tokens[bad]} is not a byte (0..255) or <|endoftext|> "
                                "(256)", param="tokens")
        parts, run = [], bytearray()
        for t in body.tokens:
            if t == EOT_ID:
                parts += [run.decode("utf-8", errors="replace"), EOT_TEXT]
                run = bytearray()
            else:
                run.append(t)
        return {"prompt": "".join(parts) + run.decode("utf-8", errors="replace")}
