"""`bytelm finetune BASE`: every field of `bytelm.finetune.FinetuneConfig` is a flag (its comment is the help)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import tyro
from tyro.conf import Positional, Suppress

from ..finetune import FinetuneConfig
from .options import Duration
from .runconfig import parse_run_config


@dataclass
class FinetuneArgs(FinetuneConfig):
    """LoRA fine-tuning (peft): the base model stays frozen; small low-rank adapters on the Linear layers of its
    global model, local model or both are trained and saved (adapter_config.json + adapter_model.safetensors, naming
    the base). Data, schedule, checkpoints and --resume work as in `bytelm train`. Without --data it fine-tunes on the
    embedded corpus."""

    base: Annotated[Positional[str], tyro.conf.arg(metavar="BASE")] = ""
    """the model to fine-tune: a model folder, a training run folder or a hub id (org/name)"""
    model_type: Suppress[str] = ""
    preset: Suppress[str] = ""
    model: Suppress[dict[str, Any]] = field(default_factory=dict)
    lora_target: Literal["global", "local", "all"] = "all"
    """whose Linear layers get adapters (a byte transformer's one stack: global or all)"""
    time_budget: Duration = 0.0  # training time before stopping early (300, 300s, 5m, 1.5h); 0: none
    config: Annotated[str | None, tyro.conf.arg(metavar="FILE")] = None
    """JSON file of settings (or a run's run.json); flags override it"""
    resume: bool = False  # continue the fine-tune in --out-dir from its latest checkpoint

    def __post_init__(self) -> None:
        if self.base:  # without a base: FinetuneConfig, built from these, says it is required
            super().__post_init__()


def main(argv: list[str]) -> int:
    from ..finetune import finetune

    cfg, args = parse_run_config(FinetuneConfig, FinetuneArgs, argv, "bytelm finetune")
    result = finetune(cfg, resume=args.resume)
    if result.get("val_bpb") is not None and result.get("master", True):
        base = result.get("base_val_bpb")
        print(f"done: step {result['step']}, validation bpb {result['val_bpb']:.3f}"
              f"{f' (the base: {base:.3f})' if base is not None else ''}, {result['trainable_params']:,} trainable "
              f"of {result['params']:,} params, {result['elapsed'] / 60:.1f} min. Adapter: {cfg.out_dir} "
              f"(`bytelm generate --adapter {cfg.out_dir}`, `bytelm merge {cfg.out_dir} --out DIR`)")
    return 0
