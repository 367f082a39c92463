"""LoRA fine-tuning: `bytelm train` with another Trainer. The model is built from base + LoRA, only the adapters
reach the optimizer, and checkpoints hold the adapter (each checkpoint's also copied to the run's adapter/ folder, a
plain peft adapter folder); data, schedule, logging, metrics and exact resume are Trainer's own."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import tyro
from tyro.conf import Positional

from ..devices import check_memory
from ..errors import ConfigError
from ..models import ByteLM, load_model, read_config
from ..models.config import MAX_SIZE
from ..training import LN2, Trainer, log_line, train
from ..training.config import OptimizerSection, RunConfig, ScheduleSection, flag
from ..training.memory import training_parts
from ..training.metrics import logged_val
from ..typedconfig import TypedConfig
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
class LoraSection(TypedConfig):
    """the adapters"""

    target: Annotated[Literal["global", "local", "all"], flag("lora_target")] = "all"
    """whose Linear layers get adapters: the global model's, the local model's or both (a byte transformer's one
    stack: global = all)"""
    rank: Annotated[int, flag("lora_rank")] = 8  # r, the rank of each update B A
    alpha: Annotated[float, flag("lora_alpha")] = 16.0  # updates are scaled by alpha / r
    dropout: Annotated[float, flag("lora_dropout")] = 0.0  # dropout on each adapter's input


@dataclass
class FinetuneConfig(RunConfig):
    """A LoRA fine-tune: a run's data, optimizer, schedule, checkpoint and parallel settings, the base model and the
    adapters' shape (the model is the base's). `bytelm finetune` exposes each field as a flag. Its defaults suit
    adapters: they start at zero and take a high rate with AdamW, no decay (it would pull them back toward the base),
    the local model's at the same rate, and a short run."""

    base: Annotated[Positional[str], tyro.conf.arg(metavar="BASE")] = ""
    """the model to fine-tune: a model folder, a training run folder or a hub id (org/name)"""
    optimizer: OptimizerSection = field(default_factory=lambda: OptimizerSection(
        name="adamw", lr=1e-3, weight_decay=0.0, local_lr_scale=1.0))
    schedule: ScheduleSection = field(default_factory=lambda: ScheduleSection(max_steps=300, warmup_steps=20))
    lora: LoraSection = field(default_factory=LoraSection)

    _kind: ClassVar[str] = "finetune"

    def _checks(self) -> list[tuple[bool, str]]:
        lora = self.lora
        return [
            (bool(self.base), "name the model to fine-tune (BASE: a model folder, run folder or hub id)"),
            (lora.target in TARGETS, f"lora_target must be one of {', '.join(TARGETS)}"),
            # the base is frozen and only the adapters train: their state is small, and DDP replicates it cheaply
            (self.parallel.strategy == "ddp", "a LoRA fine-tune runs under --parallel ddp (fsdp shards a model "
                                              "being trained whole; an adapter's state is small)"),
            (1 <= lora.rank <= MAX_SIZE, "lora_rank must be in 1..2**31 - 1"),
            (0.0 <= lora.dropout < 1.0, "lora_dropout must be in [0, 1)"),
            (lora.alpha > 0, f"lora_alpha must be > 0, got {lora.alpha}"),
            *self._run_checks(),
        ]

    @classmethod
    def _checked(cls, d: dict[str, Any], saved_run: bool) -> dict[str, Any]:
        # a flat fine-tune config (every run.json and --config file before the sections) holds TrainConfig's model
        # fields, empty: the model is the base's
        unused = {k: d[k] for k in ("model_type", "preset", "model") if isinstance(d, dict) and k in d}
        if any(unused.values()):
            raise ConfigError(f"{cls.kind()} config: model_type, preset and model do not apply: the model is the "
                              "base's")
        return super()._checked({k: v for k, v in d.items() if k not in unused} if unused else d, saved_run)

    def default_out_dir(self) -> str:
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
        cfg, lora = self.cfg, self.cfg.lora
        adapters = (target_modules(self.model_config, lora.target), lora.rank, lora.dropout)
        return training_parts(self.model_config, cfg.data.batch_size, self.seq_len, cfg.optimizer.name,
                              cfg.parallel.precision, self.device, cfg.parallel.activation_checkpointing,
                              self.env.distributed, adapters)

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
        lora = cfg.lora
        self.peft_model = apply_lora(base, lora.target, lora.rank, lora.alpha, lora.dropout, base=self.base_ref)
        return self.peft_model.get_base_model()  # a ByteLM (generate, loss, ...) that now holds the adapters

    def describe(self) -> str:
        c, total = self.cfg.lora, self.model.num_params()
        return (f"LoRA on {self.model_config.model_type} {self.base_ref} (target {c.target}, rank {c.rank}, "
                f"alpha {c.alpha:g}): {self.trainable_params:,} trainable of {total:,} params "
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


__all__ = ["FinetuneConfig", "FinetuneTrainer", "LoraSection", "finetune"]
