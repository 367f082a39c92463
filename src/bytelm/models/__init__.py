"""Models: typed configs with presets, the `ByteLM` interface, MEGABYTE, the byte transformer baseline, one registry
of model types, and loading/saving model folders. Importing this package registers every model type."""

from .base import ByteLM
from .config import VOCAB_SIZE, MegabyteConfig, ModelConfig, TransformerConfig
from .loss import byte_loss
from .megabyte import Megabyte, MegabyteState
from .persistence import load_model, read_config, save_model, write_card
from .registry import ModelSpec, build, config_class, config_from_dict, get_spec, model_types, register
from .transformer import ByteTransformer, TransformerState

__all__ = [
    "VOCAB_SIZE", "ByteLM", "ByteTransformer", "Megabyte", "MegabyteConfig", "MegabyteState", "ModelConfig",
    "ModelSpec", "TransformerConfig", "TransformerState", "build", "byte_loss", "config_class", "config_from_dict",
    "get_spec", "load_model", "model_types", "read_config", "register", "save_model", "write_card",
]
