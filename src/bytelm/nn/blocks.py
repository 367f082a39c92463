"""Transformer blocks shared by MEGABYTE's global and local models and the byte transformer baseline: pre-norm
(GPT-2 style), optional rotary positions, and a preallocated KV cache per layer for incremental decoding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, KVCache, dropout_active
from .rotary import rope_tables
from .step import Step


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

    def forward(self, x, rope=None, cache: KVCache | None = None, step: Step | None = None,
                where: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, cache, step, where, mask))
        return x + self.drop(self.mlp(self.norm2(x)))


GRAPHS = 64  # compiled decode graphs allowed per process (see TransformerStack.forward)


class TransformerStack(nn.Module):
    """`layers` pre-norm blocks and a final norm over sequences of up to `max_pos` positions.

    Used three times: MEGABYTE's global model (over patches), its local model (over the bytes of one patch) and the
    byte transformer baseline (over bytes). `forward(x)` runs a whole sequence from position 0 (training, scoring);
    `forward(x, caches, step)` runs T inputs of n cache rows, each row from its own position (`Step`): decoding.
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

    compiled_step = None  # set by compile_step(): the one-input-per-row decode step, captured by torch.compile

    def forward(self, x: torch.Tensor, caches: list[KVCache] | None = None, step: Step | None = None
                ) -> torch.Tensor:
        if self.compiled_step is not None and step is not None and x.shape[1] == 1 and step.lens is None:
            # One code object serves every stack of the process, each with its own graphs (one row or more, dense
            # or not): dynamo's default of 8 graphs a function would send the later stacks back to eager. Its
            # config is per thread, and the engine steps in a thread of its own: so here, not at compile time.
            if torch._dynamo.config.recompile_limit < GRAPHS:
                torch._dynamo.config.recompile_limit = GRAPHS
            return self.compiled_step(x, caches, step.rows, step.pos, step.span, step.dense)
        return self.norm(self.run_blocks(x, 0, len(self.blocks), caches, step))

    def compile_step(self, **options) -> None:
        """Capture the decode step (one input per row) with torch.compile: one graph for any number of rows, any
        positions and any span (dynamic shapes, so traffic never triggers a recompile), which removes the Python
        and per-operation overhead of a step's ~10 ops per layer. Prefills stay eager."""
        if self.compiled_step is None:  # once: every engine of this model shares the compiled step
            self.compiled_step = torch.compile(self._step, dynamic=True, **options)

    def _step(self, x: torch.Tensor, caches: list[KVCache], rows: torch.Tensor, pos: torch.Tensor, span: int,
              dense: bool) -> torch.Tensor:
        return self.norm(self.run_blocks(x, 0, len(self.blocks), caches, Step(rows, pos, span, dense)))

    def run_blocks(self, x: torch.Tensor, a: int, b: int, caches: list[KVCache] | None = None,
                   step: Step | None = None) -> torch.Tensor:
        """Blocks a..b-1 alone, no final norm (caches: theirs, b - a of them): a swarm server's share."""
        if (caches is None) != (step is None):
            raise ValueError("caches and step go together: both for a cached call, neither for a whole sequence")
        T, rope, where, mask = x.shape[1], None, None, None
        if step is not None:  # where each input sits (n, T), and which cached keys each sees: once for all blocks
            where = step.positions(T, caches[0].max_len + 1)
            mask = step.mask(where)
        if self.use_rope and step is None:  # (T, Dh): positions 0..T-1
            rope = (self.rope_cos[:T], self.rope_sin[:T])
        elif self.use_rope:  # (n, 1, T, Dh): each row's own positions
            at = where.clamp(max=self.max_pos - 1)
            rope = (self.rope_cos[at][:, None], self.rope_sin[at][:, None])
        for i in range(a, b):
            x = self.blocks[i](x, rope, caches[i - a] if caches is not None else None, step, where, mask)
        return x

    def new_caches(self, batch: int, max_len: int, device, dtype) -> list[KVCache]:
        return [KVCache(batch, self.heads, max_len, self.dim // self.heads, device, dtype) for _ in self.blocks]
