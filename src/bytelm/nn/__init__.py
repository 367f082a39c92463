"""Neural-network building blocks: attention with a preallocated KV cache, rotary positions, pre-norm blocks,
transformer stacks and their initialisation. Knows nothing of bytes, models or files."""

from .attention import Attention, KVCache, dropout_active
from .blocks import MLP, Block, Dropout, TransformerStack
from .init import init_weights
from .rotary import apply_rope, rope_tables
from .step import Step

__all__ = ["MLP", "Attention", "Block", "Dropout", "KVCache", "Step", "TransformerStack", "apply_rope",
           "dropout_active", "init_weights", "rope_tables"]
