"""Transformer blocks shared by MEGABYTE's global and local models and the byte transformer baseline: pre-norm
(GPT-2 style), optional rotary positions, and a preallocated KV cache per layer for incremental decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, KVCache, dropout_active
from .rotary import rope_tables


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Dropout(nn.Dropout):
    """nn.Dropout that is off under `torch.inference_mode()` whatever the training flag (see `dropout_active`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.p, dropout_active(self), self.inplace) if self.p > 0 else x


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, bias: bool, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, bias=bias)
        self.attn = Attention(dim, heads, bias, dropout)
        self.norm2 = nn.LayerNorm(dim, bias=bias)
        self.mlp = MLP(dim, int(mlp_ratio * dim), bias)
        self.drop = Dropout(dropout)

    def forward(self, x, rope=None, cache: KVCache | None = None, pos: int | torch.Tensor = 0,
                rows: torch.Tensor | None = None, span: int | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, cache, pos, rows, span))
        return x + self.drop(self.mlp(self.norm2(x)))


class TransformerStack(nn.Module):
    """`layers` pre-norm blocks and a final norm over sequences of up to `max_pos` positions.

    Used three times: MEGABYTE's global model (over patches), its local model (over the bytes of one patch) and the
    byte transformer baseline (over bytes). `forward(x, caches, pos)` runs positions pos..pos+T-1; with `pos` a
    LongTensor (n,) each row's one input sits at its own position, and `rows` (n,) names the cache rows the inputs
    belong to (see KVCache.update): the continuous batch of bytelm.generation.engine.
    """

    def __init__(self, dim, layers, heads, mlp_ratio, bias, dropout, max_pos, rope: bool, rope_base: float) -> None:
        super().__init__()
        self.dim, self.heads, self.max_pos = dim, heads, max_pos
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, bias, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, bias=bias)
        self.use_rope, self.rope_base = rope, rope_base
        if rope:  # not saved: derived from the config
            self.reset_rope()

    def reset_rope(self, device=None) -> None:
        """(Re)compute the rope tables: buffers derived from the config, never saved (so a stack built on the meta
        device and loaded with `assign=True`, as bytelm.swarm does, calls this for real ones)."""
        cos, sin = rope_tables(self.max_pos, self.dim // self.heads, self.rope_base)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def forward(self, x: torch.Tensor, caches: list[KVCache] | None = None, pos: int | torch.Tensor = 0,
                rows: torch.Tensor | None = None, span: int | None = None) -> torch.Tensor:
        return self.norm(self.run_blocks(x, 0, len(self.blocks), caches, pos, rows, span))

    def run_blocks(self, x: torch.Tensor, a: int, b: int, caches: list[KVCache] | None = None,
                   pos: int | torch.Tensor = 0, rows: torch.Tensor | None = None, span: int | None = None
                   ) -> torch.Tensor:
        """Blocks a..b-1 alone, no final norm (caches: theirs, b - a of them): a swarm server's share."""
        T = x.shape[1]
        rope = None
        if self.use_rope and isinstance(pos, torch.Tensor):  # (n, 1, 1, Dh): one position per row
            rope = (self.rope_cos[pos][:, None, None], self.rope_sin[pos][:, None, None])
        elif self.use_rope:
            rope = (self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T])
        for i in range(a, b):
            x = self.blocks[i](x, rope, caches[i - a] if caches is not None else None, pos, rows, span)
        return x

    def new_caches(self, batch: int, max_len: int, device, dtype) -> list[KVCache]:
        return [KVCache(batch, self.heads, max_len, self.dim // self.heads, device, dtype) for _ in self.blocks]
