"""Which precision a run computes in: `TrainConfig.precision` resolved for a device.

    fp32   fp32 everywhere
    bf16   bf16 autocast (weights, gradients and AdamW state stay fp32)
    auto   bf16 autocast on CUDA, and on a CPU with native bf16 matrix instructions (avx512_bf16 or AMX): a training
           step there takes half the time of an fp32 one, for a model that learns about as much per step (MEGABYTE
           at the benchmark shape, 150 steps: 2.845 vs. 2.844 bpb at one seed, 2.916 vs. 2.826 at another), so it
           learns more in a given time (docs/logbook.md, bytelm 0.3). fp32 on any other
           CPU, where bf16 would be emulated (slower)
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

_NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU has bf16 matrix instructions (Linux: a flag in /proc/cpuinfo); False where unknown."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return any(flag in flags for flag in _NATIVE_BF16_FLAGS)
    except OSError:
        return False
    return False


def uses_bf16(precision: str, device: torch.device) -> bool:
    """Whether a run with this `precision` setting computes in bf16 autocast on `device`."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())
    return precision == "bf16"


def autocast_for(precision: str, device: torch.device):
    """The context a forward pass runs in: bf16 autocast (see `uses_bf16`) or a no-op."""
    if uses_bf16(precision, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
