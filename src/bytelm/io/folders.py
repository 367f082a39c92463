"""The folders bytelm reads and writes, as files: no model classes, no LoRA, no hub code here.

A model folder is `config.json` + `model.safetensors` (never pickle) + a `README.md` model card: a valid Hugging Face
Hub model repository. A training run folder holds `run.json` and `checkpoints/latest`, naming its newest complete
checkpoint (a model folder or an adapter folder, plus optimizer and trainer state). An adapter folder (a LoRA
fine-tune's) holds `adapter_config.json` (peft's), `adapter_model.safetensors` and `bytelm_adapter.json`.

Every way a folder can be wrong raises `CheckpointError` naming the problem; the layers above (bytelm.models,
bytelm.finetune) turn what is read here into models.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .._version import __version__
from ..errors import CheckpointError
from .atomic import atomic_write, atomic_write_text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
ADAPTER_CONFIG_NAME = "adapter_config.json"  # peft's LoraConfig
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_INFO_NAME = "bytelm_adapter.json"  # the base's config and weights fingerprint
MODEL_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
ADAPTER_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, ADAPTER_INFO_NAME, CARD_NAME)


def read_json_object(path: Path, error: type[Exception] = CheckpointError) -> dict:
    """A JSON file that must hold an object; anything else is `error` naming the file."""
    try:
        d = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    except OSError as e:
        raise error(f"{path} cannot be read: {e.strerror}") from None
    if not isinstance(d, dict):
        raise error(f"{path} must hold a JSON object")
    return d


# --- run folders ----------------------------------------------------------------------------------------------------
CHECKPOINT_NAME = re.compile(r"step-(\d{7,})")  # step-0000200: zero-padded, so names sort as steps do


def checkpoint_steps(root: str | Path) -> dict[int, Path]:
    """step -> folder of every checkpoint folder under a run's `checkpoints/` (complete or not)."""
    root = Path(root)
    found = {}
    if root.is_dir():
        for p in root.iterdir():
            m = CHECKPOINT_NAME.fullmatch(p.name)
            if m and p.is_dir():
                found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a training run folder, or None if it has none. `latest` may only name a
    checkpoint folder beside it (`step-NNNNNNN`): a path out of the run folder is refused, never followed."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer} cannot be read ({e}); it should hold one checkpoint's name, e.g. "
                              "step-0000200") from None
    if not CHECKPOINT_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} holds {name[:80]!r}, not the name of a checkpoint folder beside it "
                              "(step-NNNNNNN); write the name of one of its checkpoints into it")
    ckpt = root / name
    if not (ckpt / "trainer_state.json").is_file():
        raise CheckpointError(f"{pointer} names {ckpt.name}, which is missing or incomplete")
    return ckpt


def resolve_local(path: str | Path) -> Path:
    """A model or adapter folder as given, or a training run folder's latest checkpoint."""
    path = Path(path)
    if path.is_dir() and not (path / CONFIG_NAME).exists() and not (path / ADAPTER_CONFIG_NAME).exists():
        ckpt = latest_checkpoint(path)
        if ckpt is not None:
            return ckpt
    return path


# --- model folders --------------------------------------------------------------------------------------------------
def write_model_files(path: str | Path, state: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Weights, then config.json (last: a folder with a config is complete), each written atomically."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    atomic_write(path / WEIGHTS_NAME, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
    return write_model_config(path, config)


def write_model_config(path: str | Path, config: dict[str, Any]) -> Path:
    """config.json alone (a sharded checkpoint's, whose weights are consolidated later), written atomically."""
    path = Path(path)
    atomic_write_text(path / CONFIG_NAME, json.dumps({**config, "bytelm_version": __version__}, indent=2) + "\n")
    return path


def model_folder(path: Path) -> Path:
    """`path` if it is a model folder, else a `CheckpointError` saying what it is instead."""
    if not path.exists():
        raise CheckpointError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder; a bytelm model is a folder with {CONFIG_NAME} + {WEIGHTS_NAME}")
    if not (path / CONFIG_NAME).is_file() and (path / ADAPTER_CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} holds a LoRA adapter, not a model: use it on its base with --adapter "
                              "(bytelm.load_adapter), or fold it in with `bytelm merge`")
    if not (path / CONFIG_NAME).is_file():
        raise CheckpointError(f"{path} has no {CONFIG_NAME}: not a bytelm model folder (nor a run folder with a "
                              "checkpoint)")
    return path


def read_model_config(path: Path) -> dict[str, Any]:
    """config.json of a model folder, as a dict (bytelm.models turns it into a config)."""
    return read_json_object(model_folder(path) / CONFIG_NAME)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, or a `CheckpointError` naming the file."""
    if not path.is_file():
        raise _missing(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


SHARDED_DIR = "sharded"  # a --parallel fsdp checkpoint's shards (bytelm.training.sharded)


def _missing(path: Path) -> CheckpointError:
    if path.name == WEIGHTS_NAME and (path.parent / SHARDED_DIR).is_dir():  # a --parallel fsdp run's checkpoint
        return CheckpointError(f"{path.parent} holds sharded weights only (a --parallel fsdp run with "
                               f"--no-consolidate): `bytelm consolidate {path.parent}` writes its {path.name}")
    return CheckpointError(f"{path.parent} has no {path.name}")


FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1}  # safetensors' names, bytes


def read_weights_header(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype name: F32, BF16, I64, BOOL, ...) of every tensor in a safetensors file, from
    its header alone (nothing is loaded), or a `CheckpointError` naming the file."""
    if not path.is_file():
        raise _missing(path)
    try:
        with safe_open(path, framework="pt") as f:
            return {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def header_problems(expected: dict[str, torch.Tensor], header: dict[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """`state_problems` of a safetensors header (read_weights_header) against `expected`, and every tensor that is
    not floating point (integer or bool weights would be silently cast), as short phrases (empty: it fits)."""
    shapes = {k: SimpleNamespace(shape=torch.Size(shape)) for k, (shape, _) in header.items()}  # shapes only
    problems = state_problems(expected, shapes)
    bad = [f"{k} ({dtype})" for k, (_, dtype) in sorted(header.items()) if dtype not in FLOAT_DTYPES]
    if bad:
        problems.append(f"weights that are not floating point: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}")
    return problems


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


# --- adapter folders ------------------------------------------------------------------------------------------------
def read_adapter_folder(path: str | Path, error: type[Exception] = CheckpointError
                        ) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(folder, its adapter_config.json, its bytelm_adapter.json or {} for an adapter made without bytelm) of an
    adapter folder or a fine-tune run folder (its latest checkpoint)."""
    folder = resolve_local(path)
    if not folder.is_dir():
        raise error(f"adapter folder {folder} does not exist")
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        raise error(f"{folder} is neither a LoRA adapter folder (no {ADAPTER_CONFIG_NAME}) nor a fine-tune run")
    config = read_json_object(folder / ADAPTER_CONFIG_NAME, error)
    if config.get("peft_type") != "LORA":
        raise error(f"{folder} holds a {config.get('peft_type')} adapter; bytelm uses LoRA adapters")
    if not (folder / ADAPTER_WEIGHTS_NAME).is_file():
        raise error(f"{folder} has no {ADAPTER_WEIGHTS_NAME}")
    info = read_json_object(folder / ADAPTER_INFO_NAME, error) if (folder / ADAPTER_INFO_NAME).is_file() else {}
    return folder, config, info


def recorded_base(config: dict[str, Any], info: dict[str, Any]) -> str | None:
    """The base an adapter names: bytelm's record, else peft's base_model_name_or_path."""
    return info.get("base") or config.get("base_model_name_or_path")
