"""The settings of a training run, as typed dataclasses in sections (model, data, optimizer, schedule, checkpointing,
parallel): `bytelm train` exposes each field as a flag (its comment is the flag's help, its section the help's group),
`run.json` records them, `--config FILE` reads them back.

Flags keep one flat namespace (--lr, --batch-size, --optimizer): a field whose flag is not its own name says so with
`flag(...)`, and that flag's name is also the field's name in the flat dicts every run.json and --config file written
before the sections held, which `from_dict` still reads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, TypeVar

import tyro
from tyro.constructors import PrimitiveConstructorSpec

from ..data.media import IMAGE_FITS, MAX_SAMPLE_RATE, MODALITIES, SAMPLE_FORMATS, parse_image_size
from ..errors import ConfigError
from ..models.registry import config_class, model_types
from ..typedconfig import TypedConfig, checked_value
from .optim import OPTIMIZERS
from .parallel import FSDP_LOCAL, STRATEGIES
from .schedule import SCHEDULES

DEFAULT_MAX_STEPS = 600  # a run's length without --max-steps or a time budget

R = TypeVar("R", bound="RunConfig")


def parse_duration(s: str) -> float:
    """'90', '90s', '5m', '1.5h' -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", s)
    if not m:
        raise ValueError(f"not a duration: {s!r} (use e.g. 300, 300s, 5m, 1.5h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """['key=value', ...] with each value read as JSON when it parses (numbers, true/false, null), else a string."""
    out: dict[str, Any] = {}
    for s in items:
        if "=" not in s:
            raise ValueError(f"expected FIELD=VALUE, got {s!r}")
        k, v = s.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


# flag types that read as people write them; to the config (and to JSON) they are a float and a dict
Duration = Annotated[float, PrimitiveConstructorSpec(
    nargs=1, metavar="DURATION", instance_from_str=lambda args: parse_duration(args[0]),
    is_instance=lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
    str_from_instance=lambda x: [f"{x:g}"])]

Overrides = Annotated[dict[str, Any], PrimitiveConstructorSpec(
    nargs="+", metavar="FIELD=VALUE", instance_from_str=parse_assignments,
    is_instance=lambda x: isinstance(x, dict),
    str_from_instance=lambda d: [f"{k}={json.dumps(v)}" for k, v in d.items()] or ["{}"])]


def flag(name: str, **kw: Any):
    """A field's flag (and flat name) where it is not the field's own: in its section a field is `name` or `rank`; on
    the command line, where every section's flags meet, it is --optimizer or --lora-rank."""
    return tyro.conf.arg(name=name, **kw)


def flag_name(section: type, name: str) -> str:
    """The flag (and flat name) of a section's field: its `flag(...)` name, else its own."""
    hint = typing.get_type_hints(section, include_extras=True)[name]
    named = [m.name for m in typing.get_args(hint)[1:] if hasattr(m, "prefix_name") and m.name]
    return named[0] if named else name


@dataclass
class ModelSection(TypedConfig):
    """the model to train"""

    type: Annotated[str, flag("model_type")] = "megabyte"  # megabyte | transformer
    preset: str = "small"  # a named preset of that model type
    overrides: Annotated[Overrides, flag("model")] = field(default_factory=dict)
    """override model config fields, e.g. --model patch_size=4 global_layers=6"""


@dataclass
class DataSection(TypedConfig):
    """what the run trains on, and in what batches"""

    paths: Annotated[list[str], flag("data")] = field(default_factory=list)
    """files/folders; empty: the Python standard library's source"""
    val_fraction: float = 0.05  # share of the data held out for validation
    separator: int | None = None  # byte joining documents; None: plain concatenation
    modality: str = "auto"  # what the data is: auto (by file extension) | bytes | image | audio
    image_size: str = ""  # images: HxW or HxWxC, height first (64x64x3); empty: the first image's
    image_fit: str = "none"  # images of another size: none (an error) | resize | crop (the centre) | pad (black)
    sample_rate: int = 0  # audio: samples per second (others resampled); 0: the first clip's
    sample_format: str = "mulaw"  # audio: mulaw (8-bit mu-law) | pcm8 (8-bit) | pcm16 (16-bit little-endian)
    seq_len: int = 0  # 0: the model's max_seq_len
    batch_size: int = 8  # per process and micro-step; global batch = batch_size * grad_accum * processes
    grad_accum: int = 1  # micro-steps per optimizer step


@dataclass
class OptimizerSection(TypedConfig):
    """the optimizer"""

    name: Annotated[str, flag("optimizer")] = "muon"
    """muon (Muon for the transformer blocks' matrices, AdamW for the rest) | adamw"""
    lr: float = 4e-3  # peak learning rate (small models take a high one; a fine-tune's adapters too)
    local_lr_scale: float = 4.0  # MEGABYTE: the local model's (and output head's) learning rate, relative to lr
    weight_decay: float = 0.1  # decay of matrices and embeddings (Muon's and AdamW's)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # 0: no clipping
    # a step whose loss or gradient norm is NaN or inf is skipped (no update); this many in a row stop the run
    max_bad_steps: int = 3


@dataclass
class ScheduleSection(TypedConfig):
    """the learning rate's schedule and the run's length"""

    name: Annotated[str, flag("schedule")] = "cosine"
    """cosine | wsd (warmup-stable-decay); either ends with max_steps or the time budget"""
    max_steps: int = 0  # the run's length in steps; 0: 600, or no step limit when a time budget ends the run
    time_budget: Duration = 0.0  # training time before stopping early (300, 300s, 5m, 1.5h); 0: none
    warmup_steps: int = 100  # linear warm-up from 0 to lr
    decay_fraction: float = 0.2  # wsd: the share of the run spent decaying
    min_lr_ratio: float = 0.1  # the schedule decays to lr * min_lr_ratio

    @property
    def step_limit(self) -> int | None:
        """The steps the run may take: max_steps, else 600, else (with a time budget) none: the budget ends it."""
        if self.max_steps > 0:
            return self.max_steps
        return None if self.time_budget > 0 else DEFAULT_MAX_STEPS


@dataclass
class CheckpointSection(TypedConfig):
    """checkpoints"""

    save_interval: int = 100  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept
    consolidate: bool = True
    """with --parallel fsdp: also write each checkpoint's whole model (config.json + model.safetensors) from rank 0,
    for generate/eval/serve/the Hub; off: only the sharded files (`bytelm consolidate RUN` writes it later)"""


@dataclass
class ParallelSection(TypedConfig):
    """devices, precision and how ranks share the model"""

    strategy: Annotated[str, flag("parallel")] = "ddp"
    """under torchrun: ddp (every rank holds the whole model) | fsdp (FSDP2: parameters, gradients and optimizer state
    sharded across ranks; sharded checkpoints that resume on any number of ranks)"""
    fsdp_local: str = "shard"
    """with --parallel fsdp: shard (the local model's blocks sharded one by one) | root (kept with the root's
    parameters in one unit)"""
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on CUDA and on a CPU with native bf16, else fp32) | fp32 | bf16
    compile: bool = False  # torch.compile the model (CPU: ~3% faster steps for ~25 s of compiling); eager if it fails
    activation_checkpointing: bool = False  # recompute activations in the backward pass (long sequences)


@dataclass
class RunConfig(TypedConfig):
    """What every run shares, a training run (TrainConfig) and a LoRA fine-tune (bytelm.finetune.FinetuneConfig):
    the top-level fields, the data, optimizer, schedule, checkpointing and parallel sections, and their checks."""

    out_dir: str = ""  # run folder; empty: named after the model (runs/<model_type>-<preset>, runs/<base>-lora)
    seed: int = 1337  # model init and data order
    log_interval: int = 10  # steps between log lines
    eval_interval: int = 100  # steps between validation estimates
    eval_batches: int = 8  # batches per validation estimate
    sample_bytes: int = 256  # printed after training (an image or audio model writes sample.png or .wav); 0: none
    sample_prompt: str = "def "  # the sample's prompt
    data: DataSection = field(default_factory=DataSection)
    optimizer: OptimizerSection = field(default_factory=OptimizerSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpointing: CheckpointSection = field(default_factory=CheckpointSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)

    _kind: ClassVar[str] = "run"

    def __post_init__(self) -> None:
        for ok, msg in self._checks():
            if not ok:
                raise ConfigError(f"{self._kind} config: {msg}")
        if self.data.image_size:
            parse_image_size(self.data.image_size)
        if not self.out_dir:
            self.out_dir = self.default_out_dir()

    def _checks(self) -> list[tuple[bool, str]]:
        return self._run_checks()

    def default_out_dir(self) -> str:
        raise NotImplementedError

    def model_config(self):
        raise NotImplementedError

    @property
    def model_overrides(self) -> dict[str, Any]:
        """The model config fields the run set itself (a fine-tune's model is its base's: none)."""
        return {}

    def _run_checks(self) -> list[tuple[bool, str]]:
        """The checks every run shares, a fine-tune's too; each names its fields by their flags' names."""
        d, o, s, c, p = self.data, self.optimizer, self.schedule, self.checkpointing, self.parallel
        not_finite = [f"{n}={v}" for n, v in self.flat_settings().items()
                      if isinstance(v, float) and not math.isfinite(v)]
        return [
            (not not_finite, f"{', '.join(not_finite)}: every number must be finite"),
            (d.batch_size >= 1 and d.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (s.max_steps >= 0, "max_steps must be >= 1 (or 0: the default)"),
            (d.seq_len >= 0, "seq_len must be >= 0"),
            (s.time_budget >= 0, "time_budget must be >= 0"),
            (0 < d.val_fraction < 1, f"val_fraction must be in (0, 1), got {d.val_fraction}"),
            (o.lr > 0 and 0 <= s.min_lr_ratio <= 1, "lr must be > 0 and min_lr_ratio in [0, 1]"),
            (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"beta1 and beta2 must be in [0, 1), got {o.beta1}, {o.beta2}"),
            (o.weight_decay >= 0, f"weight_decay must be >= 0, got {o.weight_decay}"),
            (o.grad_clip >= 0, f"grad_clip must be >= 0 (0: no clipping), got {o.grad_clip}"),
            (o.max_bad_steps >= 0, f"max_bad_steps must be >= 0, got {o.max_bad_steps}"),
            (s.warmup_steps >= 0, "warmup_steps must be >= 0"),
            (o.local_lr_scale > 0, f"local_lr_scale must be > 0, got {o.local_lr_scale}"),
            (o.name in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {o.name!r}"),
            (s.name in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}, got {s.name!r}"),
            (d.modality in ("auto", *MODALITIES), f"modality must be auto, {', '.join(MODALITIES)}; got "
                                                  f"{d.modality!r}"),
            (d.image_fit in IMAGE_FITS, f"image_fit must be one of {', '.join(IMAGE_FITS)}, got {d.image_fit!r}"),
            (0 <= d.sample_rate <= MAX_SAMPLE_RATE, f"sample_rate must be in 0..{MAX_SAMPLE_RATE:,} Hz (0: the first "
                                                    f"clip's), got {d.sample_rate}"),
            (d.sample_format in SAMPLE_FORMATS, f"sample_format must be one of {', '.join(SAMPLE_FORMATS)}, got "
                                                f"{d.sample_format!r}"),
            (0 < s.decay_fraction <= 1, f"decay_fraction must be in (0, 1], got {s.decay_fraction}"),
            (p.precision in ("auto", "fp32", "bf16"), "precision must be auto, fp32 or bf16"),
            (p.strategy in STRATEGIES, f"parallel must be one of {', '.join(STRATEGIES)}, got {p.strategy!r}"),
            (p.fsdp_local in FSDP_LOCAL, f"fsdp_local must be one of {', '.join(FSDP_LOCAL)}, got "
                                         f"{p.fsdp_local!r}"),
            (min(self.log_interval, self.eval_interval, c.save_interval, self.eval_batches, c.keep_checkpoints) >= 1,
             "log_interval, eval_interval, save_interval, eval_batches and keep_checkpoints must be >= 1"),
        ]

    @property
    def step_limit(self) -> int | None:
        return self.schedule.step_limit

    # the sections and the flat names ------------------------------------------------------------------------------
    @classmethod
    def sections(cls) -> dict[str, type[TypedConfig]]:
        """name -> class of each section (the fields that are configs of their own)."""
        return {n: t for n, t in cls.field_types().items() if isinstance(t, type) and issubclass(t, TypedConfig)}

    @classmethod
    def flat_names(cls) -> dict[str, tuple[str | None, str]]:
        """flat name (= the flag's) -> (section or None: top level, field) of every setting."""
        sections = cls.sections()
        out: dict[str, tuple[str | None, str]] = {n: (None, n) for n in cls.field_types() if n not in sections}
        for s, t in sections.items():
            out.update({flag_name(t, f.name): (s, f.name) for f in dataclasses.fields(t)})
        return out

    def flat_settings(self) -> dict[str, Any]:
        """Every setting under its flat name (the flags' names)."""
        return {n: getattr(self if s is None else getattr(self, s), f) for n, (s, f) in self.flat_names().items()}

    @classmethod
    def flat(cls: type[R], **settings: Any) -> R:
        """The config of settings named by their flat names (lr=1e-3, batch_size=4, data=[...]), type-checked."""
        return cls.from_dict(settings)

    # from JSON: sectioned, or the flat form every run.json and --config file written before the sections held -----
    @classmethod
    def from_dict(cls: type[R], d: dict[str, Any], saved_run: bool = False) -> R:
        """The config of a JSON dict, sectioned ({"optimizer": {"lr": ...}}) or flat ({"lr": ...}), every value
        type-checked. `saved_run`: d is a run's record (run.json), read back as that run trained (see `_migrated`)."""
        return cls(**cls._checked(d, saved_run))

    @classmethod
    def defaults(cls: type[R], d: dict[str, Any], saved_run: bool = False) -> R:
        """d's settings (type-checked) in a config whose own checks have not run, nor its out_dir been named: the
        defaults a command line's flags override; the config the flags make is checked once built."""
        out = cls.__new__(cls)
        out.__dict__.update({**cls._default_values(), **cls._checked(d, saved_run)})
        return out

    @classmethod
    def _default_values(cls) -> dict[str, Any]:
        return {f.name: f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
                for f in dataclasses.fields(cls)}

    @classmethod
    def section_of(cls, d: dict[str, Any], name: str) -> TypedConfig:
        """One section of a config dict, flat or sectioned, type-checked; the rest of d is not read (`bytelm eval`
        reads the data settings of any run's run.json)."""
        flat = cls.flat_names()
        mine = {k: v for k, v in d.items() if k == name or flat.get(k, (None, ""))[0] == name}
        return cls._checked(mine, saved_run=False).get(name) or cls._default_values()[name]

    @classmethod
    def _migrated(cls, d: dict[str, Any]) -> dict[str, Any]:
        """A run's record as that run trained: one written before bytelm 0.4 has no `optimizer`, and trained with
        AdamW alone (0.4's default, Muon, would not fit its checkpoint's optimizer state)."""
        return d if "optimizer" in d else {**d, "optimizer": "adamw"}

    @classmethod
    def _checked(cls, d: dict[str, Any], saved_run: bool) -> dict[str, Any]:
        """The constructor's arguments for d: top-level values and section objects, each value type-checked."""
        kind = cls.kind()
        if not isinstance(d, dict):
            raise ConfigError(f"a {kind} config must be a JSON object, got {type(d).__name__}")
        if saved_run:
            d = cls._migrated(d)
        types_, sections, flat = cls.field_types(), cls.sections(), cls.flat_names()
        top: dict[str, Any] = {}
        parts: dict[str, dict[str, Any]] = {}
        spelled: dict[tuple[str, str], str] = {}  # (section, field) -> the key that set it, for "given twice"

        def put(section: str, name: str, value: Any, key: str) -> None:
            if (section, name) in spelled:
                raise ConfigError(f"{kind} config: {key} and {spelled[section, name]} are the same setting; give one")
            spelled[section, name] = key
            parts.setdefault(section, {})[name] = value

        unknown = []
        for k, v in d.items():
            if k in sections and cls._is_section(k, v, d):
                checked = sections[k].checked_fields(v, kind, label=f"{k}.")
                for name, value in checked.items():
                    put(k, name, value, f"{k}.{name}")
            elif k in flat:
                section, name = flat[k]
                t = (types_ if section is None else sections[section].field_types())[name]
                if section is None:
                    top[k] = checked_value(kind, k, t, v)
                else:
                    put(section, name, checked_value(kind, k, t, v), k)
            else:
                unknown.append(k)
        if unknown:
            raise ConfigError(f"unknown {kind} config field(s): {', '.join(map(repr, sorted(unknown)))}; known: "
                              f"{', '.join(flat)} (or sectioned: {', '.join(sections)})")
        # a section given in part keeps this config's defaults for the rest (a fine-tune's are not a training run's)
        defaults = cls._default_values()
        return {**top, **{s: dataclasses.replace(defaults[s], **values) for s, values in parts.items()}}

    @classmethod
    def _is_section(cls, key: str, value: Any, d: dict[str, Any]) -> bool:
        """Whether d[key] holds a section. A section holds a JSON object; so does the flat form's `model` (the
        model overrides), told apart by its keys: model config fields, never the section's type/preset/overrides."""
        if key == "model" and isinstance(value, dict):
            return set(value) <= {"type", "preset", "overrides"} and not {"model_type", "preset"} & set(d)
        return isinstance(value, dict) or key not in cls.flat_names()


@dataclass
class TrainConfig(RunConfig):
    """Everything a training run needs; `bytelm train` exposes each field as a flag (--max-steps, --batch-size, ...)."""

    model: ModelSection = field(default_factory=ModelSection)

    _kind: ClassVar[str] = "train"  # names the config in its errors

    def _checks(self) -> list[tuple[bool, str]]:
        return [(self.model.type in model_types(), f"model_type must be one of {model_types()}"), *self._run_checks()]

    def default_out_dir(self) -> str:
        return f"runs/{self.model.type}-{self.model.preset}"

    @property
    def model_overrides(self) -> dict[str, Any]:
        return self.model.overrides

    def model_config(self):
        return config_class(self.model.type).from_name(self.model.preset, **self.model.overrides)
