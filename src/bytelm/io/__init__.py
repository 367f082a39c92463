"""Files and folders: atomic, durable writes and the formats of model, adapter and run folders. Knows nothing of
model classes, LoRA or the Hub."""

from .atomic import atomic_write, atomic_write_bytes, atomic_write_text, finish_folder, fsync_dir, fsync_file
from .folders import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_FILES,
    ADAPTER_INFO_NAME,
    ADAPTER_WEIGHTS_NAME,
    CARD_NAME,
    CONFIG_NAME,
    FLOAT_DTYPES,
    MODEL_FILES,
    SHARDED_DIR,
    WEIGHTS_NAME,
    checkpoint_steps,
    header_problems,
    latest_checkpoint,
    load_state_strict,
    model_folder,
    read_adapter_folder,
    read_json_object,
    read_model_config,
    read_weights,
    read_weights_header,
    recorded_base,
    resolve_local,
    state_problems,
    write_model_config,
    write_model_files,
)

__all__ = [
    "ADAPTER_CONFIG_NAME", "ADAPTER_FILES", "ADAPTER_INFO_NAME", "ADAPTER_WEIGHTS_NAME", "CARD_NAME", "CONFIG_NAME",
    "FLOAT_DTYPES", "MODEL_FILES", "SHARDED_DIR", "WEIGHTS_NAME", "atomic_write", "atomic_write_bytes",
    "atomic_write_text", "checkpoint_steps", "fsync_dir", "fsync_file", "finish_folder", "header_problems",
    "latest_checkpoint",
    "load_state_strict", "model_folder", "read_adapter_folder", "read_json_object", "read_model_config",
    "read_weights", "read_weights_header", "recorded_base", "resolve_local", "state_problems", "write_model_config",
    "write_model_files",
]
