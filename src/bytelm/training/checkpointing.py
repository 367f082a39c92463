"""Training checkpoints: a folder per step, written whole before `latest` points at it.

    checkpoints/latest            name of the newest complete checkpoint (rewritten atomically, last)
    checkpoints/step-0000200/     the model (or a fine-tune's adapter) folder's files, optimizer.safetensors
                                  (optimizer moments, RNG state), trainer_state.json

The checkpoint is written into a hidden temporary folder, every file and the folder are fsynced, it is renamed into
place and its parent fsynced, and only then does `latest` move: a kill or a power loss at any moment leaves the
previous checkpoint whole and pointed to.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..io import atomic_write_text, finish_folder, fsync_dir, latest_checkpoint, read_json_object, read_weights

OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"


def write_checkpoint(root: Path, step: int, write_weights: Callable[[Path], None], tensors: dict[str, torch.Tensor],
                     state: dict[str, Any], keep: int) -> Path:
    """Write checkpoint `step-NNNNNNN` under `root` (weights by `write_weights(folder)`, optimizer tensors, trainer
    state), make it durable, point `latest` at it, and keep only the newest `keep` checkpoints."""
    name = f"step-{step:07d}"
    final, tmp = root / name, root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_weights(tmp)
    save_file(tensors, tmp / OPTIMIZER_NAME)
    (tmp / STATE_NAME).write_text(json.dumps(state))
    finish_folder(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(root)
    atomic_write_text(root / "latest", name + "\n")  # the commit point (fsynced, and its folder)
    kept = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in kept[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(run_dir: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """(folder, optimizer tensors, trainer state) of a run's latest checkpoint, or None if it has none."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    return ckpt, read_weights(ckpt / OPTIMIZER_NAME), read_json_object(ckpt / STATE_NAME)
