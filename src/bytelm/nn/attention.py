"""Causal self-attention through `F.scaled_dot_product_attention` (so CUDA picks flash or memory-efficient kernels),
and the preallocated KV cache it decodes with."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .rotary import apply_rope
from .step import Step


def dropout_active(module: nn.Module) -> bool:
    """Dropout applies in training mode, never under `torch.inference_mode()`: generation and evaluation run there
    and so leave the shared `model.training` flag alone (two threads may use one model at once)."""
    return module.training and not torch.is_inference_mode_enabled()


class KVCache:
    """Keys and values of one attention layer for incremental decoding, preallocated: (B, H, S_max, Dh).

    Preallocation (as in gpt-fast) means a decode step writes one slot and attends over a view of the filled part:
    no concatenation, so the cost of a step grows only with the attention itself. One position more than asked is
    allocated: where padding inputs (a batched prefill's shorter prompts) write.
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, device, dtype) -> None:
        self.k = torch.zeros(batch, heads, max_len + 1, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    @property
    def max_len(self) -> int:
        return self.k.shape[2] - 1

    def update(self, step: Step, where: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (n, H, T, Dh) at positions `where` (n, T) of rows `step.rows` and return the keys and values
        to attend over: positions 0..step.span-1 of those rows (n, H, span, Dh). `Step.mask` hides the later ones."""
        if step.span > self.max_len:
            raise RuntimeError(f"KV cache overflow: span {step.span} > cache length {self.max_len}")
        r = step.rows[:, None]
        self.k[r, :, where] = k.transpose(1, 2)  # (n, T, H, Dh): advanced indices first
        self.v[r, :, where] = v.transpose(1, 2)
        if step.dense:  # views: no copy of the cache
            return self.k[: step.n, :, : step.span], self.v[: step.n, :, : step.span]
        return self.k[step.rows, :, : step.span], self.v[step.rows, :, : step.span]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, bias: bool, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, dim // heads, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, rope=None, cache: KVCache | None = None, step: Step | None = None,
                where: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Without a cache: the whole sequence, causal. With one: T inputs of `step`'s rows at positions `where`
        (n, T), attending over the cache under `mask` (n, 1, T, span) or, where it is None, causally."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, H, T, Dh)
        if rope is not None:
            q, k = apply_rope(qkv[:2], *rope).unbind(0)  # q and k rotated together: half the ops
            v = qkv[2]
        else:
            q, k, v = qkv.unbind(0)
        if cache is not None:
            k, v = cache.update(step, where, k, v)  # (B, H, S, Dh), S = step.span
        causal = mask is None and T > 1
        y = attend(q, k, v, mask, causal, self.dropout if dropout_active(self) else 0.0)  # (B, H, T, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


# Longest key sequence that `attend` computes as plain matmuls on a CPU in bf16. Past it SDPA's kernel, which never
# holds the (B, H, T, S) scores, wins: at (8, 4, T, 64) level at T = 256, 0.7x at 512, 0.34x at 1024 (1 thread)
MATMUL_ATTENTION_MAX_KEYS = 256


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
           dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh) + mask) v: q (B, H, T, Dh), k and v (B, H, S, Dh), mask bool (True: attend) or None,
    `causal` for T == S with no mask.

    `F.scaled_dot_product_attention` everywhere (CUDA picks flash or memory-efficient kernels), except on a CPU in
    bf16 over short sequences (up to MATMUL_ATTENTION_MAX_KEYS keys): there its fused kernel takes 2-3x as long,
    forward and backward, as the same attention written as two matmuls and a softmax (measured at 1 thread for the
    benchmark model's shapes: global (8, 4, 128, 64) 10.0 vs. 3.3 ms, local (1024, 2, 11, 32) 18.1 vs. 8.0 ms),
    while in fp32 it is the faster one.
    Same function either way: outputs agree to bf16 rounding."""
    S = k.shape[-2]
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or S > MATMUL_ATTENTION_MAX_KEYS:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p)
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (B, H, T, S)
    if causal:
        T = q.shape[-2]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    if dropout_p > 0:
        probs = F.dropout(probs, dropout_p)
    return probs.to(v.dtype) @ v
