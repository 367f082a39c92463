"""`bytelm merge ADAPTER --out DIR`: fold a LoRA adapter into its base, as a plain model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro
from tyro.conf import Positional

from .options import parse


@dataclass
class MergeArgs:
    """Adds each adapter's (alpha / r) B A to the base's weights (peft's merge_and_unload) and writes config.json +
    model.safetensors + README.md: a model that loads without peft and runs as fast as the base."""

    adapter: Annotated[Positional[str], tyro.conf.arg(metavar="ADAPTER")]
    """an adapter folder, a fine-tune run folder (its latest checkpoint) or a hub id"""
    out: Path  # the model folder to write
    base: str | None = None  # the base model (default: the one the adapter records)
    force: bool = False  # overwrite --out if it is not an empty folder (a model, run or adapter folder)


def main(argv: list[str]) -> int:
    from ..finetune import merge

    args = parse(MergeArgs, argv, "bytelm merge")
    out = merge(args.adapter, args.out, base=args.base, overwrite=args.force)
    print(f"merged {args.adapter} into its base: {out} (`bytelm generate {out}`)")
    return 0
