"""Next-byte sampling from logits: greedy, temperature, top-k and nucleus (top-p), with settings checked up front."""

from __future__ import annotations

import math
import numbers

import torch

from ..errors import GenerationError, GenerationFailed

# Logits are sampled in float32: a temperature or top-p below its smallest normal number (~1.2e-38) would be divided
# by or compared as 0 or a denormal there, and could not give a distribution to sample from.
SMALLEST = torch.finfo(torch.float32).tiny
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0..2**64 - 1 (and negative ones, which it wraps)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """One clear error for any setting `sample` cannot honour (NaN, infinities and float32 underflow included)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise GenerationError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if 0 < temperature < SMALLEST:
        raise GenerationError(f"temperature {temperature!r} underflows float32 (below {SMALLEST:.2g}): nothing can be "
                              "sampled at it; use 0 for greedy decoding")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                              or not 1 <= top_k <= 256):
        raise GenerationError(f"top_k must be an integer in 1..256, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0.0 < top_p <= 1.0):  # NaN fails the comparison too
        raise GenerationError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_p is not None and top_p < SMALLEST:
        raise GenerationError(f"top_p {top_p!r} underflows float32 (below {SMALLEST:.2g}): no byte would be kept; "
                              "use a larger top_p, or temperature 0 for greedy decoding")


def check_seed(seed: int | None) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed <= MAX_SEED):
        raise GenerationError(f"seed must be an integer in 0..2**64-1, got {seed!r}")


def check_logits(logits: torch.Tensor) -> None:
    """A model whose output is NaN or infinite (broken weights, an overflow) cannot be sampled from: say so, rather
    than let argmax pick an arbitrary byte or multinomial fail deep inside torch."""
    if not bool(torch.isfinite(logits).all()):
        raise GenerationFailed("the model's next-byte logits are not finite (NaN or inf): its weights, or a remote "
                               "server's output, are broken")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next bytes (B,) from logits (B, 256). temperature 0 is greedy; top_k keeps the k likeliest bytes; top_p keeps
    the smallest set whose probability reaches p (nucleus sampling, Holtzman et al. 2019). Non-finite logits are a
    `GenerationFailed`."""
    check_logits(logits)
    if temperature == 0:
        return logits.argmax(dim=-1)
    # shifted so the largest is 0 before dividing: a tiny temperature sends the others to -inf, never overflows to
    # inf (inf - inf would be NaN in the softmax)
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this byte already reaches p
        drop_sorted[:, 0] = False  # the likeliest byte always stays, whatever rounding did to the sums
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
