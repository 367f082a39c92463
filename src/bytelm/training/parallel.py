"""Parallelism, kept out of the training loop and the models (torchtitan's way): how processes find each other and
how a model is prepared for them.

    env = ParallelEnv.from_environment(device)       # rank, world size, this process's device
    forward = wrap_model(model, env)                 # ddp: what the training step calls; `model` keeps the weights
    shard_model(model, env, local_prefixes, ...)     # fsdp: shards `model` in place (FSDP2), which the step calls

Two strategies under torchrun:
    ddp    every rank holds the whole model, its gradients and its optimizer state; gradients are all-reduced
    fsdp   FSDP2 (`fully_shard`): every parameter, its gradient and its optimizer state sharded on dim 0 across the
           ranks; a transformer block's parameters are all-gathered just before it runs and freed after, gradients
           reduce-scattered. Per-rank training state is ~1/N of DDP's (README, "Training on many devices").
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ..nn import Block

STRATEGIES = ("ddp", "fsdp")
FSDP_LOCAL = ("shard", "root")


@dataclass
class ParallelEnv:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls, device: torch.device) -> ParallelEnv:
        """One process, or (under torchrun, WORLD_SIZE > 1) a process group: NCCL on CUDA, gloo on the CPU."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        return cls(device, dist.get_rank(), dist.get_world_size())

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision for every process (clocks differ: ranks must stop at the same step)."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every process (collective)."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shared(self, value: float) -> float:
        """Rank 0's value for every process (a wall-clock reading that must not differ between ranks)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.broadcast(t, src=0)
        return float(t.item())

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, env: ParallelEnv) -> torch.nn.Module:
    """The module the training step calls: the model itself, or a DDP wrapper that all-reduces its gradients."""
    if not env.distributed:
        return model
    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def shard_model(model: torch.nn.Module, env: ParallelEnv, local_prefixes: tuple[str, ...] = (),
                fsdp_local: str = "shard", bf16: bool = False, compile_blocks: bool = False) -> None:
    """FSDP2 in place, in torchtitan's order (torchtitan/models/llama3/infra/parallelize.py): activation
    checkpointing is already applied to each block's forward (`enable_activation_checkpointing`), then each block is
    compiled (`compile_blocks`), then `fully_shard` each transformer block bottom-up and last the root, whose unit
    holds what is left (embeddings, norms, pads, the output head).

    `fsdp_local`: "shard" shards the local model's blocks one by one like the global model's; "root" leaves them in
    the root's unit (gathered once per forward: fewer, larger collectives for a small local model). `bf16`: a
    MixedPrecisionPolicy that gathers and computes in bf16 and reduces gradients in fp32 (the sharded parameters and
    optimizer state stay fp32). One rank: nothing to shard, the model is left as it is (its checkpoints are still
    sharded-format, so a 1-rank run resumes on N and back)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, Block)]
    if compile_blocks:
        for _, block in blocks:
            block.compile()
    if not env.distributed:
        return
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
        MixedPrecisionPolicy()
    for name, block in blocks:
        if fsdp_local == "root" and local_prefixes and name.startswith(local_prefixes):
            continue
        fully_shard(block, mp_policy=mp)
    # FSDP2 gathers a unit's parameters in a hook on its forward: every call the trainer makes goes through the
    # root's __call__ (`loss` too), never a decoding entry point (a sample is generated from a gathered copy)
    fully_shard(model, mp_policy=mp)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (the tensor itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A sharded or replicated tensor's whole value on every rank (collective for a sharded one)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def no_sync(forward: torch.nn.Module, sync: bool):
    """A context in which a DDP backward does not all-reduce (accumulation micro-steps but the last)."""
    module = getattr(forward, "_orig_mod", forward)  # under torch.compile: the wrapped DDP module
    if sync or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()
