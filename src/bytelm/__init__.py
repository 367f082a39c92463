"""bytelm: tokenizer-free byte-level language models (MEGABYTE and a byte transformer baseline).

The package is layered; each layer imports only layers below it, and nothing imports this root module (CI checks
both with import-linter; see the README's "Architecture"):

    cli          the `bytelm` command, one module per subcommand
    api          load, load_adapter, push: functions composing the layers below
    finetune     LoRA adapters (peft) and the fine-tune trainer
    training     the training loop, run config, schedules, checkpoints, parallelism
    evaluation   bits per byte
    models       configs, the ByteLM interface, MEGABYTE, the byte transformer, the registry, loading and saving
    data         byte sources, the train/validation split, training windows
    generation   sampling and decoding over the model protocol
    hub          model cards, hub ids, uploads
    io           atomic writes and the files of model, adapter and run folders
    nn           attention, KV cache, rotary, blocks
    errors, typedconfig, devices, _version

Names are imported on first use (PEP 562), so `import bytelm` and `bytelm --version` are quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._version import __version__
from .errors import (
    AdapterError,
    BytelmError,
    CheckpointError,
    ConfigError,
    ContextLengthError,
    DataError,
    EvaluationError,
    GenerationError,
    GenerationFailed,
    HubError,
    MemoryLimitError,
    TrainingDiverged,
    UsageError,
)

_LAZY = {
    "ByteLM": "bytelm.models", "ByteTransformer": "bytelm.models", "Megabyte": "bytelm.models",
    "MegabyteConfig": "bytelm.models", "TransformerConfig": "bytelm.models", "build": "bytelm.models",
    "load": "bytelm.api", "load_adapter": "bytelm.api", "push": "bytelm.api",
    "generate": "bytelm.generation", "stream": "bytelm.generation", "evaluate": "bytelm.evaluation",
    "TrainConfig": "bytelm.training", "train": "bytelm.training",
}

if TYPE_CHECKING:
    from .api import load, load_adapter, push
    from .evaluation import evaluate
    from .generation import generate, stream
    from .models import ByteLM, ByteTransformer, Megabyte, MegabyteConfig, TransformerConfig, build
    from .training import TrainConfig, train


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once imported, a plain attribute
        return value
    raise AttributeError(f"module 'bytelm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "AdapterError", "ByteLM", "ByteTransformer", "BytelmError", "CheckpointError", "ConfigError", "ContextLengthError",
    "DataError", "EvaluationError", "GenerationError", "GenerationFailed", "HubError", "Megabyte", "MegabyteConfig",
    "MemoryLimitError", "TrainConfig", "TrainingDiverged", "TransformerConfig", "UsageError", "__version__", "build",
    "evaluate", "generate", "load", "load_adapter", "push", "stream", "train",
]
