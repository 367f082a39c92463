"""`bytelm train`, `bytelm finetune` and `bytelm swarm finetune` options: the run config's own fields as flags (its
sections the help's groups), over the settings of `--config FILE` or, with `--resume`, of the run being resumed
(flags given win).

The run config is parsed once and built once, by tyro, with the base settings as its defaults. Where those settings
are is read first, by a small scan of the few flags that say so (--config, --resume, --out-dir, and for --resume
without --out-dir what names the default run folder: --model-type/--preset, or a fine-tune's BASE).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Annotated, Any, TypeVar

import tyro

from ..errors import ConfigError, UsageError
from ..io import read_json_object
from ..training.config import RunConfig, TrainConfig
from .options import parse

R = TypeVar("R", bound=RunConfig)


def _prescan(argv: list[str], positional_base: bool) -> argparse.Namespace:
    """The few flags that decide where defaults come from, read before the full parse."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in ("--config", "--out-dir", "--model-type", "--preset"):
        p.add_argument(flag)
    p.add_argument("--resume", action="store_true")
    known, _ = p.parse_known_args(argv)
    # a fine-tune's BASE comes first
    known.base = argv[0] if positional_base and argv and not argv[0].startswith("-") else None
    return known


def _saved_kind(settings: dict[str, Any]) -> str:
    """What a run's saved settings (a run.json's "train") are of: a fine-tune's name its base."""
    return "finetune" if "base" in settings else "train"


def _base_settings(config_cls: type[RunConfig], argv: list[str]) -> tuple[dict[str, Any], bool]:
    """(the settings flags override: a resumed run's run.json, a --config file, or none; whether they are a run's
    record, read back as it trained)."""
    finetune = config_cls.kind() == "finetune"
    pre = _prescan(argv, positional_base=finetune)
    if pre.resume:
        if pre.out_dir is not None:
            out_dir = pre.out_dir
        elif finetune and pre.base is None:
            raise UsageError("--resume: name the fine-tune's --out-dir (or its BASE)")
        else:  # the default out_dir: named after the model type and preset, or the base
            named = {k: v for k, v in vars(pre).items() if k in config_cls.flat_names() and v is not None}
            out_dir = config_cls.defaults(named).default_out_dir()
        run_json = Path(out_dir) / "run.json"
        if not run_json.is_file():
            raise UsageError(f"--resume: {run_json} not found; is --out-dir the folder of an earlier run?")
        settings = read_json_object(run_json, UsageError).get("train", {})
        saved = _saved_kind(settings) if isinstance(settings, dict) else config_cls.kind()
        if saved == "finetune" and not finetune:
            raise UsageError(f"--resume: {out_dir} is a LoRA fine-tune run: resume it with `bytelm finetune "
                             f"{settings['base']} --out-dir {out_dir} --resume`")
        if saved == "train" and finetune:
            raise UsageError(f"--resume: {out_dir} is a training run, not a fine-tune: resume it with "
                             f"`bytelm train --out-dir {out_dir} --resume`")
        return settings, True
    if pre.config is not None:
        path = Path(pre.config)
        if not path.is_file():
            raise UsageError(f"--config: {path} not found")
        settings = read_json_object(path, UsageError)
        return settings.get("train", settings), False  # a run.json holds the settings under "train"
    return {}, False


def options_class(config_cls: type[RunConfig], description: str, resume: str) -> type:
    """A command's options: its run config (`run`: its fields the flags, unprefixed: --lr, not --optimizer.lr), and
    --config and --resume (`resume`: that flag's help)."""
    cls = dataclasses.make_dataclass(f"{config_cls.__name__}Options", [
        ("run", Annotated[config_cls, tyro.conf.OmitArgPrefixes, tyro.conf.arg(name="")]),
        ("config", Annotated[str | None, tyro.conf.arg(
            metavar="FILE", help="JSON file of settings (or a run's run.json); flags override it")], None),
        ("resume", Annotated[bool, tyro.conf.arg(help=resume)], False),
    ])
    cls.__doc__ = description
    return cls


def parse_run_config(config_cls: type[R], argv: list[str], prog: str, description: str, resume: str
                     ) -> tuple[R, bool]:
    """(the run config, whether to resume) from argv over the base settings, every value type-checked; the run
    config is built once, by the parse."""
    settings, saved_run = _base_settings(config_cls, argv)
    try:
        defaults = config_cls.defaults(settings, saved_run=saved_run)
    except ConfigError as e:
        raise ConfigError(f"settings to start from: {e}") from None
    options_cls = options_class(config_cls, description, resume)
    options = parse(options_cls, argv, prog, default=options_cls(run=defaults))
    run = options.run
    if isinstance(run, TrainConfig):  # --model overrides merge into the saved ones: flags name only those they change
        run.model.overrides = {**defaults.model.overrides, **run.model.overrides}
    return run, options.resume
