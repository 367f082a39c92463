"""`bytelm finetune BASE`: every field of `bytelm.finetune.FinetuneConfig` is a flag (its comment is the help, its
section the help's group)."""

from __future__ import annotations

from .runconfig import parse_run_config

DESCRIPTION = """LoRA fine-tuning (peft): the base model stays frozen; small low-rank adapters on the Linear layers of
its global model, local model or both are trained and saved (adapter_config.json + adapter_model.safetensors, naming
the base). Data, schedule, checkpoints and --resume work as in `bytelm train`. Without --data it fine-tunes on the
embedded corpus."""


def main(argv: list[str]) -> int:
    from ..finetune import FinetuneConfig, finetune

    cfg, resume = parse_run_config(FinetuneConfig, argv, "bytelm finetune", DESCRIPTION,
                                   resume="continue the fine-tune in --out-dir from its latest checkpoint")
    result = finetune(cfg, resume=resume)
    if result.get("val_bpb") is not None and result.get("master", True):
        base = result.get("base_val_bpb")
        print(f"done: step {result['step']}, validation bpb {result['val_bpb']:.3f}"
              f"{f' (the base: {base:.3f})' if base is not None else ''}, {result['trainable_params']:,} trainable "
              f"of {result['params']:,} params, {result['elapsed'] / 60:.1f} min. Adapter: {cfg.out_dir} "
              f"(`bytelm generate --adapter {cfg.out_dir}`, `bytelm merge {cfg.out_dir} --out DIR`)")
    return 0
