"""The baseline: a plain decoder-only transformer over bytes (GPT/OPT style), from the same blocks as MEGABYTE.

Input position t holds the byte before it (a learned `bos` vector at t = 0), so logits[:, t] predicts x[:, t] from
x[:, :t] and byte 0 is predicted too, exactly like `Megabyte`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn import Dropout, KVCache, TransformerStack, init_weights
from .base import ByteLM
from .config import VOCAB_SIZE, TransformerConfig
from .loss import byte_loss, chunked_byte_loss
from .registry import ModelSpec, register


@dataclass
class TransformerState:
    kv: list[KVCache]
    pos: list[int]  # per row: next input position (rows of a continuous batch move independently)


class ByteTransformer(ByteLM):
    config_class = TransformerConfig

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__(config)
        c = config
        rope = c.pos_emb == "rope"
        self.embed = nn.Embedding(VOCAB_SIZE, c.dim)
        self.pos = None if rope else nn.Embedding(c.max_seq_len, c.dim)
        self.bos = nn.Parameter(torch.zeros(c.dim))
        self.drop = Dropout(c.dropout)
        self.transformer = TransformerStack(c.dim, c.layers, c.heads, c.mlp_ratio, c.bias, c.dropout,
                                            c.max_seq_len, rope, c.rope_base)
        self.lm_head = nn.Linear(c.dim, VOCAB_SIZE, bias=False)
        init_weights(self, c.layers)

    def _inputs(self, x: torch.Tensor, start: int | torch.Tensor, bos: bool) -> torch.Tensor:
        """Bytes (B, n) -> input vectors at positions start.. (B, n + bos, D), bos prepended at position 0.
        `start` may be a LongTensor (B,): one byte per row (n = 1), each at its own position."""
        h = self.embed(x)
        if bos:
            h = torch.cat((self.bos.expand(x.shape[0], 1, -1).to(h.dtype), h), dim=1)
        if self.pos is not None and isinstance(start, torch.Tensor):
            h = h + self.pos(start)[:, None]
        elif self.pos is not None:
            h = h + self.pos(torch.arange(start, start + h.shape[1], device=x.device))
        return self.drop(h)

    def forward(self, x: torch.Tensor, loss: str | None = None) -> torch.Tensor:
        """Logits (B, T, 256); with `loss` a reduction (mean, sum, none), the loss in nats instead (`byte_loss` of
        the logits), the head and cross-entropy run chunk by chunk of positions where `loss_chunk_bytes` is set."""
        if not torch.compiler.is_compiling():
            self.check_input(x)
        h = self.transformer(self._inputs(x[:, :-1].long(), 0, bos=True))  # (B, T, D)
        if loss is not None and self.loss_chunk_bytes is not None:
            def chunk(i: int, j: int) -> torch.Tensor:  # per-byte losses (B, j - i) of positions i..j-1
                return byte_loss(self.lm_head(h[:, i:j]), x[:, i:j], "none").view(x.shape[0], -1)

            B, T = x.shape
            return chunked_byte_loss(chunk, T, max(1, self.loss_chunk_bytes // B), B * T, loss, self.recompute)
        logits = self.lm_head(h)  # (B, T, 256)
        return logits if loss is None else byte_loss(logits, x, loss)

    def new_state(self, batch: int, max_len: int) -> TransformerState:
        self.check_state_memory(batch, max_len)
        return TransformerState(self.transformer.new_caches(batch, max_len, self.device, self.dtype), [0] * batch)

    def prefill(self, x: torch.Tensor, s: TransformerState, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Prompts x (n, L) into state rows `rows` (n,) (None: all rows), which start over; logits (n, 256)."""
        h = self._inputs(x, 0, bos=True)  # (n, L + 1, D)
        for i in range(len(s.pos)) if rows is None else rows.tolist():
            s.pos[i] = h.shape[1]
        return self.lm_head(self.transformer(h, s.kv, 0, rows)[:, -1])

    def decode_step(self, byte: torch.Tensor, s: TransformerState, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Feed byte (n,) to state rows `rows` (None: all, in order), each at its own position; logits (n, 256)."""
        ids = range(byte.shape[0]) if rows is None else rows.tolist()
        at = [s.pos[i] for i in ids]
        pos = at[0] if min(at) == max(at) else torch.tensor(at, device=byte.device)
        h = self._inputs(byte.view(-1, 1), pos, bos=False)  # (n, 1, D)
        out = self.transformer(h, s.kv, pos, rows, max(at) + 1)
        for i in ids:
            s.pos[i] += 1
        return self.lm_head(out[:, -1])


_BLOCK_LINEARS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc|proj))"

register(ModelSpec(
    model_type="transformer", config_class=TransformerConfig, model_class=ByteTransformer,
    lora_targets={"global": rf"transformer\.{_BLOCK_LINEARS}", "all": rf"transformer\.{_BLOCK_LINEARS}"},
    lora_target_help={"local": "a byte transformer has no local model: --lora-target global (or all) adapts its "
                               "transformer"},
    description="byte-level transformer", tags=["byte-level", "tokenizer-free"],
    remote_stack=("transformer", "layers", "embed"),
))
