"""LoRA fine-tuning with peft: adapters that know their base (bytelm.finetune.adapters) and the fine-tune trainer
(bytelm.finetune.trainer). peft is imported only when an adapter is made or loaded."""

from .adapters import (
    TARGETS,
    LoraError,
    apply_lora,
    attach,
    check_base,
    load_adapter,
    merge,
    read_adapter,
    save_adapter,
    target_modules,
    weights_fingerprint,
)
from .trainer import ADAPTER_DIR, FinetuneConfig, FinetuneTrainer, LoraSection, finetune

__all__ = ["ADAPTER_DIR", "TARGETS", "FinetuneConfig", "FinetuneTrainer", "LoraError", "LoraSection", "apply_lora",
           "attach", "check_base", "finetune", "load_adapter", "merge", "read_adapter", "save_adapter",
           "target_modules", "weights_fingerprint"]
