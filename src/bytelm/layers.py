"""Transformer building blocks shared by MEGABYTE's global and local models and the byte transformer baseline.

Pre-norm blocks (GPT-2 style), attention through `F.scaled_dot_product_attention` so CUDA picks flash or
memory-efficient kernels, optional rotary positions, and a preallocated KV cache per layer for incremental decoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class KVCache:
    """Keys and values of one attention layer for incremental decoding, preallocated: (B, H, S_max, Dh).

    Preallocation (as in gpt-fast) means a decode step writes one slot and attends over a view of the filled part:
    no concatenation, so the cost of a step grows only with the attention itself.
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device, dtype) -> None:
        self.k = torch.zeros(batch, heads, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, H, n, Dh) at positions pos..pos+n-1; return all keys/values so far (B, H, pos+n, Dh)."""
        end = pos + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: position {end} > cache length {self.max_len}")
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def rope_tables(max_pos: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (Su et al. 2021) over the full head width, each (max_pos, head_dim), float32:
    cos = [cos, cos] and sin = [-sin, sin] of the angles, so that `apply_rope` is two multiplies and an add."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)  # (max_pos, head_dim // 2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + Dh/2]) of x (..., T, Dh) by the angles in cos/sin (T, Dh):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). Few ops on purpose: in decoding this runs per layer per byte."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((x2, x1), dim=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, rope=None, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        if rope is not None:
            q, k = apply_rope(qkv[:2], *rope).unbind(0)  # q and k rotated together: half the ops
            v = qkv[2]
        else:
            q, k, v = qkv.unbind(0)
        if cache is not None:
            k, v = cache.update(pos, k, v)  # (B, H, S, Dh), S = pos + T
        S = k.shape[2]
        mask, causal = None, False
        if T == S:
            causal = T > 1  # whole sequence (or a prefill from position 0)
        elif T > 1:  # a chunk after a cached prefix: query i (at pos + i) sees keys 0..pos + i
            mask = torch.arange(S, device=x.device)[None, :] <= torch.arange(pos, pos + T, device=x.device)[:, None]
        # T == 1 with a cache: the one new query sees every cached key, no mask needed.
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )  # (B, H, T, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float, bias: bool, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, bias=bias)
        self.attn = Attention(dim, heads, bias, dropout)
        self.norm2 = nn.LayerNorm(dim, bias=bias)
        self.mlp = MLP(dim, int(mlp_ratio * dim), bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, rope=None, cache: KVCache | None = None, pos: int = 0) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), rope, cache, pos))
        return x + self.drop(self.mlp(self.norm2(x)))


class TransformerStack(nn.Module):
    """`layers` pre-norm blocks and a final norm over sequences of up to `max_pos` positions.

    Used three times: MEGABYTE's global model (over patches), its local model (over the bytes of one patch) and the
    byte transformer baseline (over bytes). `forward(x, caches, pos)` runs positions pos..pos+T-1.
    """

    def __init__(self, dim, layers, heads, mlp_ratio, bias, dropout, max_pos, rope: bool, rope_base: float) -> None:
        super().__init__()
        self.dim, self.heads, self.max_pos = dim, heads, max_pos
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, bias, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim, bias=bias)
        self.use_rope = rope
        if rope:  # not saved: derived from the config
            cos, sin = rope_tables(max_pos, dim // heads, rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, caches: list[KVCache] | None = None, pos: int = 0) -> torch.Tensor:
        T = x.shape[1]
        rope = (self.rope_cos[pos : pos + T], self.rope_sin[pos : pos + T]) if self.use_rope else None
        for i, block in enumerate(self.blocks):
            x = block(x, rope, caches[i] if caches is not None else None, pos)
        return self.norm(x)

    def new_caches(self, batch: int, max_len: int, device, dtype) -> list[KVCache]:
        return [KVCache(batch, self.heads, max_len, self.dim // self.heads, device, dtype) for _ in self.blocks]


def init_weights(model: nn.Module, num_layers: int) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, and residual output projections scaled by
    1/sqrt(2 * layers) so the residual stream's variance does not grow with depth (Radford et al. 2019)."""
    for name, p in model.named_parameters():
        if p.dim() < 2 and not name.endswith("_pad") and not name.endswith("bos"):
            continue  # LayerNorm weights/biases and Linear biases keep their defaults (ones / zeros)
        if name.endswith("proj.weight"):
            nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * num_layers))
        else:
            nn.init.normal_(p, mean=0.0, std=0.02)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
