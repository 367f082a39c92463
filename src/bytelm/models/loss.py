"""The training objective every bytelm model shares (its own module: the model base class and the memory estimates
both need it)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import VOCAB_SIZE


def byte_loss(logits: torch.Tensor, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in nats of logits (B, T, 256) against the bytes x (B, T) they predict: every byte counts."""
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), x.reshape(-1).long(), reduction=reduction)
