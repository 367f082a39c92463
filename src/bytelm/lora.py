"""LoRA fine-tuning (Hu et al. 2021, arXiv 2106.09685) of a trained bytelm model with peft, and adapters that know
their base.

LoRA freezes the base and learns, for chosen Linear layers W, a low-rank update: y = W x + (alpha / r) B A x with
A (r, in) and B (out, r); B starts at zero, so at step 0 the model is exactly the base. peft does the wrapping
(LoraConfig + get_peft_model on our own modules); this module picks the layers and keeps adapter and base together.
The Linear layers, by target:

    MEGABYTE          global_model.blocks.N.{attn.qkv, attn.proj, mlp.fc, mlp.proj}   global
                      local_model.blocks.N.{...}                                       local
                      both                                                             all
    ByteTransformer   transformer.blocks.N.{...}                                       global or all

An adapter folder (what each checkpoint of a fine-tune run holds, next to the optimizer and trainer state):

    adapter_config.json        peft's LoraConfig; base_model_name_or_path names the base (a folder or a hub id)
    adapter_model.safetensors  the LoRA weights only
    bytelm_adapter.json        the base's model config and a fingerprint of its weights: a base of another config is
                               refused, naming the fields that differ; one with other weights gets a warning
    README.md                  a model card

`bytelm finetune` is `bytelm train` with another Trainer (FinetuneTrainer): the model is built from base + LoRA,
only the adapters reach the optimizer, and checkpoints hold the adapter. Data, schedule, logging, metrics and exact
resume are Trainer's own.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import __version__
from .checkpoint import (
    ADAPTER_CONFIG_NAME,
    CheckpointError,
    load_model,
    read_config,
    read_json_object,
    resolve_model_dir,
    state_problems,
)
from .config import ConfigError, config_from_dict
from .hub import is_hub_id, write_model_card
from .model import ByteLM
from .train import LN2, TrainConfig, Trainer, log_line, train

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
BASE_INFO_NAME = "bytelm_adapter.json"
TARGETS = ("global", "local", "all")
BLOCK_LINEARS = r"blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc|proj))"


class LoraError(CheckpointError):
    """A LoRA setting, adapter folder or base that cannot be used, with the reason."""


def _peft():
    try:
        import peft
    except ImportError as e:
        raise LoraError(f"LoRA needs peft, which cannot be imported ({e}): pip install 'bytelm[lora]'") from None
    return peft


# --- adapters on a model -------------------------------------------------------------------------------------------
def target_modules(model_config, target: str) -> str:
    """A regex over module names (peft matches it against each whole name): the Linear layers of `target`."""
    if target not in TARGETS:
        raise LoraError(f"lora target must be one of {', '.join(TARGETS)}, got {target!r}")
    if model_config.model_type == "transformer":
        if target == "local":
            raise LoraError("a byte transformer has no local model: --lora-target global (or all) adapts its "
                            "transformer")
        return rf"transformer\.{BLOCK_LINEARS}"
    stack = {"global": "global_model", "local": "local_model", "all": "(global_model|local_model)"}[target]
    return rf"{stack}\.{BLOCK_LINEARS}"


def apply_lora(model: ByteLM, target: str = "all", rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               base: str | None = None):
    """Fresh LoRA adapters on the Linear layers of `target`, all else frozen: a peft PeftModel around `model`, which
    now holds the adapters itself (peft replaces its Linear layers in place). `base`: the base's folder or hub id,
    recorded in the adapter's config."""
    peft = _peft()
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraError(f"lora rank must be an integer >= 1, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise LoraError(f"lora dropout must be in [0, 1), got {dropout}")
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                             target_modules=target_modules(model.config, target))
    if base is not None:
        model.name_or_path = base  # what peft records as the adapter's base_model_name_or_path
    return peft.get_peft_model(model, config)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A cheap digest of a model's weights (256 evenly spaced values of each tensor): enough to tell whether a base
    is the one an adapter was trained on, without hashing gigabytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        flat = t.detach().reshape(-1)
        h.update(name.encode() + flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def base_reference(base: str | Path) -> str:
    """How an adapter names its base: a hub id as given; a local folder as an absolute path (for a run folder, the
    checkpoint it was loaded from, not whatever the run holds later)."""
    return str(base) if is_hub_id(base) else str(resolve_model_dir(base).resolve())


def save_adapter(peft_model, folder: str | Path, base_config, base: str | None, fingerprint: str | None,
                 **card) -> Path:
    """Write an adapter folder (see the module docstring). Files are written beside it, then moved in one by one.
    `card`: what the model card says of the run (name, val_bpb, data, step)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lora = peft_model.peft_config["default"]
    trainable = sum(p.numel() for n, p in peft_model.named_parameters() if ".lora_" in n)
    base_params = sum(p.numel() for p in peft_model.parameters()) - trainable
    info = {"base": base, "base_config": base_config.to_dict(), "base_fingerprint": fingerprint,
            "bytelm_version": __version__, **{k: card[k] for k in ("val_bpb", "data", "step") if k in card}}
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        # save_embedding_layers=False: "auto" would ask the Hub about the base to see whether embeddings changed
        peft_model.save_pretrained(tmp, save_embedding_layers=False)
        Path(tmp, BASE_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        write_model_card(tmp, base_config, base_params, base_model=base, **card,
                         adapter={"target": lora.target_modules, "rank": lora.r, "trainable": trainable})
        for f in (ADAPTER_WEIGHTS_NAME, BASE_INFO_NAME, "README.md", ADAPTER_CONFIG_NAME):  # the config last
            os.replace(Path(tmp, f), folder / f)
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, LoraError)


def read_adapter(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(folder, its adapter_config.json, its bytelm_adapter.json or {} for an adapter made without bytelm) of an
    adapter folder, a fine-tune run folder (its latest checkpoint) or a hub id."""
    folder = resolve_model_dir(path)
    if not folder.is_dir():
        raise LoraError(f"adapter folder {folder} does not exist")
    if not (folder / ADAPTER_CONFIG_NAME).is_file():
        raise LoraError(f"{folder} is neither a LoRA adapter folder (no {ADAPTER_CONFIG_NAME}) nor a fine-tune run")
    config = _read_json(folder / ADAPTER_CONFIG_NAME)
    if config.get("peft_type") != "LORA":
        raise LoraError(f"{folder} holds a {config.get('peft_type')} adapter; bytelm uses LoRA adapters")
    if not (folder / ADAPTER_WEIGHTS_NAME).is_file():
        raise LoraError(f"{folder} has no {ADAPTER_WEIGHTS_NAME}")
    info = _read_json(folder / BASE_INFO_NAME) if (folder / BASE_INFO_NAME).is_file() else {}
    return folder, config, info


def recorded_base(config: dict[str, Any], info: dict[str, Any]) -> str | None:
    """The base an adapter names: bytelm's record, else peft's base_model_name_or_path."""
    return info.get("base") or config.get("base_model_name_or_path")


def check_base(folder: Path, info: dict[str, Any], config, fingerprint: str | None) -> None:
    """Refuse a base whose config differs from the one the adapter records; warn when only its weights differ."""
    if "base_config" not in info:
        return  # an adapter made elsewhere: the strict weight check is all we have
    try:
        want = config_from_dict(info["base_config"])
    except ConfigError as e:
        raise LoraError(f"{folder / BASE_INFO_NAME}: {e}") from None
    made_for = f"adapter {folder} was made for another base ({info.get('base')})"
    if want.model_type != config.model_type:
        raise LoraError(f"{made_for}: a {want.model_type} model, not a {config.model_type}")
    if want != config:
        a, b = want.to_dict(), config.to_dict()
        diffs = ", ".join(f"{k} {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k])
        raise LoraError(f"{made_for}: its config differs from this base's in {diffs} (adapter's base vs this one)")
    if info.get("base_fingerprint") and fingerprint and info["base_fingerprint"] != fingerprint:
        warnings.warn(f"{made_for} with the same config but other weights; the adapter may not fit them",
                      stacklevel=3)


def load_adapter_weights(peft_model, folder: Path) -> None:
    """The adapter's weights into `peft_model`, strictly: every LoRA weight it expects, of its shape, nothing else
    (peft's own loader only warns about missing keys)."""
    peft = _peft()
    path = folder / ADAPTER_WEIGHTS_NAME
    try:
        state = load_file(path)
    except (SafetensorError, OSError) as e:
        raise LoraError(f"{path} is not a readable safetensors file: {e}") from None
    problems = state_problems(peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False), state)
    if problems:
        raise LoraError(f"{path} does not fit this base with its LoRA config: " + " | ".join(problems))
    peft.set_peft_model_state_dict(peft_model, state)


def attach(base: ByteLM, adapter: str | Path):
    """`base` with the adapter in `adapter` on it, checked against the base it was made for: a PeftModel."""
    peft = _peft()
    folder, _, info = read_adapter(adapter)
    check_base(folder, info, base.config, weights_fingerprint(base))
    config = peft.LoraConfig.from_pretrained(str(folder))
    base.name_or_path = config.base_model_name_or_path  # else peft warns that the recorded name changed
    try:
        peft_model = peft.get_peft_model(base, config)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise LoraError(f"adapter {folder} does not fit a {base.model_type} model: {str(e).splitlines()[0]}") from None
    load_adapter_weights(peft_model, folder)
    return peft_model


def load_adapter(adapter: str | Path, base: str | Path | None = None, device: str | torch.device | None = None,
                 merge: bool = False) -> ByteLM:
    """A base model with a LoRA adapter on it, in eval mode: peft's LoRA layers inside the model, or with
    `merge=True` folded into plain Linear layers (the same function, and a model `save_pretrained` can write).

    adapter: an adapter folder, a fine-tune run folder (its latest checkpoint) or a hub id. base: a model folder, run
    folder or hub id; default: the base the adapter records."""
    folder, config, info = read_adapter(adapter)
    ref = base if base is not None else recorded_base(config, info)
    if not ref:
        raise LoraError(f"adapter {folder} does not record its base model: name one (--base, or MODEL)")
    try:
        model = load_model(ref)
    except CheckpointError as e:
        if base is not None:
            raise
        raise LoraError(f"the base recorded in adapter {folder} cannot be loaded ({e}); name the base "
                        "explicitly (--base, or MODEL)") from None
    peft_model = attach(model, folder)
    model = peft_model.merge_and_unload() if merge else peft_model.get_base_model()
    if device is not None:
        model.to(device)
    return model.eval()


def merge(adapter: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """Fold an adapter into its base and write a plain model folder (config.json + model.safetensors + card)."""
    folder, config, info = read_adapter(adapter)
    model = load_adapter(folder, base=base, merge=True)
    ref = str(base) if base is not None else recorded_base(config, info)
    card = {k: info[k] for k in ("val_bpb", "data", "step") if info.get(k) is not None}
    return model.save_pretrained(out, name=Path(out).resolve().name, base_model=ref, **card)


# --- fine-tuning: bytelm train with base + LoRA --------------------------------------------------------------------
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

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (bool(self.base), "base (the model to fine-tune) is required"),
            (not (self.model_type or self.preset or self.model),
             "model_type, preset and model do not apply: the model is the base's"),
            (self.lora_target in TARGETS, f"lora_target must be one of {', '.join(TARGETS)}"),
            (self.lora_rank >= 1, "lora_rank must be >= 1"),
            (0.0 <= self.lora_dropout < 1.0, "lora_dropout must be in [0, 1)"),
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

    def load_weights(self, ckpt: Path) -> None:
        folder, _, info = read_adapter(ckpt)
        check_base(folder, info, self.model_config, self.base_fingerprint)
        load_adapter_weights(self.peft_model, folder)
        self.base_val = _logged_val(self.out / "metrics.csv", step=0)

    def before_training(self) -> None:
        if self.step == 0:  # the base alone (its adapters are zero): what the fine-tune is measured against
            self.base_val = self.estimate_val()
            self.log_val(self.base_val, note=" (the base)")

    def run(self, until_step: int | None = None) -> dict[str, Any]:
        result = super().run(until_step)
        return {**result, "base_val_bpb": None if self.base_val is None else self.base_val / LN2,
                "trainable_params": self.trainable_params, "params": self.model.num_params()}


def _logged_val(path: Path, step: int) -> float | None:
    """The validation loss metrics.csv logged at `step` (a resumed fine-tune's base score)."""
    if path.exists():
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r["split"] == "val" and int(r["step"]) == step:
                    return float(r["loss"])
    return None


def finetune(cfg: FinetuneConfig, resume: bool = False, log=log_line) -> dict[str, Any]:
    """Run (or resume) a LoRA fine-tune end to end: `bytelm.train.train` with FinetuneTrainer."""
    return train(cfg, resume=resume, log=log, trainer_class=FinetuneTrainer)


__all__ = ["FinetuneConfig", "FinetuneTrainer", "LoraError", "apply_lora", "attach", "finetune", "load_adapter",
           "merge", "read_adapter", "save_adapter", "target_modules"]
