"""Rotary position embeddings (Su et al. 2021, arXiv 2104.09864), as full-width tables so that applying them to
queries and keys is two multiplies and an add."""

from __future__ import annotations

import torch


def rope_tables(max_pos: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables over the full head width, each (max_pos, head_dim), float32:
    cos = [cos, cos] and sin = [-sin, sin] of the angles, so that `apply_rope` is two multiplies and an add.
    Under `torch.device("meta")` (a model built for its shapes only) they are shapes only: no values to compute."""
    if torch.get_default_device().type == "meta":
        return torch.empty(max_pos, head_dim), torch.empty(max_pos, head_dim)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv_freq)  # (max_pos, head_dim // 2)
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + Dh/2]) of x (..., T, Dh) by the angles in cos/sin (T, Dh):
    (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin). Few ops on purpose: in decoding this runs per layer per byte."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((x2, x1), dim=-1) * sin.to(x.dtype)
