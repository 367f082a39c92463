"""`bytelm push FOLDER ORG/NAME`: upload a model or adapter folder to the Hugging Face Hub."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import tyro
from tyro.conf import Positional

from .options import parse


@dataclass
class PushArgs:
    """Uploads a model folder (config.json, model.safetensors, README.md) or a LoRA adapter folder as the Hub model
    repository REPO_ID, creating it if needed. A run folder uploads its latest checkpoint's model or adapter, never
    optimizer or trainer state. The folder must load first: a broken folder is not uploaded."""

    folder: Annotated[Positional[str], tyro.conf.arg(metavar="FOLDER")]  # a model, adapter or run folder
    repo_id: Annotated[Positional[str], tyro.conf.arg(metavar="REPO_ID")]  # ORG/NAME (or USER/NAME) on the Hub
    private: bool = False  # create the repository as private
    token: str | None = None  # a Hub token with write access (default: HF_TOKEN or the `hf auth login` one)
    revision: str | None = None  # the branch to push to (default: main)
    message: str | None = None  # the commit message
    base_model: str | None = None
    """the base's hub id (ORG/NAME), for a fine-tune of a local folder: the uploaded card's base_model (how the Hub
    links it to its base) and, for an adapter, the base its uploaded config names"""


def main(argv: list[str]) -> int:
    from ..api import push

    args = parse(PushArgs, argv, "bytelm push")
    url = push(args.folder, args.repo_id, private=args.private, token=args.token, revision=args.revision,
               message=args.message, base_model=args.base_model)
    print(f"pushed {args.folder} to {args.repo_id}: {url}")
    return 0
