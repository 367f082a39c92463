"""`bytelm train`: every field of `bytelm.training.TrainConfig` is a flag (its comment is the help, its section the
help's group)."""

from __future__ import annotations

from ..training.config import TrainConfig
from .runconfig import parse_run_config

DESCRIPTION = """Train a byte-level model. Without --data it trains on the Python standard library's own source (~30 MB
of code on this machine, no download). Settings come from the flags, over --config FILE (a JSON file of settings, or a
run's run.json) or, with --resume, over the settings of the run in --out-dir."""


def main(argv: list[str]) -> int:
    from ..training import train

    cfg, resume = parse_run_config(TrainConfig, argv, "bytelm train", DESCRIPTION,
                                   resume="continue the run in --out-dir from its latest checkpoint")
    result = train(cfg, resume=resume)
    if result.get("val_bpb") is not None and result.get("master", True):
        print(f"done: step {result['step']}, validation bpb {result['val_bpb']:.3f} (estimate over "
              f"{cfg.eval_batches} batches; `bytelm eval {cfg.out_dir}` scores the whole split), "
              f"{result['elapsed'] / 60:.1f} min. Model: {cfg.out_dir}")
    return 0
