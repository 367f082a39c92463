"""The two halves of a model in a swarm, each read from the same model folder without loading the other:

    server   blocks start..end-1 of the model's remote stack (MEGABYTE: the global model; the byte transformer: its
             whole stack), without the stack's final norm: `load_span`, reading only those tensors of
             model.safetensors
    client   everything else (embeddings, the local model, the stack's final norm, the head) around a stand-in for
             the remote stack: `load_client_parts`

Both build the model on the meta device (no memory, no init), keep what they need and load it with `assign=True`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..hub import resolve
from ..io import WEIGHTS_NAME, state_problems
from ..models import get_spec, read_config
from ..nn import TransformerStack


def remote_stack(config) -> tuple[str, int]:
    """(attribute name, depth) of the stack a swarm serves for this model's type."""
    spec = get_spec(config.model_type)
    if spec.remote_stack is None:
        raise ConfigError(f"a {config.model_type} model cannot be served by a swarm (no remote stack)")
    attr, field, _ = spec.remote_stack
    return attr, getattr(config, field)


def _read(folder: Path, keep) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors whose names `keep(name)` maps to a new name (None: skip), and only those."""
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}")
    out = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                new = keep(name)
                if new is not None:
                    out[new] = f.get_tensor(name)
    except (OSError, Exception) as e:  # safetensors raises its own SafetensorError
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    return out


def _materialize(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a meta-device module's persistent tensors from `state` (strictly) and recompute its rope tables."""
    problems = state_problems(module.state_dict(), state)
    if problems:
        raise CheckpointError(f"{source} does not match the model in its config: " + " | ".join(problems))
    module.load_state_dict(state, strict=True, assign=True)
    for m in module.modules():
        if isinstance(m, TransformerStack) and m.use_rope:
            m.reset_rope()
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: no values for {', '.join(left[:4])}")


def _skeleton(config) -> nn.Module:
    cls = get_spec(config.model_type).model_class
    with torch.device("meta"):
        return cls(config)


def load_span(model: str | Path, start: int, end: int) -> tuple[object, TransformerStack]:
    """(config, blocks start..end-1 of the model's remote stack as a TransformerStack without its final norm, frozen,
    in eval mode): what a swarm server holds."""
    folder = resolve(model)
    config = read_config(folder)
    attr, depth = remote_stack(config)
    if not 0 <= start < end <= depth:
        raise ConfigError(f"blocks {start}:{end} are not a span of this model's {depth} blocks (0 <= start < end <= "
                          f"{depth})")
    stack: TransformerStack = getattr(_skeleton(config), attr)
    stack.blocks = nn.ModuleList(stack.blocks[start:end])
    stack.norm = nn.Identity()  # the client applies the final norm

    def keep(name: str):
        prefix = f"{attr}.blocks."
        if not name.startswith(prefix):
            return None
        i, rest = name[len(prefix):].split(".", 1)
        return f"blocks.{int(i) - start}.{rest}" if start <= int(i) < end else None

    _materialize(stack, _read(folder, keep), f"{folder / WEIGHTS_NAME} (blocks {start}:{end})")
    stack.requires_grad_(False)
    return config, stack.eval()


def client_weights(model: str | Path) -> tuple[object, dict[str, torch.Tensor]]:
    """(config, every weight outside the remote stack's blocks) of MODEL: what a client holds, read once."""
    folder = resolve(model)
    config = read_config(folder)
    prefix = f"{remote_stack(config)[0]}.blocks."
    return config, _read(folder, lambda n: None if n.startswith(prefix) else n)


def load_client_parts(config, weights: dict[str, torch.Tensor], make_stand_in, source: str = WEIGHTS_NAME
                      ) -> nn.Module:
    """The model of `config` with its remote stack's blocks replaced by `make_stand_in(config, stack)` (given the
    stack with no blocks: its final norm and rope), every other weight from `weights` (`client_weights`); eval mode."""
    attr, _ = remote_stack(config)
    m = _skeleton(config)
    stack: TransformerStack = getattr(m, attr)
    stack.blocks = nn.ModuleList()
    _materialize(m, weights, source)
    setattr(m, attr, make_stand_in(config, stack))
    return m.eval()


def swarm_name(model: str | Path) -> str:
    """The DHT prefix of the swarm serving this model (see `swarm_name_of`)."""
    return swarm_name_of(*client_weights(model))


def swarm_name_of(config, weights: dict[str, torch.Tensor]) -> str:
    """A digest of the config and of the weights outside the remote stack (cheap to read on servers and clients
    alike), so that servers of different models never mix."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for name, t in sorted(weights.items()):
        flat = t.reshape(-1)
        h.update(name.encode() + flat[:: max(1, flat.numel() // 64)][:64].float().numpy().tobytes())
    return f"bytelm-{config.model_type}-{h.hexdigest()[:16]}"
