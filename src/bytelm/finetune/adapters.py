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

    adapter_config.json        peft's LoraConfig; base_model_name_or_path names the base (a folder or a hub id);
                               auto_mapping names bytelm.ByteLM, so peft's AutoPeftModel.from_pretrained(folder,
                               import_allowlist=["bytelm"]) loads base and adapter
    adapter_model.safetensors  the LoRA weights only
    bytelm_adapter.json        the base's model config and a fingerprint of its weights: a base of another config is
                               refused, naming the fields that differ; one with other weights gets a warning
    README.md                  a model card

A fine-tune run folder keeps one in each checkpoint (checkpoints/step-N/, with the optimizer and trainer state) and
a copy of the latest in adapter/: the folder to hand to peft, `bytelm push` or anything else that wants a plain
adapter folder (bytelm itself also takes the run folder).

Which Linear layers each target names is the model type's registry entry (bytelm.models.registry). The fine-tune
trainer is in bytelm.finetune.trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..devices import check_memory
from ..errors import AdapterError, CheckpointError, ConfigError
from ..hub import is_hub_id, resolve
from ..io import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_INFO_NAME,
    ADAPTER_WEIGHTS_NAME,
    CARD_NAME,
    atomic_write,
    finish_folder,
    fsync_dir,
    read_adapter_folder,
    read_weights,
    recorded_base,
    state_problems,
)
from ..models import ByteLM, config_from_dict, get_spec, load_model, write_card
from ..models.config import MAX_SIZE

TARGETS = ("global", "local", "all")
LoraError = AdapterError  # the name this module's errors had before bytelm.errors

def _peft():
    try:
        import peft
    except ImportError as e:
        raise AdapterError(f"LoRA needs peft, which cannot be imported ({e}): pip install 'bytelm[lora]'") from None
    return peft


# --- adapters on a model -------------------------------------------------------------------------------------------
def target_modules(model_config, target: str) -> str:
    """A regex over module names (peft matches it against each whole name): the Linear layers of `target`."""
    if target not in TARGETS:
        raise AdapterError(f"lora target must be one of {', '.join(TARGETS)}, got {target!r}")
    spec = get_spec(model_config.model_type)
    if target not in spec.lora_targets:
        raise AdapterError(spec.lora_target_help.get(target) or
                           f"a {spec.model_type} model has no LoRA target {target!r}")
    return spec.lora_targets[target]


def check_lora_memory(model: ByteLM, target_modules: str | list[str], rank: int) -> None:
    """Refuse (`MemoryLimitError`, with the estimate) adapters of `rank` on the Linear layers peft's `target_modules`
    names (a regex matching whole names, or a list of name suffixes) that the model's device cannot hold, before
    peft allocates them: rank x (in + out) values per layer."""
    if isinstance(target_modules, str):
        hit = lambda name: re.fullmatch(target_modules, name) is not None
    else:
        hit = lambda name: any(name == t or name.endswith(f".{t}") for t in target_modules or ())
    numel = sum(rank * (m.in_features + m.out_features) for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and hit(name))
    check_memory(numel * model.dtype.itemsize, model.device, f"LoRA adapters of rank {rank:,}",
                 [], "lower the rank (--lora-rank)")


def apply_lora(model: ByteLM, target: str = "all", rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               base: str | None = None, modules_to_save: list[str] | None = None):
    """Fresh LoRA adapters on the Linear layers of `target`, all else frozen: a peft PeftModel around `model`, which
    now holds the adapters itself (peft replaces its Linear layers in place). `base`: the base's folder or hub id,
    recorded in the adapter's config. `modules_to_save`: modules trained in full and saved with the adapter (peft's
    own mechanism; a swarm fine-tune's embedding, bytelm.swarm.finetune)."""
    peft = _peft()
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_SIZE:
        raise AdapterError(f"lora rank must be an integer in 1..2**31 - 1, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"lora dropout must be in [0, 1), got {dropout}")
    targets = target_modules(model.config, target)
    check_lora_memory(model, targets, rank)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             modules_to_save=modules_to_save)
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
    return str(base) if is_hub_id(base) else str(resolve(base).resolve())


def save_adapter(peft_model, folder: str | Path, base_config, base: str | None, fingerprint: str | None,
                 **card) -> Path:
    """Write an adapter folder (see the module docstring). Files are written beside it, then moved in one by one.
    `card`: what the model card says of the run (name, val_bpb, data, step)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lora = peft_model.peft_config["default"]
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    base_params = sum(p.numel() for p in peft_model.parameters()) - trainable
    info = {"base": base, "base_config": base_config.to_dict(), "base_fingerprint": fingerprint,
            "bytelm_version": __version__, **{k: card[k] for k in ("val_bpb", "data", "step") if k in card}}
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{folder.name}.") as tmp:
        # save_embedding_layers=False: "auto" would ask the Hub about the base to see whether embeddings changed
        peft_model.save_pretrained(tmp, save_embedding_layers=False)
        peft_loadable(Path(tmp, ADAPTER_CONFIG_NAME))
        Path(tmp, ADAPTER_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
        write_card(tmp, base_config, base_params, base_model=base, **card,
                   adapter={"target": lora.target_modules, "rank": lora.r, "trainable": trainable})
        finish_folder(tmp)
        for f in (ADAPTER_WEIGHTS_NAME, ADAPTER_INFO_NAME, "README.md", ADAPTER_CONFIG_NAME):  # the config last
            os.replace(Path(tmp, f), folder / f)
    fsync_dir(folder)
    return folder


# peft's AutoPeftModel.from_pretrained(folder, import_allowlist=[...]) rebuilds the base itself: it imports the
# adapter config's auto_mapping.parent_library (only a name in import_allowlist, or below one) and calls
# getattr(library, base_model_class).from_pretrained(base_model_name_or_path, revision=...) (peft/auto.py).
# peft records the base's defining module (bytelm.models.megabyte), a private path; bytelm.ByteLM.from_pretrained
# loads a folder, run folder or hub id of any model type. So: import_allowlist=["bytelm"].
AUTO_MAPPING = {"base_model_class": "ByteLM", "parent_library": "bytelm"}


def peft_loadable(config_path: Path) -> None:
    """Point a freshly saved adapter_config.json's auto_mapping at bytelm.ByteLM (see AUTO_MAPPING)."""
    config = json.loads(config_path.read_text())
    config["auto_mapping"] = AUTO_MAPPING
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def publish_adapter(checkpoint: Path, folder: Path) -> Path:
    """Copy a checkpoint's adapter files (not its optimizer or trainer state) into `folder`, each atomically and
    its config last: a reader sees the previous adapter or this one, file by file."""
    for name in (ADAPTER_WEIGHTS_NAME, ADAPTER_INFO_NAME, CARD_NAME, ADAPTER_CONFIG_NAME):
        src = checkpoint / name
        if src.is_file():
            atomic_write(folder / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
    return folder


def read_adapter(path: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """(folder, its adapter_config.json, its bytelm_adapter.json or {} for an adapter made without bytelm) of an
    adapter folder, a fine-tune run folder (its latest checkpoint) or a hub id."""
    return read_adapter_folder(resolve(path), AdapterError)


def check_base(folder: Path, info: dict[str, Any], config, fingerprint: str | None) -> None:
    """Refuse a base whose config differs from the one the adapter records; warn when only its weights differ."""
    if "base_config" not in info:
        return  # an adapter made elsewhere: the strict weight check is all we have
    try:
        want = config_from_dict(info["base_config"])
    except ConfigError as e:
        raise AdapterError(f"{folder / ADAPTER_INFO_NAME}: {e}") from None
    made_for = f"adapter {folder} was made for another base ({info.get('base')})"
    if want.model_type != config.model_type:
        raise AdapterError(f"{made_for}: a {want.model_type} model, not a {config.model_type}")
    if want != config:
        a, b = want.to_dict(), config.to_dict()
        diffs = ", ".join(f"{k} {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k])
        raise AdapterError(f"{made_for}: its config differs from this base's in {diffs} (adapter's base vs this one)")
    if info.get("base_fingerprint") and fingerprint and info["base_fingerprint"] != fingerprint:
        warnings.warn(f"{made_for} with the same config but other weights; the adapter may not fit them",
                      stacklevel=3)


def load_adapter_weights(peft_model, folder: Path) -> None:
    """The adapter's weights into `peft_model`, strictly: every LoRA weight it expects, of its shape, nothing else
    (peft's own loader only warns about missing keys)."""
    peft = _peft()
    path = folder / ADAPTER_WEIGHTS_NAME
    try:
        state = read_weights(path)
    except CheckpointError as e:
        raise AdapterError(str(e)) from None
    problems = state_problems(peft.get_peft_model_state_dict(peft_model, save_embedding_layers=False), state)
    if problems:
        raise AdapterError(f"{path} does not fit this base with its LoRA config: " + " | ".join(problems))
    peft.set_peft_model_state_dict(peft_model, state)


def attach(base: ByteLM, adapter: str | Path, check_weights: bool = True):
    """`base` with the adapter in `adapter` on it, checked against the base it was made for: a PeftModel.
    check_weights=False checks the config only (a swarm client holds only part of the weights)."""
    peft = _peft()
    folder, _, info = read_adapter(adapter)
    check_base(folder, info, base.config, weights_fingerprint(base) if check_weights else None)
    config = peft.LoraConfig.from_pretrained(str(folder))
    if isinstance(config.r, bool) or not isinstance(config.r, int) or not 1 <= config.r <= MAX_SIZE:
        raise AdapterError(f"{folder / ADAPTER_CONFIG_NAME}: r must be an integer in 1..2**31 - 1, got {config.r!r}")
    check_lora_memory(base, config.target_modules, config.r)
    base.name_or_path = config.base_model_name_or_path  # else peft warns that the recorded name changed
    try:
        peft_model = peft.get_peft_model(base, config)
    except ValueError as e:  # peft: "Target modules ... not found in the base model"
        raise AdapterError(f"adapter {folder} does not fit a {base.model_type} model: "
                           f"{str(e).splitlines()[0]}") from None
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
        raise AdapterError(f"adapter {folder} does not record its base model: name one (--base, or MODEL)")
    try:
        model = load_model(ref)
    except CheckpointError as e:
        if base is not None:
            raise
        raise AdapterError(f"the base recorded in adapter {folder} cannot be loaded ({e}); name the base "
                        "explicitly (--base, or MODEL)") from None
    peft_model = attach(model, folder)
    model = peft_model.merge_and_unload() if merge else peft_model.get_base_model()
    if device is not None:
        model.to(device)
    return model.eval()


def merge(adapter: str | Path, out: str | Path, base: str | Path | None = None, overwrite: bool = False) -> Path:
    """Fold an adapter into its base and write a plain model folder (config.json + model.safetensors + card). An
    `out` that exists and is not an empty folder (a model, run or adapter folder: its weights would be replaced, and
    a run folder would then load the merged model instead of its checkpoints) is refused unless `overwrite`."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise AdapterError(f"--out {out} is not empty (it is a file or holds a folder's files); name a new folder, "
                           "or pass --force to overwrite it")
    folder, config, info = read_adapter(adapter)
    model = load_adapter(folder, base=base, merge=True)
    ref = str(base) if base is not None else recorded_base(config, info)
    card = {k: info[k] for k in ("val_bpb", "data", "step") if info.get(k) is not None}
    return model.save_pretrained(out, name=Path(out).resolve().name, base_model=ref, **card)


__all__ = ["AUTO_MAPPING", "TARGETS", "LoraError", "apply_lora", "attach", "base_reference", "check_base",
           "check_lora_memory", "load_adapter", "load_adapter_weights", "merge", "publish_adapter", "read_adapter",
           "save_adapter", "target_modules", "weights_fingerprint"]
