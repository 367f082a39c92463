"""bytelm: tokenizer-free byte-level language models (MEGABYTE and a byte transformer baseline)."""

__version__ = "0.1.0"

from .checkpoint import CheckpointError, load_model
from .config import ConfigError, MegabyteConfig, TransformerConfig
from .generate import GenerationError
from .megabyte import Megabyte
from .model import ByteLM
from .transformer import ByteTransformer


def load(path, device=None, revision: str | None = None) -> ByteLM:
    """Load a model as whichever model class its config names, strictly: a model folder (config.json +
    model.safetensors), a training run folder (its latest checkpoint) or a hub id `org/name` (from the local hub
    cache, downloaded into it first unless HF_HUB_OFFLINE is set; `revision`: a branch, tag or commit)."""
    return load_model(path, device=device, revision=revision)


def load_adapter(adapter, base=None, device=None, merge: bool = False) -> ByteLM:
    """A base model with a LoRA adapter on it (`merge=True`: folded in); base defaults to the one the adapter
    records. Needs peft (`pip install 'bytelm[lora]'`); see bytelm.lora."""
    from .lora import load_adapter

    return load_adapter(adapter, base=base, device=device, merge=merge)


def build(config: MegabyteConfig | TransformerConfig) -> ByteLM:
    """The model class for a config: Megabyte for MegabyteConfig, ByteTransformer for TransformerConfig."""
    return Megabyte(config) if isinstance(config, MegabyteConfig) else ByteTransformer(config)


__all__ = [
    "ByteLM", "ByteTransformer", "CheckpointError", "ConfigError", "GenerationError", "Megabyte", "MegabyteConfig",
    "TransformerConfig", "build", "load", "load_adapter",
]
