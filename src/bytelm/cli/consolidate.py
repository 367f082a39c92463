"""`bytelm consolidate RUN`: the whole model of a sharded (`--parallel fsdp`) checkpoint, as a model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import tyro
from tyro.conf import Positional

from .options import parse


@dataclass
class ConsolidateArgs:
    """Reads a sharded checkpoint's shards (written by any number of ranks) in one process and writes its model as
    config.json + model.safetensors + README.md, for generate, eval, serve and the Hub. An fsdp run writes this
    beside each checkpoint unless it ran with --no-consolidate."""

    checkpoint: Annotated[Positional[str], tyro.conf.arg(metavar="RUN")]
    """a run folder (its latest checkpoint) or one checkpoint folder (RUN/checkpoints/step-N)"""
    out: Path | None = None  # the model folder to write; default: the checkpoint folder itself


def main(argv: list[str]) -> int:
    from ..training.sharded import consolidate

    args = parse(ConsolidateArgs, argv, "bytelm consolidate")
    out = consolidate(args.checkpoint, args.out)
    print(f"consolidated {args.checkpoint}: {out} (`bytelm generate {out}`)")
    return 0
