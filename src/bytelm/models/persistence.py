"""Models to and from folders: `save_model` writes a model folder (weights, model card, config last), `load_model`
rebuilds the right class from a model folder, a run folder's latest checkpoint or a hub id, strictly (a missing,
extra or misshapen weight is an error naming it, never silently skipped)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..devices import check_memory, resolve_device
from ..errors import CheckpointError, ConfigError
from ..hub import resolve, write_model_card
from ..io import (
    FLOAT_DTYPES,
    WEIGHTS_NAME,
    header_problems,
    load_state_strict,
    read_model_config,
    read_weights,
    read_weights_header,
    write_model_files,
)
from . import memory, registry


def write_card(folder: str | Path, config, num_params: int, **card) -> Path:
    """The model card (README.md) of a model or adapter folder, saying what its model type is (registry entry)."""
    spec = registry.get_spec(config.model_type)
    return write_model_card(folder, config.to_dict(), num_params, description=spec.description, tags=spec.tags,
                            **card)


def save_model(model: torch.nn.Module, path: str | Path, **card) -> Path:
    """Write a ByteLM's weights, model card and config (last) into the folder `path`. `card`: what the model card
    should say beyond the config (name, val_bpb, data, step, base_model, license; see bytelm.hub.model_card)."""
    path = Path(path)
    state = model.state_dict()
    if any(".lora_A." in k for k in state):
        raise CheckpointError("this model carries LoRA adapters: save the adapter (bytelm.finetune.save_adapter), or "
                              "merge them in first (bytelm.load_adapter(..., merge=True), `bytelm merge`)")
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a folder")
    path.mkdir(parents=True, exist_ok=True)
    write_card(path, model.config, model.num_params(), **card)
    return write_model_files(path, state, model.config.to_dict())


def read_config(path: str | Path, revision: str | None = None):
    """The model config of a model folder, run folder or hub id, without loading weights: every field named (but
    those it predates or that do not matter to a loaded model; see ModelConfig.from_dict), every value checked."""
    folder = resolve(path, revision)
    cfg_file = folder / "config.json"
    d = read_model_config(folder)
    try:
        return registry.config_from_dict(d, saved=True)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def check_weights(folder: Path, config, device: torch.device | None = None) -> None:
    """Before a model folder's model is built: every tensor of its model.safetensors (read from the header alone)
    has the name, shape and a floating-point dtype the config's model expects (`CheckpointError` naming those that do
    not), and the weights fit in memory: on the CPU, the file's tensors and the model at once (loading holds both);
    on another `device`, the model (`MemoryLimitError` with the estimate)."""
    path = folder / WEIGHTS_NAME
    header = read_weights_header(path)
    try:
        skel = memory.skeleton(config)
    except ConfigError as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    problems = header_problems(skel.state_dict(), header)
    if problems:
        raise CheckpointError(f"{path} does not match the model in its config: " + " | ".join(problems))
    model = memory.module_nbytes(skel)
    file = sum(math.prod(shape) * FLOAT_DTYPES[dtype] for shape, dtype in header.values())
    hint = "load it on a machine with more memory, or check the sizes in its config.json"
    what = f"loading {folder}"
    check_memory(file + model, "cpu", what, [(WEIGHTS_NAME, file), ("the model", model)], hint)
    if device is not None and device.type != "cpu":
        check_memory(model, device, f"{what} onto {device}", [("the model", model)], hint)


def load_model(path: str | Path, device: str | torch.device | None = None, expect: type | None = None,
               revision: str | None = None) -> torch.nn.Module:
    """Load a model folder, run folder or hub id (`revision`: a branch, tag or commit of a hub model) as the ByteLM
    class its config names, in eval mode; `expect` (a ByteLM subclass) refuses a folder holding another model type."""
    folder = resolve(path, revision)
    config = read_config(folder)
    cls = registry.get_spec(config.model_type).model_class
    if expect is not None and not issubclass(cls, expect):
        raise CheckpointError(f"{folder} holds a {config.model_type!r} model ({cls.__name__}), not a "
                              f"{expect.__name__}; use bytelm.load() to load whatever a folder holds")
    device = resolve_device(device) if device is not None else None
    check_weights(folder, config, device)
    state = read_weights(folder / WEIGHTS_NAME)
    model = cls(config)
    load_state_strict(model, state, str(folder / WEIGHTS_NAME))
    if device is not None:
        model.to(device)
    return model.eval()
