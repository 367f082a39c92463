"""Sharded checkpoints through torch.distributed.checkpoint (DCP), for `--parallel fsdp` runs: every rank writes its
own shards of the model and optimizer state, and a load reshards them onto whatever ranks the run has now (a 2-rank
run resumes on 1 rank or on 4). Keys are parameter names (DCP's state_dict API), so a checkpoint does not depend on
how the model was sharded, nor on parameter order.

    step-0000200/sharded/.metadata       what each tensor is and where its pieces are
    step-0000200/sharded/__<rank>_0.distcp   one rank's pieces (model, optimizer moments, RNG state)

A consolidated model folder (config.json + model.safetensors) is written beside it from rank 0
(`full_model_state`), or later by `bytelm consolidate` (`load_sharded_model`): generate, eval, serve and the Hub
read that, never the shards.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ..errors import CheckpointError
from ..io import SHARDED_DIR, latest_checkpoint, write_model_files
from ..models import build, read_config, write_card
from .checkpointing import first_failure
from .optim import MuonAdamW


def _optimizers(optimizer) -> list[torch.optim.Optimizer]:
    return list(optimizer.parts.values()) if isinstance(optimizer, MuonAdamW) else [optimizer]


def has_shards(folder: Path) -> bool:
    return (folder / SHARDED_DIR / ".metadata").is_file()


def save_sharded(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """Every rank writes its shards of the model, the optimizer state and its RNG state into folder/sharded
    (collective: every rank calls it)."""
    model_sd, optim_sd = get_state_dict(model, _optimizers(optimizer))
    with _one_process_quietly():
        dcp.save({"model": model_sd, "optimizer": optim_sd, "rng": torch.get_rng_state()},
                 checkpoint_id=folder / SHARDED_DIR, no_dist=not dist.is_initialized())


def load_sharded(folder: Path, model: torch.nn.Module, optimizer) -> None:
    """Load folder/sharded into this run's model and optimizer, resharded to this run's ranks (collective)."""
    model_sd, optim_sd = get_state_dict(model, _optimizers(optimizer))
    state = {"model": model_sd, "optimizer": optim_sd, "rng": torch.get_rng_state()}
    try:
        with _one_process_quietly():
            dcp.load(state, checkpoint_id=folder / SHARDED_DIR, no_dist=not dist.is_initialized())
        set_state_dict(model, _optimizers(optimizer), model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
    except (CheckpointException, RuntimeError, KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"--resume: {folder / SHARDED_DIR} cannot be loaded into this run's model and "
                              f"optimizer ({_reason(e)}); was it written with other settings (e.g. --optimizer, "
                              "local_lr_scale, --model), or is a file of it missing?") from None
    torch.set_rng_state(state["rng"])


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0's CPU (empty on the other ranks); collective."""
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_sharded_model(folder: Path, model: torch.nn.Module) -> None:
    """Load the model part of folder/sharded into a whole, unsharded model, in one process (`bytelm consolidate`)."""
    state = {"model": model.state_dict()}
    try:
        with _one_process_quietly():
            dcp.load(state, checkpoint_id=folder / SHARDED_DIR, no_dist=True)
    except (CheckpointException, RuntimeError, KeyError, ValueError, OSError) as e:
        raise CheckpointError(f"{folder / SHARDED_DIR} cannot be loaded into the model of "
                              f"{folder / 'config.json'} ({_reason(e)})") from None
    model.load_state_dict(state["model"])


def consolidate(path: str | Path, out: str | Path | None = None) -> Path:
    """Write the whole model of a sharded checkpoint (a checkpoint folder, or a run folder: its latest) as a model
    folder: into the checkpoint itself (model.safetensors + README.md beside its config.json), or into `out`."""
    folder = Path(path)
    if not has_shards(folder):
        ckpt = latest_checkpoint(folder) if folder.is_dir() else None
        if ckpt is None or not has_shards(ckpt):
            raise CheckpointError(f"{folder} is neither a sharded checkpoint (a folder holding sharded/) nor a run "
                                  "folder whose latest checkpoint is one (a --parallel fsdp run's)")
        folder = ckpt
    config = read_config(folder)
    model = build(config)
    load_sharded_model(folder, model)
    target = Path(out) if out is not None else folder
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a folder")
    target.mkdir(parents=True, exist_ok=True)
    write_card(target, config, model.num_params(), name=folder.parent.parent.name)
    write_model_files(target, model.state_dict(), config.to_dict())
    return target


@contextlib.contextmanager
def _one_process_quietly():
    """DCP warns that it assumes one process whenever there is no process group: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _reason(e: BaseException) -> str:
    """The first line of what went wrong (on the first rank that failed)."""
    e = first_failure(e)
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
