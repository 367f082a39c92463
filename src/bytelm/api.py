"""The top-level functions, each composing several layers: `bytelm.load`, `bytelm.load_adapter`, `bytelm.push`.
Nothing in the library imports this module (only the CLI and the package root do)."""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .errors import BytelmError, HubError
from .finetune import check_base, read_adapter
from .finetune import load_adapter as _load_adapter
from .hub import HUB_ID, check_repo_id, resolve, set_card_base_model, upload
from .io import ADAPTER_CONFIG_NAME, ADAPTER_FILES, ADAPTER_INFO_NAME, CARD_NAME, MODEL_FILES, recorded_base
from .models import ByteLM, load_model, read_config, write_card


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
         revision: str | None = None, message: str | None = None, base_model: str | None = None) -> str:
    """Upload a model folder or a LoRA adapter folder (a run folder: its latest checkpoint) to the Hub as `repo_id`.
    The folder must load first (a broken folder is not uploaded), and only the model's (or adapter's) files go up,
    never optimizer or trainer state. Returns the commit's URL.

    base_model: the hub id of the base, for a fine-tune of a local folder (the Hub links a repository to its base by
    its card's `base_model:`, which must be a hub id, so a local path is left out of it). The uploaded card names it,
    and an adapter's uploaded config records it as the base to load; the local folder is left as it is."""
    check_repo_id(repo_id)  # before the folder is loaded: the quick check first
    if base_model is not None and not HUB_ID.fullmatch(base_model):
        raise HubError(f"base_model {base_model!r} is not a hub id: use ORG/NAME, the base's repository on the Hub")
    if not Path(folder).is_dir():
        raise HubError(f"{folder} is not a folder")
    folder = resolve(folder)
    if (folder / ADAPTER_CONFIG_NAME).is_file():
        _, config, info = read_adapter(folder)  # a readable adapter, or a clear error now, not a broken repository
        base = recorded_base(config, info)
        if base_model is not None:
            check_named_base(base_model, folder, info)
        elif not (base and HUB_ID.fullmatch(base)):
            warnings.warn(f"the adapter's base is {base or 'not recorded'}, not a hub id: whoever uses it from the "
                          "Hub will have to name its base (--base); name its hub id with --base-model (base_model=)",
                          stacklevel=2)
        files = ADAPTER_FILES
    else:
        model = load_model(folder)  # strict: a folder that would not load is not uploaded
        if not (folder / CARD_NAME).is_file():
            write_card(folder, model.config, model.num_params(), name=repo_id.split("/")[1])
        files, base = MODEL_FILES, None
    if base_model is None:
        return upload(folder, repo_id, files, private=private, token=token, revision=revision, message=message)
    with tempfile.TemporaryDirectory(prefix="bytelm-push-") as tmp:
        staged = Path(tmp) / folder.name  # upload_folder names the commit after it
        staged.mkdir()
        for name in files:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, staged / name)
        rebase(staged, base_model, was=base)
        return upload(staged, repo_id, files, private=private, token=token, revision=revision, message=message)


def check_named_base(base_model: str, folder: Path, info: dict) -> None:
    """Refuse a base_model of another config than the base the adapter was made for, where it can be read (from the
    hub cache, or downloaded); warn where it cannot."""
    try:
        config = read_config(base_model)
    except BytelmError as e:
        warnings.warn(f"base_model {base_model} could not be read to check that it fits the adapter ({e})",
                      stacklevel=3)
        return
    check_base(folder, info, config, None)


def rebase(folder: Path, base_model: str, was: str | None) -> None:
    """Name `base_model` as the base in a folder's card and, for an adapter, in its config and bytelm's record."""
    if (folder / CARD_NAME).is_file():
        set_card_base_model(folder / CARD_NAME, base_model, was)
    for name, key in ((ADAPTER_CONFIG_NAME, "base_model_name_or_path"), (ADAPTER_INFO_NAME, "base")):
        path = folder / name
        if path.is_file():
            record = json.loads(path.read_text())
            record[key] = base_model
            path.write_text(json.dumps(record, indent=2) + "\n")
