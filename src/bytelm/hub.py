"""Models that travel in the Hugging Face Hub format.

A bytelm model folder is already a Hub model repository:

    config.json          the model config (`model_type` names the class)
    model.safetensors    the weights
    README.md            a model card: YAML header (library_name bytelm, license, tags, pipeline_tag, and the
                         validation bits per byte and training data when known, as `model-index`) + a short text

This module writes the card (huggingface_hub's ModelCard/ModelCardData), resolves hub ids (`org/name`) to folders in
the local hub cache (downloading them unless HF_HUB_OFFLINE is set), and uploads folders (HfApi). Loading stays
bytelm's own strict loader (`bytelm.checkpoint.load_model`): huggingface_hub's PyTorchModelHubMixin loads
non-strictly, silently leaving missing weights at their initial values; ours refuses a missing or an extra weight.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from . import __version__
from .checkpoint import (
    ADAPTER_CONFIG_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    atomic_write_text,
    load_model,
    resolve_model_dir,
)

CARD_NAME = "README.md"
MODEL_FILES = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]
ADAPTER_FILES = [ADAPTER_CONFIG_NAME, "adapter_model.safetensors", "bytelm_adapter.json", CARD_NAME]
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # org/name, as the Hub spells repository ids
TAGS = {"megabyte": ["megabyte", "byte-level", "tokenizer-free"], "transformer": ["byte-level", "tokenizer-free"]}


class HubError(CheckpointError):
    """A hub id that cannot be resolved, or a push that failed, with the reason."""


# --- hub ids -------------------------------------------------------------------------------------------------------
def is_hub_id(name: str | Path) -> bool:
    """`org/name` that is not a local path: a model on the Hub (or in the local hub cache)."""
    return bool(HUB_ID.fullmatch(str(name))) and not Path(name).exists()


def _env_true(name: str) -> bool | None:
    value = os.environ.get(name)
    return None if value is None else value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    """HF_HUB_OFFLINE as it is now (huggingface_hub reads it once, at import)."""
    now = _env_true("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if now is None else now


def cache_dir() -> Path:
    """The hub cache as the environment says now: HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The local folder of a hub model: from the hub cache, downloaded into it first unless HF_HUB_OFFLINE is set.
    Only the files of a model or an adapter folder are fetched."""
    where = f"{repo_id}{'@' + revision if revision else ''}"
    cache, off = cache_dir(), offline()
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=off,
                                   allow_patterns=sorted(set(MODEL_FILES + ADAPTER_FILES)))
    except RevisionNotFoundError:
        raise HubError(f"{where}: the Hub has no revision {revision!r} of {repo_id}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id} is neither a local folder nor a model on the Hugging Face Hub (a private "
                       "model needs a token: `hf auth login`)") from None
    except HFValidationError as e:
        raise HubError(f"{repo_id!r} is neither a local folder nor a valid hub id: {e}") from None
    except LocalEntryNotFoundError as e:
        if type(e).__name__ == "IncompleteSnapshotError":  # huggingface_hub >= 1.x: a partial download
            raise HubError(f"{where}: {str(e).splitlines()[0]}") from None
        if off:
            raise HubError(f"{where} is neither a local folder nor in the local hub cache ({cache}), and "
                           "HF_HUB_OFFLINE is set: download it once online, or unset HF_HUB_OFFLINE") from None
        raise HubError(f"{where} is neither a local folder nor in the local hub cache ({cache}), and the Hub "
                       "could not be reached") from None
    except HfHubHTTPError as e:
        raise HubError(f"{where}: the Hub answered {str(e).splitlines()[0]}") from None
    return Path(folder)


# --- model cards ---------------------------------------------------------------------------------------------------
def model_card(config, num_params: int, *, name: str | None = None, val_bpb: float | None = None,
               data: str | None = None, step: int | None = None, base_model: str | None = None,
               license: str = "apache-2.0", adapter: dict | None = None) -> str:
    """A model card (README.md) for a model or a LoRA adapter (`adapter`: its target, rank and trainable params)."""
    mt = config.model_type
    name = name or f"bytelm-{mt}"
    results = None
    if val_bpb is not None:
        results = [EvalResult(task_type="text-generation", dataset_type="bytes", dataset_name=data or "unknown",
                              dataset_split="validation", metric_type="bits_per_byte",
                              metric_name="validation bits per byte", metric_value=round(val_bpb, 4))]
    tags = ["bytelm", *TAGS[mt]] + (["lora", "peft"] if adapter else [])
    card_data = ModelCardData(
        library_name="peft" if adapter else "bytelm", license=license, tags=tags, pipeline_tag="text-generation",
        model_name=name if results else None, eval_results=results,
        base_model=base_model if base_model and HUB_ID.fullmatch(base_model) else None,
    )
    kind = {"megabyte": "MEGABYTE (Yu et al. 2023, arXiv 2305.07185)", "transformer": "byte-level transformer"}[mt]
    if adapter:
        what = (f"A LoRA adapter (peft, rank {adapter['rank']}) for a {kind} model, trained with bytelm "
                f"{__version__}: {adapter['trainable']:,} trainable parameters on a base of {num_params:,}, in the "
                f"Linear layers matching `{adapter['target']}`. Base model: `{base_model or 'unknown'}`.")
        use = (f"bytelm generate --adapter {name} --prompt 'def '\n"
               f"bytelm merge {name} --out merged     # a plain model folder")
    else:
        what = (f"A tokenizer-free {kind} over raw bytes, {num_params:,} parameters, trained with "
                f"bytelm {__version__}.")
        use = f"import bytelm\nmodel = bytelm.load('{name}')\nprint(model.generate(b'def ', 64))"
    lines = [f"# {name}", "", what, ""]
    if base_model and not adapter:
        lines += [f"Fine-tuned from `{base_model}` (a LoRA adapter, merged in).", ""]
    if val_bpb is not None:
        lines += [f"Validation bits per byte: **{val_bpb:.4f}**" + (f" (at step {step:,})" if step else ""), ""]
    if data:
        lines += [f"Training data: {data}", ""]
    lines += ["```" + ("bash" if adapter else "python"), use, "```", "", "Config:", "", "```json",
              json.dumps(config.to_dict(), indent=2), "```"]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def write_model_card(folder: str | Path, config, num_params: int, **card) -> Path:
    path = Path(folder) / CARD_NAME
    atomic_write_text(path, model_card(config, num_params, **card))
    return path


# --- push ----------------------------------------------------------------------------------------------------------
def push(folder: str | Path, repo_id: str, *, private: bool = False, token: str | None = None,
         revision: str | None = None, message: str | None = None) -> str:
    """Upload a model folder or a LoRA adapter folder (a run folder: its latest checkpoint) to the Hub as `repo_id`.
    Only the model's (or adapter's) files go up, never optimizer or trainer state. Returns the commit's URL."""
    if not HUB_ID.fullmatch(repo_id):
        raise HubError(f"{repo_id!r} is not a hub repository id: use ORG/NAME (or USER/NAME)")
    folder = Path(folder)
    if not folder.is_dir():
        raise HubError(f"{folder} is not a folder")
    folder = resolve_model_dir(folder)
    if (folder / ADAPTER_CONFIG_NAME).is_file():
        from .lora import read_adapter

        _, config, info = read_adapter(folder)  # a readable adapter, or a clear error now, not a broken repository
        base = info.get("base") or config.get("base_model_name_or_path")
        if not (base and HUB_ID.fullmatch(base)):
            warnings.warn(f"the adapter's base is {base or 'not recorded'}, not a hub id: whoever uses it from the "
                          "Hub will have to name its base (--base)", stacklevel=2)
        files = ADAPTER_FILES
    else:
        model = load_model(folder)  # strict: a folder that would not load is not uploaded
        if not (folder / CARD_NAME).is_file():
            write_model_card(folder, model.config, model.num_params(), name=repo_id.split("/")[1])
        files = MODEL_FILES
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                   allow_patterns=files, commit_message=message or f"Upload {folder.name} with bytelm")
    except HfHubHTTPError as e:
        raise HubError(f"push to {repo_id} failed: {str(e).splitlines()[0]}") from None
    return str(getattr(commit, "commit_url", commit))


__all__ = ["HubError", "cache_dir", "is_hub_id", "model_card", "offline", "push", "snapshot", "write_model_card"]
