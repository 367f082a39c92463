"""`bytelm train` and `bytelm finetune` options: the run config's own fields as flags, over the settings of
`--config FILE` or, with `--resume`, of the run being resumed (flags given win)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from ..errors import ConfigError, UsageError
from ..io import read_json_object
from .options import parse


def _prescan(argv: list[str]) -> argparse.Namespace:
    """The few flags that decide where defaults come from, read before the full parse."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--config", "--out-dir", "--model-type", "--preset"):
        p.add_argument(flag)
    p.add_argument("--resume", action="store_true")
    known, _ = p.parse_known_args(argv)
    known.base = argv[0] if argv and not argv[0].startswith("-") else None  # finetune's BASE comes first
    return known


def _base_settings(config_cls, argv: list[str]) -> dict[str, Any]:
    """The settings flags override: a resumed run's run.json, a --config file, or none."""
    pre = _prescan(argv)
    is_finetune = "base" in {f.name for f in dataclasses.fields(config_cls)}
    if pre.resume:
        if pre.out_dir is not None:
            out_dir = pre.out_dir
        elif is_finetune:  # the default out_dir is named after the base
            if pre.base is None:
                raise UsageError("--resume: name the fine-tune's --out-dir (or its BASE)")
            out_dir = config_cls(base=pre.base).out_dir
        else:  # the default out_dir is named after model type and preset
            named = {k: v for k, v in (("model_type", pre.model_type), ("preset", pre.preset)) if v is not None}
            out_dir = config_cls(**named).out_dir
        run_json = Path(out_dir) / "run.json"
        if not run_json.is_file():
            raise UsageError(f"--resume: {run_json} not found; is --out-dir the folder of an earlier run?")
        settings = read_json_object(run_json, UsageError).get("train", {})
        if "base" in settings and not is_finetune:
            raise UsageError(f"--resume: {out_dir} is a LoRA fine-tune run: resume it with `bytelm finetune "
                             f"{settings['base']} --out-dir {out_dir} --resume`")
        if "base" not in settings and is_finetune:
            raise UsageError(f"--resume: {out_dir} is a training run, not a fine-tune: resume it with "
                             f"`bytelm train --out-dir {out_dir} --resume`")
        # a run written before bytelm 0.4 has no `optimizer`: it trained with AdamW alone, and resumes so
        settings.setdefault("optimizer", "adamw")
        return settings
    if pre.config is not None:
        path = Path(pre.config)
        if not path.is_file():
            raise UsageError(f"--config: {path} not found")
        settings = read_json_object(path, UsageError)
        return settings.get("train", settings)  # a run.json holds the settings under "train"
    return {}


def parse_run_config(config_cls, args_cls, argv: list[str], prog: str):
    """(the run config, the parsed options: their .resume) from argv over the base settings, every value
    type-checked."""
    base = _base_settings(config_cls, argv)
    try:
        checked = config_cls.checked_fields(base)
    except ConfigError as e:
        raise ConfigError(f"settings to start from: {e}") from None
    cli_only = {f.name for f in dataclasses.fields(args_cls)} - {f.name for f in dataclasses.fields(config_cls)}
    # defaults are the base settings, so that only the flags given override them; building it checks them too
    default = args_cls(**checked) if checked else None
    args = parse(args_cls, argv, prog, default=default)
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)}
    if "model" in values:  # --model overrides merge into the saved ones
        values["model"] = {**checked.get("model", {}), **values["model"]}
    for name in cli_only:
        values.pop(name, None)
    return config_cls(**values), args
