"""bytelm: tokenizer-free byte-level language models (MEGABYTE and a byte transformer baseline)."""

__version__ = "0.1.0"

from .checkpoint import CheckpointError, load_model
from .config import ConfigError, MegabyteConfig, TransformerConfig
from .generate import GenerationError
from .megabyte import Megabyte
from .model import ByteLM
from .transformer import ByteTransformer


def load(path, device=None) -> ByteLM:
    """Load a model folder (config.json + model.safetensors) as whichever model class its config names."""
    return load_model(path, device=device)


def build(config: MegabyteConfig | TransformerConfig) -> ByteLM:
    """The model class for a config: Megabyte for MegabyteConfig, ByteTransformer for TransformerConfig."""
    return Megabyte(config) if isinstance(config, MegabyteConfig) else ByteTransformer(config)


__all__ = [
    "ByteLM", "ByteTransformer", "CheckpointError", "ConfigError", "GenerationError", "Megabyte", "MegabyteConfig",
    "TransformerConfig", "build", "load",
]
