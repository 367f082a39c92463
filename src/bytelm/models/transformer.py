"""The baseline: a plain decoder-only transformer over bytes (GPT/OPT style), from the same blocks as MEGABYTE.

Input position t holds the byte before it (a learned `bos` vector at t = 0), so logits[:, t] predicts x[:, t] from
x[:, :t] and byte 0 is predicted too, exactly like `Megabyte`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..nn import Dropout, KVCache, Step, TransformerStack, init_weights
from .base import ByteLM
from .config import VOCAB_SIZE, TransformerConfig
from .loss import byte_loss, chunked_byte_loss
from .registry import ModelSpec, register


@dataclass
class TransformerState:
    kv: list[KVCache]
    global_steps: int = 0  # steps of the whole model (every decode step runs all of it): the engine's metric


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

    def forward(self, x: torch.Tensor, loss: str | None = None) -> torch.Tensor:
        """Logits (B, T, 256); with `loss` a reduction (mean, sum, none), the loss in nats instead (`byte_loss` of
        the logits), the head and cross-entropy run chunk by chunk of positions where `loss_chunk_bytes` is set."""
        if not torch.compiler.is_compiling():
            self.check_input(x)
        x = x.long()
        h = self.embed(x[:, :-1])  # input t holds byte t - 1, input 0 the learned bos
        h = torch.cat((self.bos.expand(x.shape[0], 1, -1).to(h.dtype), h), dim=1)  # (B, T, D)
        if self.pos is not None:
            h = h + self.pos(torch.arange(h.shape[1], device=x.device))
        h = self.transformer(self.drop(h))  # (B, T, D)
        if loss is not None and self.loss_chunk_bytes is not None:
            def chunk(i: int, j: int) -> torch.Tensor:  # per-byte losses (B, j - i) of positions i..j-1
                return byte_loss(self.lm_head(h[:, i:j]), x[:, i:j], "none").view(x.shape[0], -1)

            B, T = x.shape
            return chunked_byte_loss(chunk, T, max(1, self.loss_chunk_bytes // B), B * T, loss, self.recompute)
        logits = self.lm_head(h)  # (B, T, 256)
        return logits if loss is None else byte_loss(logits, x, loss)

    def new_state(self, batch: int, max_len: int) -> TransformerState:
        self.check_state_memory(batch, max_len)
        return TransformerState(self.transformer.new_caches(batch, max_len, self.device, self.dtype))

    # Input position t holds byte t - 1 (position 0: bos), so the step's byte positions shift by one.
    def prefill(self, x: torch.Tensor, s: TransformerState, step: Step) -> torch.Tensor:
        """Bytes x (n, T) of n rows, row j's `step.lens[j]` real ones (the rest right padding) from byte position
        `step.at[j]` on: a whole prompt (at 0) or a chunk of one; logits (n, 256) after each row's last byte."""
        n, T = x.shape
        lens = step.lens or (T,) * n
        fresh = [a == 0 for a in step.at]
        h = self.embed(x)  # (n, T, D)
        if any(fresh):  # fresh rows start with bos at position 0; the others' inputs start at their byte + 1
            bos = self.bos.expand(n, 1, -1).to(h.dtype)
            mask = torch.tensor(fresh, device=x.device)[:, None, None]
            h = torch.where(mask, torch.cat((bos, h), 1), torch.cat((h, bos), 1))  # (n, T + 1, D)
        at = [0 if f else a + 1 for f, a in zip(fresh, step.at, strict=True)]
        ends = [a + m + f for a, m, f in zip(at, lens, fresh, strict=True)]  # each row's inputs end here
        sub = step.moved(at, max(ends), [m + f for m, f in zip(lens, fresh, strict=True)])
        out = self.transformer(self._add_pos(h, sub), s.kv, sub)  # (n, T', D)
        last = torch.tensor([e - a - 1 for e, a in zip(ends, at, strict=True)], device=x.device)
        return self.lm_head(out[torch.arange(n, device=x.device), last])

    def decode_step(self, byte: torch.Tensor, s: TransformerState, step: Step) -> torch.Tensor:
        """Feed byte (n,) at byte position `step.at` of each row; logits (n, 256) for the byte after it."""
        sub = step.moved([a + 1 for a in step.at], max(step.at) + 2)
        out = self.transformer(self._add_pos(self.embed(byte.view(-1, 1)), sub), s.kv, sub)  # (n, 1, D)
        s.global_steps += 1
        return self.lm_head(out[:, -1])

    def _add_pos(self, h: torch.Tensor, step: Step) -> torch.Tensor:
        if self.pos is not None:
            h = h + self.pos(step.positions(h.shape[1], self.config.max_seq_len))
        return self.drop(h)


_BLOCK_LINEARS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc|proj))"

register(ModelSpec(
    model_type="transformer", config_class=TransformerConfig, model_class=ByteTransformer,
    lora_targets={"global": rf"transformer\.{_BLOCK_LINEARS}", "all": rf"transformer\.{_BLOCK_LINEARS}"},
    lora_target_help={"local": "a byte transformer has no local model: --lora-target global (or all) adapts its "
                               "transformer"},
    description="byte-level transformer", tags=["byte-level", "tokenizer-free"],
    remote_stack=("transformer", "layers", "embed"),
))
