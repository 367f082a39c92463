"""LoRA fine-tuning: `bytelm train` with another Trainer. The model is built from base + LoRA, only the adapters
reach the optimizer, and checkpoints hold the adapter (each checkpoint's also copied to the run's adapter/ folder, a
plain peft adapter folder); data, schedule, logging, metrics and exact resume are Trainer's own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..devices import check_memory
from ..models import ByteLM, load_model, read_config
from ..models.config import MAX_SIZE
from ..training import LN2, TrainConfig, Trainer, log_line, train
from ..training.memory import training_parts
from ..training.metrics import logged_val
from .adapters import (
    TARGETS,
    apply_lora,
    base_reference,
    check_base,
    load_adapter_weights,
    publish_adapter,
    read_adapter,
    save_adapter,
    target_modules,
    weights_fingerprint,
)

ADAPTER_DIR = "adapter"  # in a run folder: the latest checkpoint's adapter, alone


@dataclass
class FinetuneConfig(TrainConfig):
    """A LoRA fine-tune: TrainConfig's data, schedule and checkpoint settings, the base model and the adapter's shape.
    The model is the base's: model_type, preset and model stay empty. `bytelm finetune` exposes each field as a flag."""

    _kind: ClassVar[str] = "finetune"

    model_type: str = ""  # unused: the base's
    preset: str = ""  # unused: the base's
    out_dir: str = ""  # run folder; empty: runs/<the base's name>-lora
    base: str = ""  # the model to fine-tune: a model folder, a training run folder or a hub id (org/name)
    lora_target: str = "all"  # global | local | all: whose Linear layers get adapters (a transformer: global = all)
    lora_rank: int = 8  # r, the rank of each update B A
    lora_alpha: float = 16.0  # updates are scaled by alpha / r
    lora_dropout: float = 0.0  # dropout on each adapter's input
    max_steps: int = 300  # also the length of the cosine schedule
    lr: float = 1e-3  # peak learning rate (adapters start at zero and take a high one)
    warmup_steps: int = 20
    weight_decay: float = 0.0  # decay would pull the adapters back toward the base; off by default
    local_lr_scale: float = 1.0  # the local model's adapters learn at this times lr
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' adapter matrices; not measured on adapters)

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (bool(self.base), "name the model to fine-tune (BASE: a model folder, run folder or hub id)"),
            (not (self.model_type or self.preset or self.model),
             "model_type, preset and model do not apply: the model is the base's"),
            (self.lora_target in TARGETS, f"lora_target must be one of {', '.join(TARGETS)}"),
            (1 <= self.lora_rank <= MAX_SIZE, "lora_rank must be in 1..2**31 - 1"),
            (0.0 <= self.lora_dropout < 1.0, "lora_dropout must be in [0, 1)"),
            (self.lora_alpha > 0, f"lora_alpha must be > 0, got {self.lora_alpha}"),
            *self._schedule_checks(),
        ]

    def _default_out_dir(self) -> str:
        p = Path(self.base)
        if p.parent.name == "checkpoints":  # runs/x/checkpoints/step-N: name it after the run
            p = p.parent.parent
        return f"runs/{p.resolve().name if p.exists() else p.name}-lora"

    def model_config(self):
        return read_config(self.base)


class FinetuneTrainer(Trainer):
    """Trainer whose model is base + LoRA and whose checkpoints hold the adapter; all else is Trainer's."""

    cfg: FinetuneConfig

    def data_media(self):
        """The base's modality: a fine-tune reads its data as the base's images, sounds or bytes (channels and rate
        converted to the base's)."""
        return self.cfg.model_config().media, True

    def memory_parts(self) -> list[tuple[str, int]]:
        """Trainer's estimate for the base frozen and only its adapters trained (checked before the base is loaded)."""
        cfg = self.cfg
        lora = (target_modules(self.model_config, cfg.lora_target), cfg.lora_rank, cfg.lora_dropout)
        return training_parts(self.model_config, cfg.batch_size, self.seq_len, cfg.optimizer, cfg.precision,
                              self.device, cfg.activation_checkpointing, self.env.distributed, lora)

    def check_memory(self) -> None:
        parts = self.memory_parts()
        check_memory(sum(n for _, n in parts), self.device, "this fine-tune", parts,
                     "lower --lora-rank, or --batch-size (and raise --grad-accum to keep the batch)")

    def build_model(self) -> ByteLM:
        cfg = self.cfg
        base = load_model(cfg.base)
        self.base_ref = base_reference(cfg.base)
        self.base_fingerprint = weights_fingerprint(base)
        self.base_val: float | None = None
        self.peft_model = apply_lora(base, cfg.lora_target, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout,
                                     base=self.base_ref)
        return self.peft_model.get_base_model()  # a ByteLM (generate, loss, ...) that now holds the adapters

    def describe(self) -> str:
        c, total = self.cfg, self.model.num_params()
        return (f"LoRA on {self.model_config.model_type} {self.base_ref} (target {c.lora_target}, rank {c.lora_rank}, "
                f"alpha {c.lora_alpha:g}): {self.trainable_params:,} trainable of {total:,} params "
                f"({100 * self.trainable_params / total:.2f}%)")

    def save_weights(self, folder: Path) -> None:
        save_adapter(self.peft_model, folder, self.model_config, self.base_ref, self.base_fingerprint,
                     **self.card_info())

    def save_checkpoint(self) -> Path | None:
        ckpt = super().save_checkpoint()
        if ckpt is not None:  # once `latest` names it: adapter/ never runs ahead of the checkpoints
            publish_adapter(ckpt, self.out / ADAPTER_DIR)
        return ckpt

    def load_weights(self, ckpt: Path) -> None:
        folder, _, info = read_adapter(ckpt)
        check_base(folder, info, self.model_config, self.base_fingerprint)
        load_adapter_weights(self.peft_model, folder)
        self.base_val = logged_val(self.out / "metrics.csv", step=0)

    def before_training(self) -> None:
        if self.step == 0:  # the base alone (its adapters are zero): what the fine-tune is measured against
            self.base_val = self.estimate_val()
            self.log_val(self.base_val, note=" (the base)")

    def run(self, until_step: int | None = None) -> dict[str, Any]:
        result = super().run(until_step)
        return {**result, "base_val_bpb": None if self.base_val is None else self.base_val / LN2,
                "trainable_params": self.trainable_params, "params": self.model.num_params()}


def finetune(cfg: FinetuneConfig, resume: bool = False, log=log_line) -> dict[str, Any]:
    """Run (or resume) a LoRA fine-tune end to end: `bytelm.training.train` with FinetuneTrainer."""
    return train(cfg, resume=resume, log=log, trainer_class=FinetuneTrainer)


__all__ = ["FinetuneConfig", "FinetuneTrainer", "finetune"]
