"""The training objective every bytelm model shares (its own module: the model base class and the memory estimates
both need it), and its chunked form for long sequences.

At long lengths the logits dominate a training step's memory: 1,048,576 bytes x 256 values is 1 GiB in fp32, and
cross-entropy keeps its log-softmax (another GiB) and the backward pass a gradient of each. `chunked_byte_loss` sums
the loss over chunks of the sequence, each chunk's head (and, in MEGABYTE, its local model) recomputed in the
backward pass, so that no more than one chunk's logits and activations exist at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .config import VOCAB_SIZE

# Bytes of the sequence (over the whole batch) whose logits and local activations one chunk of the chunked loss
# holds: 64 KiB makes 16 chunks of 1,048,576 bytes, each under a GB for the small presets (64 Ki x 256 fp32 logits
# are 64 MiB, and their log-softmax and gradients as much again), and few enough that their Python overhead is nil.
LOSS_CHUNK_BYTES = 1 << 16

REDUCTIONS = ("mean", "sum", "none")


def byte_loss(logits: torch.Tensor, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in nats of logits (B, T, 256) against the bytes x (B, T) they predict: every byte counts."""
    return F.cross_entropy(logits.reshape(-1, VOCAB_SIZE).float(), x.reshape(-1).long(), reduction=reduction)


def chunked_byte_loss(chunk_losses: Callable[[int, int], torch.Tensor], n: int, step: int, num_bytes: int,
                      reduction: str, recompute: Callable[..., torch.Tensor]) -> torch.Tensor:
    """`byte_loss` of a whole sequence from its chunks: `chunk_losses(i, j)` gives the per-byte losses (B, m) of the
    bytes that units i..j-1 (of n: patches, positions) predict, and runs through `recompute(chunk_losses, i, j)`,
    which keeps none of its activations for the backward pass. `num_bytes`: B * T, the bytes the mean is over."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    parts = [recompute(chunk_losses, i, min(i + step, n)) for i in range(0, n, step)]  # each (B, m)
    if reduction == "none":  # (B*T,) in the order byte_loss gives: row by row
        return torch.cat(parts, dim=1).reshape(-1)
    total = torch.stack([p.sum() for p in parts]).sum()
    return total / num_bytes if reduction == "mean" else total
