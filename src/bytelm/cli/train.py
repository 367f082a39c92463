"""`bytelm train`: every field of `bytelm.training.TrainConfig` is a flag (its comment is the help)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import tyro

from ..training import TrainConfig
from .options import Duration, Overrides
from .runconfig import parse_run_config


@dataclass
class TrainArgs(TrainConfig):
    """Train a byte-level model. Without --data it trains on the Python standard library's own source (~30 MB of
    code on this machine, no download). Settings come from the flags, over --config FILE (a JSON file of settings,
    or a run's run.json) or, with --resume, over the settings of the run in --out-dir."""

    model: Overrides = field(default_factory=dict)
    """override model config fields, e.g. --model patch_size=4 global_layers=6"""
    time_budget: Duration = 0.0  # training time before stopping early (300, 300s, 5m, 1.5h); 0: none
    config: Annotated[str | None, tyro.conf.arg(metavar="FILE")] = None
    """JSON file of settings (or a run's run.json); flags override it"""
    resume: bool = False  # continue the run in --out-dir from its latest checkpoint


def main(argv: list[str]) -> int:
    from ..training import train

    cfg, args = parse_run_config(TrainConfig, TrainArgs, argv, "bytelm train")
    result = train(cfg, resume=args.resume)
    if result.get("val_bpb") is not None and result.get("master", True):
        print(f"done: step {result['step']}, validation bpb {result['val_bpb']:.3f} (estimate over "
              f"{cfg.eval_batches} batches; `bytelm eval {cfg.out_dir}` scores the whole split), "
              f"{result['elapsed'] / 60:.1f} min. Model: {cfg.out_dir}")
    return 0
