"""The memory a training run needs, estimated before its model is built (bytelm.models.memory measures the model and
its activations on the meta device), so that a batch or model too large for the device is refused with the estimate
instead of being allocated.

    weights        parameters and buffers (fp32)
    gradients      one per trained parameter (fp32); under torchrun, DDP's gradient buckets hold another copy
    optimizer      AdamW: two moments per parameter; Muon: one momentum per matrix it trains
    activations    what the forward pass keeps for the backward pass, measured for one sequence on the meta device,
                   scaled to the batch, times ACTIVATION_FACTOR; plus bf16 autocast's copies of the weights. With
                   activation checkpointing: what stays between the recomputed segments (blocks, chunks of the
                   chunked loss) and the largest segment, recomputed (bytelm.models.memory.Activations)
"""

from __future__ import annotations

import ctypes
import math
import sys

from torch import nn

from ..models.memory import lora_shapes, skeleton, training_activations
from .optim import in_blocks
from .precision import uses_bf16

# The peak of a training step over what its forward pass saves: the backward pass holds gradients of activations
# alongside them, and the allocator keeps freed memory. Measured on a CPU (peak RSS of two training steps, fp32, small
# presets at batch 4-16): 1.65-1.8x the saved bytes (1.2-1.4x with glibc returning freed memory at once); with
# activation checkpointing 2.8-3.4x what it keeps. 1.5x keeps the whole estimate at 0.76-1.04x a real step's peak RSS
# (0.97x in bf16, ~0.6x with checkpointing): the check refuses what cannot fit, not a run that would. With the chunked
# loss (activation checkpointing) and large allocations mapped (map_large_allocations): 1.99 GB estimated
# for `bytelm train` on one 1,048,576-byte sequence (MEGABYTE P=32, 3.3M params, fp32), whose whole process peaked at
# 1.80 GB (/usr/bin/time -v); with glibc's default allocator the same step peaked at 6.3 GB (its heap grows chunk
# after chunk; benchmarks/results/full/long_training.md).
ACTIVATION_FACTOR = 1.5
# bf16 autocast saves 0.64-0.8x the bytes fp32 saves (MEGABYTE / byte transformer `small`, measured on a CPU)
BF16_ACTIVATIONS = 0.8


def training_parts(model_config, batch: int, seq_len: int, optimizer: str, precision: str, device,
                   activation_checkpointing: bool = False, distributed: bool = False,
                   lora: tuple[str, int, float] | None = None) -> list[tuple[str, int]]:
    """(label, bytes) of what a training step of `batch` sequences of `seq_len` bytes holds at its peak; a label's
    `{}` is where its size goes. `lora`: (target regex, rank, dropout) of a LoRA fine-tune: the base frozen, only its
    adapters trained."""
    skel = skeleton(model_config)
    weights = sum(t.nbytes for t in (*skel.parameters(), *skel.buffers()))
    if lora is None:
        trained = {n: tuple(p.shape) for n, p in skel.named_parameters()}
    else:
        trained = lora_shapes(model_config, lora[0], lora[1])
        weights += 4 * sum(math.prod(s) for s in trained.values())
    numel = sum(math.prod(s) for s in trained.values())
    by_muon = sum(math.prod(s) for n, s in trained.items() if optimizer == "muon" and len(s) == 2 and in_blocks(n))
    acts = training_activations(model_config, seq_len, lora).nbytes(batch, activation_checkpointing)
    activations = int(ACTIVATION_FACTOR * acts)
    if uses_bf16(precision, device):  # and autocast keeps a bf16 copy of every Linear weight for the step
        activations = int(activations * BF16_ACTIVATIONS) + sum(2 * m.weight.numel() for m in skel.modules()
                                                                if isinstance(m, nn.Linear))
    return [("weights", weights),
            ("gradients", 4 * numel * (2 if distributed else 1)),  # DDP's buckets: another copy
            ("optimizer", 8 * (numel - by_muon) + 4 * by_muon),  # AdamW: two moments; Muon: one momentum
            (f"activations {{}} for batch {batch:,} x {seq_len:,}", activations)]


# glibc's mallopt parameter: allocations of at least this many bytes get their own mmap, unmapped when freed
_M_MMAP_THRESHOLD = -3


def map_large_allocations(threshold: int = 1 << 20) -> bool:
    """Have glibc's malloc serve every allocation of `threshold` bytes or more by its own mmap, returned to the OS as
    soon as it is freed; True if it took. By default glibc raises that threshold (up to 32 MiB) each time such a
    block is freed and serves the sizes below it from its heap, which it keeps and fragments: the chunked loss makes
    and frees the same 1-32 MiB tensors chunk after chunk, and a training step's peak resident set grew with the
    number of chunks. Measured on this project's 2-core CPU (MEGABYTE P=32, batch 1, benchmarks/long_training.py's
    step): 131,072 bytes (2 chunks) peaked at 2.26 GB with glibc's default and 1.16 GB with a 1 MiB threshold.
    Linux with glibc only; a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


__all__ = ["ACTIVATION_FACTOR", "BF16_ACTIVATIONS", "map_large_allocations", "training_parts"]
