"""Model folders: `config.json` + `model.safetensors` (never pickle) + a `README.md` model card, written atomically,
loaded strictly. Such a folder is a valid Hugging Face Hub model repository (see `bytelm.hub`).

`bytelm.load(path)` rebuilds the right class from `config.json`'s `model_type`; `path` may also be a training run
folder (its latest checkpoint) or a hub id `org/name` (from the local hub cache). Every way a folder can be wrong
(missing file, unreadable config, another model type, missing/extra/misshapen weights) raises `CheckpointError` with
a message naming the problem.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import ConfigError, config_from_dict
from .megabyte import Megabyte
from .model import ByteLM
from .transformer import ByteTransformer

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"  # a LoRA adapter folder (bytelm.lora), not a model
MODEL_CLASSES: dict[str, type[ByteLM]] = {"megabyte": Megabyte, "transformer": ByteTransformer}


class CheckpointError(ValueError):
    """A model folder that cannot be loaded, with the reason."""


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename over `path`: a kill mid-write leaves the old file (or none), never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_model(model: ByteLM, path: str | Path, **card) -> Path:
    """Write weights, model card and config (last) into the folder `path`. `card`: what the model card should say
    beyond the config (name, val_bpb, data, step, base_model, license; see bytelm.hub.model_card)."""
    from . import __version__
    from .hub import write_model_card

    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if any(".lora_A." in k for k in state):
        raise CheckpointError("this model carries LoRA adapters: save the adapter (bytelm.lora.save_adapter), or "
                              "merge them in first (bytelm.load_adapter(..., merge=True), `bytelm merge`)")
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    write_model_card(path, model.config, model.num_params(), **card)
    config = {**model.config.to_dict(), "bytelm_version": __version__}
    atomic_write_text(path / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return path


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a training run folder (see bytelm.train), or None if it has none."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    ckpt = root / pointer.read_text().strip()
    if not (ckpt / "trainer_state.json").is_file():
        raise CheckpointError(f"{pointer} names {ckpt.name}, which is missing or incomplete")
    return ckpt


def resolve_model_dir(path: str | Path, revision: str | None = None) -> Path:
    """A model folder as given, a training run folder's latest checkpoint, or a hub id's folder in the hub cache."""
    from .hub import is_hub_id, snapshot

    if is_hub_id(path):
        return snapshot(str(path), revision)
    path = Path(path)
    if not (path / CONFIG_NAME).exists():
        ckpt = latest_checkpoint(path) if path.is_dir() else None
        if ckpt is not None:
            return ckpt
    return path


def read_json_object(path: Path, error: type[Exception] = CheckpointError) -> dict:
    """A JSON file that must hold an object; anything else is `error` naming the file."""
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    if not isinstance(d, dict):
        raise error(f"{path} must hold a JSON object")
    return d


def read_config(path: str | Path):
    path = resolve_model_dir(path)
    if not path.exists():
        raise CheckpointError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; a bytelm model is a folder with {CONFIG_NAME} + {WEIGHTS_NAME}")
    cfg_file = path / CONFIG_NAME
    if not cfg_file.is_file() and (path / ADAPTER_CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} holds a LoRA adapter, not a model: use it on its base with --adapter "
                              "(bytelm.load_adapter), or fold it in with `bytelm merge`")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}: not a bytelm model folder")
    d = read_json_object(cfg_file)
    try:
        return config_from_dict(d)
    except ConfigError as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def state_problems(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> list[str]:
    """Every missing, extra or misshapen tensor of `state` against `expected`, as short phrases (empty: it fits)."""
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"missing weights: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if extra:
        problems.append(f"unexpected weights: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}")
    if shapes:
        problems.append(f"wrong shapes: {'; '.join(shapes[:8])}{' ...' if len(shapes) > 8 else ''}")
    return problems


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict, but every missing, extra or misshapen tensor is named in one clear error."""
    problems = state_problems(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{source} does not match the model in its config: " + " | ".join(problems))
    model.load_state_dict(state, strict=True)


def load_model(path: str | Path, device: str | torch.device | None = None, expect: type | None = None,
               revision: str | None = None) -> ByteLM:
    """Load a model folder, run folder or hub id (`revision`: a branch, tag or commit of a hub model); `expect` (a
    ByteLM subclass) refuses a folder holding another model type."""
    path = resolve_model_dir(path, revision)
    config = read_config(path)
    cls = MODEL_CLASSES[config.model_type]
    if expect is not None and expect is not ByteLM and not issubclass(cls, expect):
        raise CheckpointError(f"{path} holds a {config.model_type!r} model ({cls.__name__}), not a "
                              f"{expect.__name__}; use bytelm.load() to load whatever a folder holds")
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS_NAME}")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from None
    model = cls(config)
    load_state_strict(model, state, str(weights))
    if device is not None:
        model.to(device)
    return model.eval()
