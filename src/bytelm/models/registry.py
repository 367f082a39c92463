"""One registry of model types: a third model type is one new `register(ModelSpec(...))` call in its own module
(plus its import in bytelm/models/__init__.py), not edits across the package.

A spec carries everything the rest of bytelm needs to know about a model type: its config class and model class,
where LoRA adapters go (a regex over module names per target), and what its model card calls it and tags it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    config_class: type  # a bytelm.models.config.ModelConfig subclass
    model_class: type  # a bytelm.models.base.ByteLM subclass
    lora_targets: dict[str, str]  # target name (global, local, all) -> regex over module names of its Linear layers
    description: str  # for model cards: "MEGABYTE (Yu et al. 2023, arXiv 2305.07185)"
    tags: list[str] = field(default_factory=list)  # Hub tags besides "bytelm"
    lora_target_help: dict[str, str] = field(default_factory=dict)  # why a target is missing, e.g. "local"
    # stack name -> prefixes of its parameters' names, for per-stack learning rates (bytelm.training.optim)
    stacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # the TransformerStack a swarm serves remotely (bytelm.swarm), the config field of its depth and the embedding
    # that feeds it (what a fine-tune through the swarm trains upstream of it): MEGABYTE's global model (crossed once
    # per patch), the byte transformer's whole stack (once per byte)
    remote_stack: tuple[str, str, str] | None = None


_SPECS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.model_type in _SPECS and _SPECS[spec.model_type] != spec:
        raise ValueError(f"model type {spec.model_type!r} is registered already")
    _SPECS[spec.model_type] = spec
    spec.model_class.spec = spec
    return spec


def model_types() -> list[str]:
    return list(_SPECS)


def get_spec(model_type: str) -> ModelSpec:
    if model_type not in _SPECS:
        raise ConfigError(f"unknown model type {model_type!r}; bytelm knows {', '.join(map(repr, _SPECS))}")
    return _SPECS[model_type]


def config_class(model_type: str) -> type:
    return get_spec(model_type).config_class


def config_from_dict(d: dict[str, Any], saved: bool = False):
    """Rebuild the right config class from a `config.json` dict (dispatch on `model_type`); `saved`: a config.json,
    which must name every field (see ModelConfig.from_dict)."""
    mt = d.get("model_type") if isinstance(d, dict) else None
    if not isinstance(mt, str) or mt not in _SPECS:
        raise ConfigError(f"config.json has model_type {mt!r}; bytelm knows {', '.join(map(repr, _SPECS))}")
    return _SPECS[mt].config_class.from_dict(d, saved=saved)


def build(config):
    """A freshly initialised model of the class a config's model type names."""
    return get_spec(config.model_type).model_class(config)
