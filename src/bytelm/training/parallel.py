"""Parallelism, kept out of the training loop and the models (torchtitan's way): how processes find each other and
how a model is wrapped for them. Today data parallel (DDP under torchrun); sharding (FSDP2) plugs in here.

    env = ParallelEnv.from_environment(device)   # rank, world size, this process's device
    forward = wrap_model(model, env)             # what the training step calls; `model` keeps the weights
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


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


def no_sync(forward: torch.nn.Module, sync: bool):
    """A context in which a DDP backward does not all-reduce (accumulation micro-steps but the last)."""
    module = getattr(forward, "_orig_mod", forward)  # under torch.compile: the wrapped DDP module
    if sync or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()
