"""The settings of a training run, as one typed dataclass: `bytelm train` exposes each field as a flag (its comment
is the flag's help), `run.json` records them, `--config FILE` reads them back."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..data.media import IMAGE_FITS, MAX_SAMPLE_RATE, MODALITIES, SAMPLE_FORMATS, parse_image_size
from ..errors import ConfigError
from ..models.registry import config_class, model_types
from ..typedconfig import TypedConfig
from .optim import OPTIMIZERS
from .schedule import SCHEDULES

DEFAULT_MAX_STEPS = 600  # a run's length without --max-steps or a time budget


@dataclass
class TrainConfig(TypedConfig):
    """Everything a run needs; `bytelm train` exposes each field as a flag (--max-steps, --batch-size, ...)."""

    model_type: str = "megabyte"  # megabyte | transformer
    preset: str = "small"  # a named preset of that model type
    model: dict[str, Any] = field(default_factory=dict)  # overrides of model config fields
    data: list[str] = field(default_factory=list)  # files/folders; empty: the Python standard library's source
    val_fraction: float = 0.05  # share of the data held out for validation
    separator: int | None = None  # byte joining documents; None: plain concatenation
    modality: str = "auto"  # what the data is: auto (by file extension) | bytes | image | audio
    image_size: str = ""  # images: HxW or HxWxC, height first (64x64x3); empty: the first image's
    image_fit: str = "none"  # images of another size: none (an error) | resize | crop (the centre) | pad (black)
    sample_rate: int = 0  # audio: samples per second (others resampled); 0: the first clip's
    sample_format: str = "mulaw"  # audio: mulaw (8-bit mu-law) | pcm8 (8-bit) | pcm16 (16-bit little-endian)
    out_dir: str = ""  # run folder; empty: runs/<model_type>-<preset>
    seq_len: int = 0  # 0: the model's max_seq_len
    batch_size: int = 8  # per process and micro-step; global batch = batch_size * grad_accum * processes
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 0  # the run's length in steps; 0: 600, or no step limit when a time budget ends the run
    time_budget: float = 0.0  # seconds of training; the schedule ends with it when it ends first; 0: none
    lr: float = 4e-3  # peak learning rate (small models take a high one)
    local_lr_scale: float = 4.0  # MEGABYTE: the local model's (and output head's) learning rate, relative to lr
    optimizer: str = "muon"  # muon (Muon for the transformer blocks' matrices, AdamW for the rest) | adamw
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay); either ends with max_steps or the time budget
    decay_fraction: float = 0.2  # wsd: the share of the run spent decaying
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    weight_decay: float = 0.1  # decay of matrices and embeddings (Muon's and AdamW's)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # 0: no clipping
    # a step whose loss or gradient norm is NaN or inf is skipped (no update); this many in a row stop the run
    max_bad_steps: int = 3
    seed: int = 1337  # model init and data order
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA and on a CPU with native bf16, else fp32) | fp32 | bf16
    compile: bool = False  # torch.compile the model (CPU: ~3% faster steps for ~25 s of compiling); eager if it fails
    activation_checkpointing: bool = False  # recompute activations in the backward pass (long sequences)
    parallel: str = "ddp"  # under torchrun: ddp | fsdp (FSDP2: parameters, gradients, optimizer state sharded)
    fsdp_local: str = "shard"  # fsdp: the local model's blocks sharded one by one (shard) or in the root's unit (root)
    consolidate: bool = True  # fsdp: also write each checkpoint's whole model (config.json + model.safetensors)
    log_interval: int = 10  # steps between log lines
    eval_interval: int = 100  # steps between validation estimates
    eval_batches: int = 8  # batches per validation estimate
    save_interval: int = 100  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept
    sample_bytes: int = 256  # printed after training (an image or audio model writes sample.png or .wav); 0: none
    sample_prompt: str = "def "  # the sample's prompt

    _kind: ClassVar[str] = "train"  # names the config in its errors

    def __post_init__(self) -> None:
        for ok, msg in self._checks():
            if not ok:
                raise ConfigError(f"{self._kind} config: {msg}")
        if self.image_size:
            parse_image_size(self.image_size)
        if not self.out_dir:
            self.out_dir = self._default_out_dir()

    def _checks(self) -> list[tuple[bool, str]]:
        return [(self.model_type in model_types(), f"model_type must be one of {model_types()}"),
                *self._schedule_checks()]

    def _default_out_dir(self) -> str:
        return f"runs/{self.model_type}-{self.preset}"

    def _schedule_checks(self) -> list[tuple[bool, str]]:
        """The checks every run shares, a fine-tune too (bytelm.finetune.FinetuneConfig)."""
        floats = [f.name for f in dataclasses.fields(self) if isinstance(getattr(self, f.name), float)]
        not_finite = [f"{n}={getattr(self, n)}" for n in floats if not math.isfinite(getattr(self, n))]
        return [
            (not not_finite, f"{', '.join(not_finite)}: every number must be finite"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.max_steps >= 0, "max_steps must be >= 1 (or 0: the default)"),
            (self.seq_len >= 0, "seq_len must be >= 0"),
            (self.time_budget >= 0, "time_budget must be >= 0"),
            (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}"),
            (self.lr > 0 and 0 <= self.min_lr_ratio <= 1, "lr must be > 0 and min_lr_ratio in [0, 1]"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"beta1 and beta2 must be in [0, 1), got {self.beta1}, "
                                                          f"{self.beta2}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0 (0: no clipping), got {self.grad_clip}"),
            (self.max_bad_steps >= 0, f"max_bad_steps must be >= 0, got {self.max_bad_steps}"),
            (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (self.local_lr_scale > 0, f"local_lr_scale must be > 0, got {self.local_lr_scale}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}"),
            (self.modality in ("auto", *MODALITIES), f"modality must be auto, {', '.join(MODALITIES)}; got "
                                                     f"{self.modality!r}"),
            (self.image_fit in IMAGE_FITS, f"image_fit must be one of {', '.join(IMAGE_FITS)}, got {self.image_fit!r}"),
            (0 <= self.sample_rate <= MAX_SAMPLE_RATE, f"sample_rate must be in 0..{MAX_SAMPLE_RATE:,} Hz (0: the "
                                                       f"first clip's), got {self.sample_rate}"),
            (self.sample_format in SAMPLE_FORMATS, f"sample_format must be one of {', '.join(SAMPLE_FORMATS)}, got "
                                                   f"{self.sample_format!r}"),
            (0 < self.decay_fraction <= 1, f"decay_fraction must be in (0, 1], got {self.decay_fraction}"),
            (self.precision in ("auto", "fp32", "bf16"), "precision must be auto, fp32 or bf16"),
            (min(self.log_interval, self.eval_interval, self.save_interval, self.eval_batches,
                 self.keep_checkpoints) >= 1,
             "log_interval, eval_interval, save_interval, eval_batches and keep_checkpoints must be >= 1"),
        ]

    @property
    def step_limit(self) -> int | None:
        """The steps the run may take: max_steps, else 600, else (with a time budget) none: the budget ends it."""
        if self.max_steps > 0:
            return self.max_steps
        return None if self.time_budget > 0 else DEFAULT_MAX_STEPS

    def model_config(self):
        return config_class(self.model_type).from_name(self.preset, **self.model)
