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

`state_bytes(config, optimizer, strategy, world)`: the training state one rank holds under data parallel (DDP) or
sharded data parallel (FSDP2) at `world` ranks: parameters, gradients, optimizer state and the transient weights a step
materialises (benchmarks/parallel_memory.py tabulates it for the paper presets).
"""

from __future__ import annotations

import ctypes
import math
import sys

import torch
from torch import nn

from ..models.memory import lora_shapes, skeleton, training_activations
from ..nn import Block
from .optim import in_blocks
from .parallel import STRATEGIES, local
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
                   lora: tuple[str, int, float] | None = None, sharded_over: int = 1) -> list[tuple[str, int]]:
    """(label, bytes) of what a training step of `batch` sequences of `seq_len` bytes holds at its peak; a label's
    `{}` is where its size goes. `lora`: (target regex, rank, dropout) of a LoRA fine-tune: the base frozen, only its
    adapters trained. `sharded_over`: the ranks FSDP2 shards the model over (`state_bytes` for the weights,
    gradients and optimizer state of one rank, and what it gathers at a step's peak)."""
    if sharded_over > 1 and lora is None:
        bf16 = uses_bf16(precision, device)
        state = state_bytes(model_config, optimizer, "fsdp", sharded_over, "bf16" if bf16 else "fp32")
        acts = training_activations(model_config, seq_len).nbytes(batch, activation_checkpointing)
        activations = int(ACTIVATION_FACTOR * acts * (BF16_ACTIVATIONS if bf16 else 1))
        return [("weights (this rank's shards)", state["params"]), ("gradients (shards)", state["grads"]),
                ("optimizer (shards)", state["optimizer"]),
                ("weights gathered at a time and Muon's scratch", state["unsharded"] + state["muon"]),
                (f"activations {{}} for batch {batch:,} x {seq_len:,}", activations)]
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


# bytes per element of the weights a step computes with: fp32, or bf16 (autocast under DDP; FSDP2's
# MixedPrecisionPolicy(param_dtype=torch.bfloat16) under FSDP)
_COMPUTE_BYTES = {"fp32": 4, "bf16": 2}


def shard_rows(rows: int, world: int, rank: int) -> tuple[int, int]:
    """(rows held, rows allocated) of a tensor's dim 0 on `rank` of `world` under FSDP2. FSDP2 splits dim 0 with
    torch.chunk (torch/distributed/fsdp/_fully_shard/_fsdp_common.py, `_chunk_with_empty`: ceil(rows / world) rows a
    chunk, the last ones shorter or empty) and allocates every rank's shard at chunk 0's size, zero-padded
    (_fsdp_param.py, `FSDPParam._init_sharded_param`: `padded_sharded_size = chunks[0].size()  # 0th always padded`,
    `param_data.new_zeros(padded_sharded_size)`; the gradients' reduce-scatter output is padded alike,
    _fsdp_collectives.py `foreach_reduce`, `_get_dim0_padded_size`)."""
    chunk = -(-rows // world)
    return min(chunk, max(0, rows - rank * chunk)), chunk


def _muon_scratch(shape: tuple[int, ...]) -> int:
    """Elements live at once while Muon orthogonalises one m x n matrix (s = min(m, n)), in the fp32 Newton-Schulz
    iteration (bytelm.training.optim.newton_schulz_fp32): the update it is given (m n), the normalised iterate x and
    the next one (2 m n), and the s x s Gram matrix and its polynomial (2 s^2): 3 m n + 2 s^2, 3.5x the matrix for the
    blocks' 4:1 MLP matrices, 5x for a square one. Under FSDP the matrix's owner first gathers it whole (the m n
    update). torch.optim.Muon's bf16 iteration (on CUDA) holds half of the iteration's part."""
    m, n = shape
    return 3 * m * n + 2 * min(m, n) ** 2


def state_bytes(model_config, optimizer: str, strategy: str, world: int, precision: str = "fp32"
                ) -> dict[str, int]:
    """Bytes one rank of `world` holds for training a model of `model_config` (counted on its skeleton, nothing
    allocated), by part:

        params       the fp32 parameters: whole under DDP; under FSDP2 (`fully_shard` on each transformer block, then
                     the root) every parameter's shard of dim 0, padded to ceil(rows / world) rows (`shard_rows`)
        grads        fp32 gradients, one per parameter: under DDP at world > 1 twice (DDP's gradient buckets hold
                     another copy; a single process runs without DDP), under FSDP2 sharded as the parameters
        optimizer    AdamW: two fp32 moments per parameter; Muon (`optimizer="muon"`): one fp32 momentum per
                     matrix of the transformer blocks (what `in_blocks` names; 2-D), AdamW's two for the rest;
                     sharded as the parameters under FSDP2, but not padded (the optimizer makes them like the
                     parameters' unpadded local shards): the figure is rank 0's, which holds the most, ceil(rows /
                     world) rows of each (a 2-process gloo run in tests/test_memory.py checks all three)
        unsharded    transient: the weights in the compute dtype (`precision`: 4 bytes fp32, 2 bf16) held beyond the
                     fp32 parameters at the step's peak. FSDP2: the root unit's parameters (those of no block: the
                     root stays unsharded from forward to backward) and the largest block's, all-gathered one block at
                     a time. Not counted: in the backward pass that block's unsharded gradients before their
                     reduce-scatter (as large, in the reduce dtype) and the next block's prefetched all-gather (as
                     large again): up to 3x the block's part. DDP in bf16: autocast's cached bf16 copy of every
                     Linear weight, kept from forward to backward (`training_parts` counts it with the activations);
                     0 in fp32
        muon         transient, Muon only: the largest block matrix's Newton-Schulz iteration in fp32 (`_muon_scratch`:
                     3 m n + 2 min(m, n)^2 elements, 3.5-5x the matrix), one matrix at a time; under FSDP2 on the
                     rank that owns the matrix, which gathers it whole
        total        their sum

    Activations are not here: they are the same per rank under both strategies, for the batch each rank runs
    (`training_parts`)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy {strategy!r}: one of {', '.join(STRATEGIES)}")
    if precision not in _COMPUTE_BYTES:
        raise ValueError(f"precision {precision!r}: one of {', '.join(_COMPUTE_BYTES)}")
    if world < 1:
        raise ValueError(f"world {world}: at least 1")
    if world == 1:  # one rank: nothing to shard (bytelm.training.parallel.shard_model leaves the model whole)
        strategy = "ddp"
    skel = skeleton(model_config)
    shapes = {n: tuple(p.shape) for n, p in skel.named_parameters()}
    muon = {n for n, s in shapes.items() if optimizer == "muon" and len(s) == 2 and in_blocks(n)}

    def held(shape: tuple[int, ...]) -> int:  # elements of a parameter this rank allocates
        if strategy == "ddp":
            return math.prod(shape)
        return shard_rows(shape[0], world, 0)[1] * math.prod(shape[1:])

    per = {n: held(s) for n, s in shapes.items()}
    params = 4 * sum(per.values())
    grads = params * (2 if strategy == "ddp" and world > 1 else 1)
    optim = sum(4 * k if n in muon else 8 * k for n, k in per.items())
    compute = _COMPUTE_BYTES[precision]
    if strategy == "fsdp":
        blocks = [m for m in skel.modules() if isinstance(m, Block)]
        in_block = {id(p) for b in blocks for p in b.parameters()}
        root = sum(p.numel() for p in skel.parameters() if id(p) not in in_block)
        largest = max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0)
        unsharded = compute * (root + largest)
    else:
        unsharded = 0 if precision == "fp32" else compute * sum(m.weight.numel() for m in skel.modules()
                                                                 if isinstance(m, nn.Linear))
    scratch = 4 * max((_muon_scratch(shapes[n]) for n in muon), default=0)
    parts = dict(params=params, grads=grads, optimizer=optim, unsharded=unsharded, muon=scratch)
    return {**parts, "total": sum(parts.values())}


def held_bytes(model: nn.Module, optimizer) -> dict[str, int]:
    """What this rank holds, measured: bytes of `model`'s parameters, of their gradients (as they are now) and of
    `optimizer`'s state tensors (both parts of a Muon + AdamW); a sharded tensor counts its local shard. What
    `state_bytes` computes, on a built model."""
    params = list(model.parameters())
    parts = getattr(optimizer, "parts", {"": optimizer}).values()
    moments = sum(local(v).nbytes for opt in parts for st in opt.state.values() for v in st.values()
                  if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"params": sum(local(p).nbytes for p in params),
            "grads": sum(local(p.grad).nbytes for p in params if p.grad is not None), "optimizer": moments}


__all__ = ["ACTIVATION_FACTOR", "BF16_ACTIVATIONS", "STRATEGIES", "held_bytes", "map_large_allocations", "shard_rows",
           "state_bytes", "training_parts"]
