"""Training checkpoints: a folder per step, written whole before `latest` points at it.

    checkpoints/latest            name of the newest complete checkpoint (rewritten atomically, last)
    checkpoints/step-0000200/     the model (or a fine-tune's adapter) folder's files, optimizer.safetensors
                                  (optimizer moments, RNG state), trainer_state.json; a `--parallel fsdp` run's
                                  holds sharded/ (every rank's shards: bytelm.training.sharded) instead of
                                  optimizer.safetensors

The checkpoint is written into a hidden temporary folder, every file and the folder are fsynced, it is renamed into
place and its parent fsynced, and only then does `latest` move: a kill or a power loss at any moment leaves the
previous checkpoint whole and pointed to.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException

from ..errors import CheckpointError
from ..io import (
    SHARDED_DIR,
    atomic_write_text,
    checkpoint_steps,
    finish_folder,
    fsync_dir,
    latest_checkpoint,
    read_json_object,
    read_weights,
)
from .parallel import ParallelEnv

OPTIMIZER_NAME = "optimizer.safetensors"
STATE_NAME = "trainer_state.json"


def write_checkpoint(root: Path, step: int, write_files: Callable[[Path], None], state: dict[str, Any], keep: int,
                     env: ParallelEnv | None = None) -> Path | None:
    """Write checkpoint `step-NNNNNNN` under `root` (its weights and optimizer state by `write_files(folder)`, then
    the trainer state), make it durable, point `latest` at it, and keep only the newest `keep` checkpoints up to this
    one. With a distributed `env` every rank calls it and `write_files` writes that rank's shards; rank 0 makes the
    folder, and commits it once every rank has written (a shared file system for several machines); it returns the
    folder on rank 0, None elsewhere.

    A write that fails (a full disk, a quota), on any rank, removes what was written and is a `CheckpointError` on
    every rank; the previous checkpoint and `latest` are untouched. Checkpoints of later steps than this one are never
    pruned here: a run resumed from an earlier checkpoint sets those aside first (`set_aside_later`)."""
    name = f"step-{step:07d}"
    final, tmp = root / name, root / f".{name}.tmp"
    together = env is not None and env.distributed
    master = env is None or env.master
    error: BaseException | None = None
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
        except OSError as e:
            error = e
    if not together or env.all_true(error is None):  # (collective) the folder exists
        try:
            write_files(tmp)
        except (OSError, SafetensorError, CheckpointException) as e:  # safetensors and DCP report their own
            error = e
        if together and not env.all_true(error is None):  # (collective) every rank wrote its part
            error = error or OSError("another rank could not write its part")
    else:
        error = error or OSError("rank 0 could not make the checkpoint's folder")
    moved = False
    if error is None and master:
        try:
            (tmp / STATE_NAME).write_text(json.dumps(state))
            finish_folder(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            moved = True
            fsync_dir(root)
            atomic_write_text(root / "latest", name + "\n")  # the commit point (fsynced, and its folder)
        except OSError as e:
            error = e
    if together and not env.agree(error is None):
        error = error or OSError("rank 0 could not commit it")
    if error is not None:
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
            if moved:  # complete, but `latest` could not be moved to it: leave no folder that nothing names
                shutil.rmtree(final, ignore_errors=True)
        previous = latest_checkpoint(root.parent)
        raise CheckpointError(f"could not write checkpoint {name}: {os_reason(error)}; nothing of it was kept, and "
                              + (f"checkpoints/latest still names {previous.name}" if previous else
                                 "no earlier checkpoint exists") + ". Free some space and resume with --resume."
                              ) from None
    if not master:
        return None
    for old in [p for s, p in checkpoint_steps(root).items() if s < step][: -(keep - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def first_failure(e: BaseException) -> BaseException:
    """The exception itself, or for DCP's CheckpointException (which carries every failed rank's (exception,
    traceback)) the first rank's."""
    if isinstance(e, CheckpointException) and e.failures:
        return next(iter(e.failures.values()))[0]
    return e


def os_reason(e: BaseException) -> str:
    """What went wrong in a failed write, as the system says it ("No space left on device")."""
    e = first_failure(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    m = re.search(r"os error (\d+)", str(e))
    return os.strerror(int(m.group(1))) if m else str(e)


def set_aside_later(root: Path, step: int) -> Path | None:
    """Move the checkpoints of steps after `step` (a run resumed from an earlier one, after `latest` was rolled
    back) into `root/rolled-back-<time>/`, so that neither pruning nor this run's own later checkpoints touch them.
    Returns that folder, or None when there were none."""
    later = [p for s, p in checkpoint_steps(root).items() if s > step]
    if not later:
        return None
    aside = root / f"rolled-back-{time.strftime('%Y%m%d-%H%M%S')}-from-step-{step:07d}"
    aside.mkdir()
    for p in later:
        os.replace(p, aside / p.name)
    fsync_dir(root)
    return aside


def read_checkpoint(run_dir: Path) -> tuple[Path, dict[str, torch.Tensor] | None, dict[str, Any]] | None:
    """(folder, optimizer tensors, trainer state) of a run's latest checkpoint, or None if it has none. A sharded
    checkpoint's optimizer state is in its shards (bytelm.training.sharded): None here."""
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    tensors = None if (ckpt / SHARDED_DIR).is_dir() else read_weights(ckpt / OPTIMIZER_NAME)
    return ckpt, tensors, read_json_object(ckpt / STATE_NAME)


def check_trainer_state(ckpt: Path, state: dict[str, Any]) -> None:
    """The fields of a trainer_state.json that resuming takes on trust, checked: a corrupt or hand-edited one is one
    `CheckpointError` naming the field, not a run that starts at step -100."""
    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{ckpt / STATE_NAME}: {field} {why}; the checkpoint cannot be resumed from")

    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step != int(ckpt.name.split("-")[1]):
        raise bad("step", f"is {step!r}, not the step its folder is named after ({ckpt.name})")
    elapsed = state.get("elapsed")
    if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)) or not 0 <= elapsed < float("inf"):
        raise bad("elapsed", f"is {elapsed!r}, not a number of seconds >= 0")
    seen = state.get("bytes_seen")
    if isinstance(seen, bool) or not isinstance(seen, int) or seen < 0:
        raise bad("bytes_seen", f"is {seen!r}, not a count >= 0")
    for field in ("sampler", "optimizer"):
        if not isinstance(state.get(field), dict):
            raise bad(field, "is missing or not an object")
    last = state.get("last_val")
    if last is not None and not (isinstance(last, list) and len(last) == 2 and isinstance(last[0], int)
                                 and isinstance(last[1], (int, float))):
        raise bad("last_val", f"is {last!r}, not [step, loss]")
