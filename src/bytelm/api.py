"""The top-level functions, each composing several layers: `bytelm.load`, `bytelm.load_adapter`, `bytelm.push`.
Nothing in the library imports this module (only the CLI and the package root do)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .errors import HubError
from .finetune import load_adapter as _load_adapter
from .finetune import read_adapter
from .hub import HUB_ID, check_repo_id, resolve, upload
from .io import ADAPTER_CONFIG_NAME, ADAPTER_FILES, CARD_NAME, MODEL_FILES, recorded_base
from .models import ByteLM, load_model, write_card


def load(path: str | Path, device: str | torch.device | None = None, revision: str | None = None) -> ByteLM:
    """Load a model as whichever model class its config names, strictly: a model folder (config.json +
    model.safetensors), a training run folder (its latest checkpoint) or a hub id `org/name` (from the local hub
    cache, downloaded into it first unless HF_HUB_OFFLINE is set; `revision`: a branch, tag or commit)."""
    return load_model(path, device=device, revision=revision)


def load_adapter(adapter: str | Path, base: str | Path | None = None, device: str | torch.device | None = None,
                 merge: bool = False) -> ByteLM:
    """A base model with a LoRA adapter on it (`merge=True`: folded in); base defaults to the one the adapter
    records. Needs peft (`pip install 'bytelm[lora]'`); see bytelm.finetune."""
    return _load_adapter(adapter, base=base, device=device, merge=merge)


def push(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
         revision: str | None = None, message: str | None = None) -> str:
    """Upload a model folder or a LoRA adapter folder (a run folder: its latest checkpoint) to the Hub as `repo_id`.
    The folder must load first (a broken folder is not uploaded), and only the model's (or adapter's) files go up,
    never optimizer or trainer state. Returns the commit's URL."""
    check_repo_id(repo_id)  # before the folder is loaded: the quick check first
    if not Path(folder).is_dir():
        raise HubError(f"{folder} is not a folder")
    folder = resolve(folder)
    if (folder / ADAPTER_CONFIG_NAME).is_file():
        _, config, info = read_adapter(folder)  # a readable adapter, or a clear error now, not a broken repository
        base = recorded_base(config, info)
        if not (base and HUB_ID.fullmatch(base)):
            warnings.warn(f"the adapter's base is {base or 'not recorded'}, not a hub id: whoever uses it from the "
                          "Hub will have to name its base (--base)", stacklevel=2)
        files = ADAPTER_FILES
    else:
        model = load_model(folder)  # strict: a folder that would not load is not uploaded
        if not (folder / CARD_NAME).is_file():
            write_card(folder, model.config, model.num_params(), name=repo_id.split("/")[1])
        files = MODEL_FILES
    return upload(folder, repo_id, files, private=private, token=token, revision=revision, message=message)
