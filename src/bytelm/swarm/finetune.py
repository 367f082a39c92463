"""Fine-tuning through a swarm: the trainable parameters live on the client, the servers' weights never change.

What trains (`swarm_lora`): LoRA on the local model (bytelm.finetune, target "local") and, in full, the embedding
that feeds the remote stack (MEGABYTE's global byte embedding, 256 x D_G), saved with the adapter by peft's own
`modules_to_save`. The embedding is a soft prompt at every patch rather than Petals' prefix of extra positions: it
adds no positions to any server's cache, needs nothing new in the protocol, and the adapter folder is a plain peft
LoRA adapter, loadable on the whole model (bytelm.load_adapter), mergeable and pushable like any other. Its gradient
comes back through the servers: each runs `backward` for its blocks and returns the gradient for its input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import AdapterError
from ..finetune import FinetuneConfig, FinetuneTrainer, LoraSection, apply_lora
from ..finetune.adapters import base_reference
from ..models import get_spec
from ..training import log_line, train


def swarm_lora(model, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, base: str | None = None,
               tune_embedding: bool = True):
    """A peft model around a swarm client's model (or the same model held whole, for the same fine-tune run
    locally): LoRA on its local model, and its remote stack's input embedding trained in full."""
    spec = get_spec(model.config.model_type)
    if "local" not in spec.lora_targets:
        raise AdapterError(f"a fine-tune through a swarm adapts the local model; a {spec.model_type} model has none")
    embedding = [spec.remote_stack[2]] if tune_embedding else None
    return apply_lora(model, "local", rank, alpha, dropout, base=base, modules_to_save=embedding)


@dataclass
class SwarmFinetuneConfig(FinetuneConfig):
    """`bytelm swarm finetune`: a LoRA fine-tune (bytelm.finetune) whose base's global model is served by a swarm.
    The adapters are the local model's LoRA and the global byte embedding (`swarm_lora`)."""

    initial_peers: list[str] = field(default_factory=list)  # multiaddrs of peers in the swarm
    swarm: str = ""  # the swarm's name in the DHT (default: derived from the base)
    verify_fraction: float = 0.0  # spot-check this fraction of the servers' forward and backward passes
    request_timeout: float = 60.0  # seconds before a server that does not answer is given up on
    # always local: the global blocks are on the servers and never change
    lora: LoraSection = field(default_factory=lambda: LoraSection(target="local"))
    tune_embedding: bool = True  # train the global byte embedding in full (the gradient comes back through the swarm)

    def _checks(self) -> list[tuple[bool, str]]:
        return [*super()._checks(),
                (bool(self.initial_peers), "name at least one peer of the swarm: --initial-peers"),
                (self.lora.target == "local", "through a swarm only the local model is adapted: --lora-target local"),
                (0.0 <= self.verify_fraction <= 1.0, "verify_fraction must be in [0, 1]")]


class SwarmFinetuneTrainer(FinetuneTrainer):
    cfg: SwarmFinetuneConfig

    def build_model(self):
        from .client import remote_model

        cfg = self.cfg
        base = remote_model(cfg.base, cfg.initial_peers, cfg.swarm or None, verify_fraction=cfg.verify_fraction,
                            request_timeout=cfg.request_timeout)
        self.base_ref = base_reference(cfg.base)
        self.base_fingerprint = None  # the client holds only part of the weights: the config is checked, not these
        self.base_val = None
        lora = cfg.lora
        self.peft_model = swarm_lora(base, lora.rank, lora.alpha, lora.dropout, base=self.base_ref,
                                     tune_embedding=cfg.tune_embedding)
        return self.peft_model.get_base_model()


def swarm_finetune(cfg: SwarmFinetuneConfig, resume: bool = False, log=log_line):
    """Run (or resume) a fine-tune through the swarm end to end (bytelm.training.train with SwarmFinetuneTrainer)."""
    return train(cfg, resume=resume, log=log, trainer_class=SwarmFinetuneTrainer)
