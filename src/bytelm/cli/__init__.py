"""The `bytelm` command: a dispatcher that imports only the command it runs.

    bytelm train    [--preset small] [--data PATH ...] [--time-budget 5m] [--out-dir runs/x] [--resume] ...
    bytelm finetune BASE [--data PATH ...] [--lora-target global|local|all] [--lora-rank R] [--resume] ...
    bytelm eval     MODEL [--adapter DIR] [--data PATH ...] [--mode chunked|sliding|strided] ...
    bytelm generate MODEL [--adapter DIR] [--prompt TEXT | --prompt-file F] [--max-bytes N] [--out FILE] ...
    bytelm merge    ADAPTER [--base BASE] --out DIR
    bytelm consolidate RUN [--out DIR]
    bytelm push     FOLDER ORG/NAME [--private] [--token T]
    bytelm serve    MODEL [--adapter DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-streams N] ...
    bytelm swarm    serve MODEL [--blocks I:J | --num-blocks N] [--initial-peers ADDR ...] | generate MODEL ...
    bytelm presets

Each command is a module here with a typed dataclass of its options, parsed by tyro (`train` and `finetune` take
theirs straight from `TrainConfig` / `FinetuneConfig`). A `BytelmError` is printed as one line and exits 2; any other
exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import os
import re
import sys

from .._version import __version__
from ..errors import BytelmError

# name -> (module, one line of help); modules are imported only when their command runs
COMMANDS = {
    "train": ("bytelm.cli.train", "train a model (MEGABYTE by default) on files, folders or the embedded corpus"),
    "finetune": ("bytelm.cli.finetune", "fine-tune a trained model with LoRA adapters (needs bytelm[lora])"),
    "eval": ("bytelm.cli.eval", "bits per byte of a model on files, folders or the embedded corpus"),
    "generate": ("bytelm.cli.generate", "generate bytes from a model, streamed to stdout"),
    "merge": ("bytelm.cli.merge", "fold a LoRA adapter into its base and write a plain model folder"),
    "consolidate": ("bytelm.cli.consolidate", "write the whole model of a sharded (--parallel fsdp) checkpoint"),
    "push": ("bytelm.cli.push", "upload a model or adapter folder to the Hugging Face Hub"),
    "serve": ("bytelm.cli.serve", "serve a model over an OpenAI-compatible HTTP API (needs bytelm[serve])"),
    "swarm": ("bytelm.cli.swarm", "serve one model from many machines, or generate through such a swarm (needs "
                                  "bytelm[swarm])"),
    "presets": ("bytelm.cli.presets", "list the named model presets"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: bytelm [--version] [--help] COMMAND [options]", "",
             "Tokenizer-free byte-level language models (MEGABYTE and a byte transformer baseline).", "",
             "commands:", *(f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()), "",
             "`bytelm COMMAND --help` lists a command's options."]
    return "\n".join(lines)


def one_line(message: str) -> str:
    """A message as one line: control characters from what the user gave (a path, a field name) escaped."""
    return re.sub(r"[\x00-\x1f\x7f]", lambda m: repr(m.group())[1:-1], message)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"bytelm {__version__}")
        return 0
    name = argv[0]
    if name not in COMMANDS:
        print(f"bytelm: error: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
        return module.main(argv[1:])
    except BytelmError as e:
        print(f"bytelm {name}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bytelm {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`bytelm presets | head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail too
        return 141
