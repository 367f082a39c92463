"""Causal self-attention through `F.scaled_dot_product_attention` (so CUDA picks flash or memory-efficient kernels),
and the preallocated KV cache it decodes with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rotary import apply_rope


def dropout_active(module: nn.Module) -> bool:
    """Dropout applies in training mode, never under `torch.inference_mode()`: generation and evaluation run there
    and so leave the shared `model.training` flag alone (two threads may use one model at once)."""
    return module.training and not torch.is_inference_mode_enabled()


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
            q, k, v, attn_mask=mask, is_causal=causal, dropout_p=self.dropout if dropout_active(self) else 0.0
        )  # (B, H, T, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))
