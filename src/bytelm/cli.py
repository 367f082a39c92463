"""The `bytelm` command. `bytelm train`'s flags are generated from `TrainConfig`'s typed fields (and their comments
become the help), so the CLI and the Python API cannot drift apart.

    bytelm train    [--preset small] [--data PATH ...] [--time-budget 5m] [--out-dir runs/x] [--resume] ...
    bytelm finetune BASE [--data PATH ...] [--lora-target global|local|all] [--lora-rank R] [--resume] ...
    bytelm eval     MODEL [--adapter DIR] [--data PATH ...] [--mode chunked|sliding|strided] ...
    bytelm generate MODEL [--adapter DIR] [--prompt TEXT | --prompt-file F] [--max-bytes N] [--out FILE] ...
    bytelm merge    ADAPTER [--base BASE] --out DIR
    bytelm push     FOLDER ORG/NAME [--private] [--token T]
    bytelm presets

`bytelm finetune`'s flags come from `bytelm.lora.FinetuneConfig`, TrainConfig plus the base and the LoRA settings.
"""

from __future__ import annotations

import argparse
import codecs
import dataclasses
import inspect
import json
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

from .config import CONFIG_CLASSES, ConfigError


class CLIError(Exception):
    """A problem with what the user asked for; printed as one line, without a traceback."""


# --- flags from a dataclass ----------------------------------------------------------------------------------------
def _field_comments(cls) -> dict[str, str]:
    """`name: type = default  # comment` lines of a dataclass's source (and its bases') -> {name: comment}."""
    comments: dict[str, str] = {}
    for c in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):  # a subclass's comment wins
        comments.update(re.findall(r"^\s+(\w+): [^=\n]+=.*?#\s*(.+)$", inspect.getsource(c), flags=re.M))
    return comments


def parse_duration(s: str) -> float:
    """'90', '90s', '5m', '1.5h' -> seconds."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", s)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {s!r} (use e.g. 300, 300s, 5m, 1.5h)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def parse_assignment(s: str) -> tuple[str, Any]:
    """'key=value' with value read as JSON when it parses (numbers, true/false, null), else as a string."""
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    try:
        return k.strip(), json.loads(v)
    except json.JSONDecodeError:
        return k.strip(), v


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, special: dict[str, dict] | None = None,
                        skip: tuple[str, ...] = ()) -> None:
    """One --flag per field (but those in `skip`); defaults are SUPPRESSed so we can tell which flags were given."""
    hints = typing.get_type_hints(cls)
    comments = _field_comments(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kw: dict[str, Any] = dict(default=argparse.SUPPRESS)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kw["help"] = f"{comments.get(f.name, '')} (default: {default!r})".strip()
        t = hints[f.name]
        args = typing.get_args(t)
        if typing.get_origin(t) in (typing.Union, types.UnionType):  # X | None
            t = next(a for a in args if a is not type(None))
        if (special or {}).get(f.name):
            kw.update(special[f.name])
        elif t is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(t) is list:
            kw.update(nargs="+", type=typing.get_args(t)[0])
        elif typing.get_origin(t) is dict:
            kw.update(nargs="+", type=parse_assignment, metavar="KEY=VALUE")
        else:
            kw["type"] = t
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, **kw)


# --- train ---------------------------------------------------------------------------------------------------------
def _train_parser(sub) -> None:
    from .train import TrainConfig

    p = sub.add_parser("train", help="train a model (MEGABYTE by default) on files, folders or the embedded corpus",
                       description="Train a byte-level model. Without --data it trains on the Python standard "
                       "library's own source (~30 MB of code on this machine, no download).")
    p.add_argument("--config", type=Path, help="JSON file of train settings (or a run's run.json); flags override it")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir from its latest checkpoint")
    add_dataclass_flags(p, TrainConfig, special={
        "time_budget": dict(type=parse_duration, metavar="DURATION"),
        "model": dict(nargs="+", type=parse_assignment, metavar="FIELD=VALUE",
                      help="override model config fields, e.g. --model patch_size=4 global_layers=6"),
        "model_type": dict(choices=list(CONFIG_CLASSES)),
    })
    p.set_defaults(func=cmd_train)


def train_config_from_args(args: argparse.Namespace, cls=None):
    """A TrainConfig (or `cls`, e.g. FinetuneConfig) from the flags given, over --config or a resumed run.json."""
    from .train import TrainConfig

    cls = cls or TrainConfig
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}
    if "model" in given:
        given["model"] = dict(given["model"])
    base: dict[str, Any] = {}
    if args.resume:
        # the default out_dir depends on model type and preset (on the base for a fine-tune)
        named = {k: v for k, v in given.items() if k in ("model_type", "preset", "base")}
        out_dir = given.get("out_dir") or cls(**named).out_dir
        run_json = Path(out_dir) / "run.json"
        if not run_json.is_file():
            raise CLIError(f"--resume: {run_json} not found; is --out-dir the folder of an earlier run?")
        base = json.loads(run_json.read_text())["train"]
        if "base" in base and "base" not in {f.name for f in dataclasses.fields(cls)}:
            raise CLIError(f"--resume: {out_dir} is a LoRA fine-tune run: resume it with `bytelm finetune "
                           f"{base['base']} --out-dir {out_dir} --resume`")
    elif args.config is not None:
        if not args.config.is_file():
            raise CLIError(f"--config: {args.config} not found")
        try:
            base = json.loads(args.config.read_text())
        except json.JSONDecodeError as e:
            raise CLIError(f"--config: {args.config} is not valid JSON: {e}") from None
        base = base.get("train", base)  # a run.json holds the settings under "train"
    if "model" in given and "model" in base:
        given["model"] = {**base["model"], **given["model"]}
    return cls.from_dict({**base, **given})


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    cfg = train_config_from_args(args)
    result = train(cfg, resume=args.resume)
    if result.get("val_bpb") is not None:
        print(f"done: step {result['step']}, validation bpb {result['val_bpb']:.3f} (estimate over "
              f"{cfg.eval_batches} batches; `bytelm eval {cfg.out_dir}` scores the whole split), "
              f"{result['elapsed'] / 60:.1f} min. Model: {cfg.out_dir}")
    return 0


# --- finetune ------------------------------------------------------------------------------------------------------
def _finetune_parser(sub) -> None:
    from .lora import FinetuneConfig

    p = sub.add_parser("finetune", help="fine-tune a trained model with LoRA adapters (needs bytelm[lora])",
                       description="LoRA fine-tuning (peft): the base model stays frozen; small low-rank adapters on "
                       "the Linear layers of its global model, local model or both are trained and saved (adapter_"
                       "config.json + adapter_model.safetensors, naming the base). Data, schedule, checkpoints and "
                       "--resume work as in `bytelm train`. Without --data it fine-tunes on the embedded corpus.")
    p.add_argument("base", nargs="?", help="the model to fine-tune: a model folder, a training run folder or a hub "
                   "id (org/name)")
    p.add_argument("--config", type=Path, help="JSON file of settings (or a run's run.json); flags override it")
    p.add_argument("--resume", action="store_true", help="continue the fine-tune in --out-dir from its latest "
                   "checkpoint")
    add_dataclass_flags(p, FinetuneConfig, skip=("model_type", "preset", "model", "base"), special={
        "time_budget": dict(type=parse_duration, metavar="DURATION"),
        "lora_target": dict(choices=["global", "local", "all"]),
    })
    p.set_defaults(func=cmd_finetune)


def cmd_finetune(args: argparse.Namespace) -> int:
    from .lora import FinetuneConfig, finetune

    if args.base is None and not (args.resume or args.config):
        raise CLIError("name the model to fine-tune (BASE: a model folder, run folder or hub id)")
    cfg = train_config_from_args(args, FinetuneConfig)
    result = finetune(cfg, resume=args.resume)
    if result.get("val_bpb") is not None:
        base = result.get("base_val_bpb")
        print(f"done: step {result['step']}, validation bpb {result['val_bpb']:.3f}"
              f"{f' (the base: {base:.3f})' if base is not None else ''}, {result['trainable_params']:,} trainable "
              f"of {result['params']:,} params, {result['elapsed'] / 60:.1f} min. Adapter: {cfg.out_dir} "
              f"(`bytelm generate --adapter {cfg.out_dir}`, `bytelm merge {cfg.out_dir} --out DIR`)")
    return 0


# --- eval ----------------------------------------------------------------------------------------------------------
MODEL_HELP = ("a model folder, a training run folder or a hub id (org/name); with --adapter: its base (default: the "
              "base the adapter records)")
ADAPTER_HELP = "a LoRA adapter folder or fine-tune run folder (or hub id) to use on top of MODEL"


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="bits per byte of a model on files, folders or the embedded corpus",
                       description="Bits per byte = summed nats over every byte / (ln 2 * bytes); byte 0 counts.")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--adapter", help=ADAPTER_HELP)
    p.add_argument("--data", nargs="+", help="files or folders (default: the validation split the run (with "
                   "--adapter: the fine-tune) trained with, or the embedded corpus's validation split)")
    p.add_argument("--split", choices=["val", "train", "all"], default="val",
                   help="which part of the split --data makes to score (default: val)")
    p.add_argument("--mode", choices=["chunked", "sliding", "strided"], default="chunked",
                   help="chunked: consecutive windows; sliding: overlapping windows scoring their last --stride "
                   "bytes; strided: the paper's strided inference (MEGABYTE)")
    p.add_argument("--seq-len", type=int, help="window length (default: the model's max_seq_len)")
    p.add_argument("--stride", type=int, help="for sliding/strided: bytes scored per window (default: seq_len/2)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-bytes", type=int, help="score only the first N bytes")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_eval)


def _run_data_settings(model_path: Path) -> dict[str, Any]:
    """The data settings of the run a model came from, when it came from one (so eval uses the same split)."""
    for candidate in (model_path / "run.json", model_path.parent.parent / "run.json"):
        if candidate.is_file():
            return json.loads(candidate.read_text()).get("train", {})
    return {}


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import ByteDataset, load_split
    from .evaluate import evaluate

    model = _load(args.model, args.device, args.adapter)
    run = _run_data_settings(Path(args.adapter or args.model))
    data = args.data or run.get("data") or None
    train, val, info = load_split(data, run.get("val_fraction", 0.05), run.get("separator"))
    if args.split == "all":
        dataset = ByteDataset(train.parts + val.parts, separator=train.separator, name="all")
    else:
        dataset = val if args.split == "val" else train
    res = evaluate(model, dataset, seq_len=args.seq_len, mode=args.mode, stride=args.stride,
                   batch_size=args.batch_size, max_bytes=args.max_bytes, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps({**dataclasses.asdict(res), "split": args.split, "data": info}))
    else:
        print(f"{args.split} split of: {info}")
        print(f"bits per byte: {res.bpb:.4f} over {res.bytes:,} bytes ({res.mode}, seq_len {res.seq_len}, "
              f"stride {res.stride}, {res.seconds:.1f}s)")
    return 0


# --- generate ------------------------------------------------------------------------------------------------------
def _generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate bytes from a model, streamed to stdout",
                       description="Streams UTF-8 to stdout as it generates (a multi-byte character is held until "
                       "complete); --out writes the raw bytes.")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--adapter", help=ADAPTER_HELP)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default="", help="prompt text (UTF-8)")
    src.add_argument("--prompt-file", type=Path, help="prompt bytes from a file (any bytes)")
    p.add_argument("--max-bytes", type=int, default=256, help="bytes to generate (default: 256)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, help="sample among the k likeliest bytes")
    p.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, help="for reproducible samples")
    p.add_argument("--out", type=Path, help="write the raw generated bytes (without the prompt) to this file")
    p.add_argument("--no-echo", action="store_true", help="do not print the prompt before the generated text")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_generate)


def _load(path: str | None, device: str, adapter: str | None = None):
    from . import load, load_adapter
    from .train import resolve_device

    if adapter is not None:
        return load_adapter(adapter, base=path, device=resolve_device(device))
    if path is None:
        raise CLIError("name a MODEL (a model folder, a training run folder or a hub id), or an --adapter")
    return load(path, device=resolve_device(device))


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import stream

    model = _load(args.model, args.device, args.adapter)
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise CLIError(f"--prompt-file: {args.prompt_file} not found")
        prompt = args.prompt_file.read_bytes()
    else:
        prompt = args.prompt.encode("utf-8")
    out = open(args.out, "wb") if args.out else None  # noqa: SIM115 (closed below)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    write = sys.stdout.write
    try:
        if not args.no_echo and args.out is None:
            write(decoder.decode(prompt))
        for b in stream(model, prompt, args.max_bytes, temperature=args.temperature, top_k=args.top_k,
                        top_p=args.top_p, seed=args.seed):
            if out:
                out.write(b)
            else:
                write(decoder.decode(b))  # holds an incomplete multi-byte character until it completes
                sys.stdout.flush()
        if not out:
            write(decoder.decode(b"", final=True) + "\n")
    finally:
        if out:
            out.close()
            print(f"wrote {args.max_bytes} bytes to {args.out}", file=sys.stderr)
    return 0


# --- merge and push ------------------------------------------------------------------------------------------------
def _merge_parser(sub) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base and write a plain model folder",
                       description="Adds each adapter's (alpha / r) B A to the base's weights (peft's "
                       "merge_and_unload) and writes config.json + model.safetensors + README.md: a model that "
                       "loads without peft and runs as fast as the base.")
    p.add_argument("adapter", help="an adapter folder, a fine-tune run folder (its latest checkpoint) or a hub id")
    p.add_argument("--base", help="the base model (default: the one the adapter records)")
    p.add_argument("--out", type=Path, required=True, help="the model folder to write")
    p.set_defaults(func=cmd_merge)


def cmd_merge(args: argparse.Namespace) -> int:
    from .lora import merge

    out = merge(args.adapter, args.out, base=args.base)
    print(f"merged {args.adapter} into its base: {out} (`bytelm generate {out}`)")
    return 0


def _push_parser(sub) -> None:
    p = sub.add_parser("push", help="upload a model or adapter folder to the Hugging Face Hub",
                       description="Uploads a model folder (config.json, model.safetensors, README.md) or a LoRA "
                       "adapter folder as the Hub model repository REPO_ID, creating it if needed. A run folder "
                       "uploads its latest checkpoint's model or adapter, never optimizer or trainer state.")
    p.add_argument("folder", help="a model folder, an adapter folder or a run folder")
    p.add_argument("repo_id", metavar="REPO_ID", help="ORG/NAME (or USER/NAME) on the Hub")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--token", help="a Hub token with write access (default: HF_TOKEN or the `hf auth login` one)")
    p.add_argument("--revision", help="the branch to push to (default: main)")
    p.add_argument("--message", help="the commit message")
    p.set_defaults(func=cmd_push)


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push

    url = push(args.folder, args.repo_id, private=args.private, token=args.token, revision=args.revision,
               message=args.message)
    print(f"pushed {args.folder} to {args.repo_id}: {url}")
    return 0


# --- presets -------------------------------------------------------------------------------------------------------
def cmd_presets(args: argparse.Namespace) -> int:
    import torch

    from . import build

    for mt, cls in CONFIG_CLASSES.items():
        print(f"{mt}:")
        for name in cls.presets:
            with torch.device("meta"):  # count parameters without allocating them
                n = build(cls.from_name(name)).num_params()
            print(f"  {name:<11} {n / 1e6:>8,.1f}M params  {json.dumps(cls.presets[name])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="bytelm", description="Tokenizer-free byte-level language models "
                                     "(MEGABYTE and a byte transformer baseline).")
    parser.add_argument("--version", action="version", version=f"bytelm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _train_parser(sub)
    _finetune_parser(sub)
    _eval_parser(sub)
    _generate_parser(sub)
    _merge_parser(sub)
    _push_parser(sub)
    sub.add_parser("presets", help="list the named model presets").set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .generate import GenerationError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ConfigError, CheckpointError, DataError, GenerationError) as e:
        print(f"bytelm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bytelm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
