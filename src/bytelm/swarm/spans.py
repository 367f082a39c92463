"""The two halves of a model in a swarm, each read from the same model folder without loading the other:

    server   blocks start..end-1 of the model's remote stack (MEGABYTE: the global model; the byte transformer: its
             whole stack), without the stack's final norm: `load_span`, reading only those tensors of
             model.safetensors
    client   everything else (embeddings, the local model, the stack's final norm, the head) around a stand-in for
             the remote stack: `load_client_parts`

Both build the model on the meta device (no memory, no init), keep what they need and load it with `assign=True`.

Fingerprints: every block of the remote stack has a digest of all of its tensors' bytes (`block_digest`); servers
announce those of the blocks they loaded, clients compare them with the model's own (`fingerprints`, read from
model.safetensors one tensor at a time) and refuse a server of other weights. The default swarm name digests the
config, every weight outside the remote stack and every block's fingerprint, so any change to the weights (a merged
fine-tune of the global blocks too) gives another swarm.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
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
    config, stack, _ = load_span_fingerprinted(model, start, end)
    return config, stack


def load_span_fingerprinted(model: str | Path, start: int, end: int
                            ) -> tuple[object, TransformerStack, list[str]]:
    """`load_span`, and the fingerprints (`block_digest`) of the blocks it loaded, hashed from the tensors loaded."""
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

    state = _read(folder, keep)
    digests = []
    for i in range(start, end):
        h = block_hasher(config, i)
        for name in sorted(n for n in state if n.startswith(f"blocks.{i - start}.")):
            update_digest(h, name.split(".", 2)[2], state[name])
        digests.append(h.hexdigest()[:DIGEST_CHARS])
    _materialize(stack, state, f"{folder / WEIGHTS_NAME} (blocks {start}:{end})")
    stack.requires_grad_(False)
    return config, stack.eval(), digests


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


DIGEST_CHARS = 16  # hex characters of a block's fingerprint: 64 bits, against accidents (a liar can copy any value)


def config_digest(config) -> bytes:
    return hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode()).digest()


def block_hasher(config, index: int):
    """The hash of block `index` before its tensors: it covers the config too (the same tensors in a model of another
    config are another computation)."""
    return hashlib.sha256(b"bytelm-block/1 " + config_digest(config) + str(index).encode())


def update_digest(h, name: str, t: torch.Tensor) -> None:
    """Add one tensor to a digest: its name, dtype, shape and every byte of its values (little-endian, as stored)."""
    h.update(f"{name} {str(t.dtype).replace('torch.', '')} {list(t.shape)}\n".encode())
    h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data)


@dataclass(frozen=True)
class Fingerprints:
    """What a model's swarm is made of: the digest of its weights outside the remote stack and each block's."""

    config: object
    outside: str
    blocks: tuple[str, ...]

    @property
    def name(self) -> str:
        """The default swarm name (see `swarm_name`)."""
        h = hashlib.sha256(b"bytelm-swarm/2 " + config_digest(self.config) + self.outside.encode())
        h.update(" ".join(self.blocks).encode())
        return f"bytelm-{self.config.model_type}-{h.hexdigest()[:16]}"


_CACHE: dict[tuple, Fingerprints] = {}


def fingerprints(model: str | Path) -> Fingerprints:
    """The fingerprints of MODEL's weights, read from model.safetensors one tensor at a time (all of its bytes:
    about a second per GB) and remembered for the rest of the process while the file is unchanged."""
    folder = resolve(model)
    config = read_config(folder)
    attr, depth = remote_stack(config)
    path = folder / WEIGHTS_NAME
    try:
        st = os.stat(path)
    except OSError:
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, json.dumps(config.to_dict(), sort_keys=True))
    if key in _CACHE:
        return _CACHE[key]
    prefix = f"{attr}.blocks."
    outside = hashlib.sha256(b"bytelm-outside/1")
    blocks = [block_hasher(config, i) for i in range(depth)]
    try:
        with safe_open(str(path), framework="pt") as f:
            for name in sorted(f.keys()):  # within one block, sorted full names sort its tensors' names alike
                if name.startswith(prefix):
                    i, rest = name[len(prefix):].split(".", 1)
                    if not i.isdigit() or int(i) >= depth:
                        raise CheckpointError(f"{path}: {name} is not a tensor of this model's {depth} blocks")
                    update_digest(blocks[int(i)], rest, f.get_tensor(name))
                else:
                    update_digest(outside, name, f.get_tensor(name))
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    out = Fingerprints(config, outside.hexdigest(), tuple(h.hexdigest()[:DIGEST_CHARS] for h in blocks))
    _CACHE[key] = out
    return out


def swarm_name(model: str | Path) -> str:
    """The DHT prefix of the swarm serving this model: a digest of its config, of every weight outside the remote
    stack and of every block's fingerprint, so that servers of different weights never meet under the default name
    (and when forced under one name, clients still refuse servers whose fingerprints differ from the model's)."""
    return fingerprints(model).name
