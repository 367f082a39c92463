"""Fine-tuning through a swarm: the trainable parameters live on the client, the servers' weights never change.

What trains (`swarm_lora`): LoRA on the local model (bytelm.finetune, target "local") and, in full, the embedding
that feeds the remote stack (MEGABYTE's global byte embedding, 256 x D_G), saved with the adapter by peft's own
`modules_to_save`. The embedding is a soft prompt at every patch rather than Petals' prefix of extra positions: it
adds no positions to any server's cache, needs nothing new in the protocol, and the adapter folder is a plain peft
LoRA adapter, loadable on the whole model (bytelm.load_adapter), mergeable and pushable like any other. Its gradient
comes back through the servers: each runs `backward` for its blocks and returns the gradient for its input.
"""

from __future__ import annotations

from ..errors import AdapterError
from ..finetune import apply_lora
from ..models import get_spec


def swarm_lora(model, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, base: str | None = None,
               tune_embedding: bool = True):
    """A peft model around a swarm client's model (or the same model held whole, for the same fine-tune run
    locally): LoRA on its local model, and its remote stack's input embedding trained in full."""
    spec = get_spec(model.config.model_type)
    if "local" not in spec.lora_targets:
        raise AdapterError(f"a fine-tune through a swarm adapts the local model; a {spec.model_type} model has none")
    embedding = [spec.remote_stack[2]] if tune_embedding else None
    return apply_lora(model, "local", rank, alpha, dropout, base=base, modules_to_save=embedding)
