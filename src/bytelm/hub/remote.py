"""Hub ids (`org/name`) to local folders, through the local hub cache, and uploads of folders.

A bytelm model folder is already a Hub model repository (config.json, model.safetensors, README.md); an adapter
folder is a peft adapter repository. `snapshot` resolves an id to its folder in the hub cache (downloading it first
unless HF_HUB_OFFLINE is set) and `upload` sends a folder's files. Loading stays bytelm's own strict loader
(bytelm.models.load_model): huggingface_hub's PyTorchModelHubMixin loads non-strictly, silently leaving missing
weights at their initial values; ours refuses a missing or an extra weight.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from ..errors import HubError
from ..io import ADAPTER_FILES, MODEL_FILES, resolve_local
from .cards import HUB_ID


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
                                   allow_patterns=sorted({*MODEL_FILES, *ADAPTER_FILES}))
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


def resolve(path: str | Path, revision: str | None = None) -> Path:
    """A local model or adapter folder, a run folder's latest checkpoint, or a hub id's folder in the hub cache."""
    if is_hub_id(path):
        return snapshot(str(path), revision)
    return resolve_local(path)


# --- upload ----------------------------------------------------------------------------------------------------------
def check_repo_id(repo_id: str) -> None:
    if not HUB_ID.fullmatch(repo_id):
        raise HubError(f"{repo_id!r} is not a hub repository id: use ORG/NAME (or USER/NAME)")


def upload(folder: str | Path, repo_id: str, files: list[str] | tuple[str, ...], *, private: bool = False,
           token: str | None = None, revision: str | None = None, message: str | None = None) -> str:
    """Upload `files` of `folder` to the Hub model repository `repo_id` (created if needed); returns the commit's
    URL. bytelm.api.push checks the folder (it must load) before calling this."""
    check_repo_id(repo_id)
    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                                   allow_patterns=list(files),
                                   commit_message=message or f"Upload {Path(folder).name} with bytelm")
    except HfHubHTTPError as e:
        raise HubError(f"push to {repo_id} failed: {str(e).splitlines()[0]}") from None
    return str(getattr(commit, "commit_url", commit))
