"""The interface every bytelm model implements, and what it gets for free from it.

A model maps bytes (B, T) to logits (B, T, 256) where `logits[:, t]` predicts `x[:, t]` from `x[:, :t]`: every byte
is predicted, the first one from nothing. For generation a model also implements three small functions over an
explicit decoding state (its KV caches), in the style of gpt-fast, each call told which state rows it feeds and at
which byte positions by a `Step` (bytelm.nn.step: rows and positions as device tensors, the same on the host):

    state = model.new_state(batch, max_len)        # preallocated caches for `batch` rows
    step = Step.make(rows, at, span, device, lens)
    logits = model.prefill(x, state, step)         # (n, 256): x (n, T) right padded; the byte after each row's
    step = Step.make(rows, at, span, device)       #   last, from position `at` (0: a prompt; later: its next chunk)
    logits = model.decode_step(byte, state, step)  # (n, 256): feed byte (n,) at positions `at`, predict the next

`bytelm.generation.Engine` is the one loop that calls them (the Decodable protocol there lists exactly what it
uses); the CLI, the server and the swarm client are its clients. `generate` / `stream` / `save_pretrained` /
`from_pretrained` are thin methods over bytelm.generation and bytelm.models.persistence, which import nothing from
here: no cycle.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import generation
from ..nn import Step, TransformerStack
from . import memory, persistence
from .config import VOCAB_SIZE


class ByteLM(nn.Module):
    config_class: type = None  # set by subclasses
    spec = None  # the model type's registry entry (bytelm.models.registry.ModelSpec), set by register()
    # The chunked loss (long sequences; bytelm.training's activation checkpointing turns it on): with a number of bytes
    # here, `model(x, loss=...)` computes the loss chunk by chunk of about that many bytes, each chunk's activations
    # recomputed in the backward pass, never the whole logits at once. None: the logits whole, then their loss.
    loss_chunk_bytes: int | None = None
    # The stacks the chunked loss runs inside its chunks (MEGABYTE's local model): recomputed chunk by chunk already,
    # so activation checkpointing leaves their blocks alone instead of recomputing them a second time.
    chunked_stacks: tuple[str, ...] = ()

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config

    # --- to implement -------------------------------------------------------------------------------------------
    def new_state(self, batch: int, max_len: int) -> Any:
        """A decoding state of `batch` rows of up to `max_len` bytes; it has `global_steps`, a count of runs of the
        model's big part (see bytelm.generation.protocol.DecodeState)."""
        raise NotImplementedError

    def prefill(self, x: torch.Tensor, state: Any, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def decode_step(self, byte: torch.Tensor, state: Any, step: Step) -> torch.Tensor:
        raise NotImplementedError

    def compile_decode(self, **options) -> None:
        """Capture the decode step of every transformer stack of this model with torch.compile (see
        TransformerStack.compile_step); outputs stay those of the eager step. Prefills stay eager."""
        for m in self.modules():
            if isinstance(m, TransformerStack):
                m.compile_step(**options)

    @property
    def prefill_align(self) -> int:
        """A prompt prefilled in chunks resumes at multiples of this many bytes."""
        return 1

    @property
    def decode_period(self) -> int:
        """Decode steps between runs of the model's big part: the engine lines rows up on it."""
        return 1

    # --- shared ---------------------------------------------------------------------------------------------------
    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def state_nbytes(self, batch: int, max_len: int) -> int:
        """Bytes `new_state(batch, max_len)` allocates (its KV caches), measured without allocating them."""
        return memory.state_nbytes(self, batch, max_len)

    def check_state_memory(self, batch: int, max_len: int, hint: str = "") -> None:
        """Refuse (`MemoryLimitError`, with the estimate) a decoding state the device cannot hold; `new_state` calls
        this before it allocates. `hint`: what the caller can lower (bytelm serve: --max-streams)."""
        memory.check_state_memory(self, batch, max_len, hint)

    def check_input(self, x: torch.Tensor, min_len: int = 1) -> None:
        """Clear errors for what would otherwise fail deep inside torch (or silently, on CUDA)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a LongTensor of byte values (B, T), got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"expected a 2-D tensor of byte values (B, T), got shape {tuple(x.shape)}")
        if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
            raise TypeError(f"expected an integer tensor of byte values 0..255, got dtype {x.dtype}")
        T, max_len = x.shape[1], self.config.max_seq_len
        if not min_len <= T <= max_len:
            raise ValueError(f"sequence length {T} is outside 1..max_seq_len={max_len} of this model")
        # A range check on CUDA costs a host sync; there an out-of-range byte trips a device assert instead.
        if x.device.type == "cpu" and x.numel() and (int(x.min()) < 0 or int(x.max()) >= VOCAB_SIZE):
            raise ValueError(f"byte values must be in 0..255, got min {int(x.min())}, max {int(x.max())}")

    def loss(self, x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy in nats over every byte of x, byte 0 included. bits per byte = loss / ln 2. Every model's
        `forward(x, loss=reduction)` computes it (chunked where `loss_chunk_bytes` is set): through `forward`, so that
        a DDP or compiled wrapper of the model computes it too."""
        return self(x, loss=reduction)

    def recompute(self, fn, *args) -> torch.Tensor:
        """`fn(*args)`, keeping none of its activations: the backward pass runs it again (one chunk of the chunked
        loss). Without grad there is no backward pass to keep anything for. The memory estimate measures each chunk
        through this seam (bytelm.models.memory)."""
        if not torch.is_grad_enabled():
            return fn(*args)
        return checkpoint(fn, *args, use_reentrant=False)

    @staticmethod
    def bits_per_byte(loss_nats: float) -> float:
        return loss_nats / math.log(2)

    # generation: thin wrappers over bytelm.generation
    def generate(self, prompt: bytes | torch.Tensor, max_new_bytes: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 use_cache: bool = True, json_schema=None):
        """`bytes` prompt -> the new bytes; LongTensor (B, L) -> (B, L + max_new_bytes). temperature=0 is greedy.
        `json_schema` (a dict, or a `bytelm.generation.JsonSchema`; bytes prompts): the output is one JSON document
        valid under it, ending as soon as it is complete (max_new_bytes may cut it short)."""
        return generation.generate(self, prompt, max_new_bytes, temperature=temperature, top_k=top_k, top_p=top_p,
                                   seed=seed, use_cache=use_cache, json_schema=json_schema)

    def stream(self, prompt: bytes, max_new_bytes: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None, json_schema=None) -> Iterator[bytes]:
        """An iterator yielding each new byte (as a 1-byte `bytes`) as soon as it is sampled; arguments are checked
        now, before the first byte. `json_schema`: as in `generate`."""
        return generation.stream(self, prompt, max_new_bytes, temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=seed, json_schema=json_schema)

    # persistence
    def save_pretrained(self, path: str | Path, **card) -> Path:
        """Write `config.json` + `model.safetensors` + a `README.md` model card to the folder `path` (created if
        needed; atomic per file): a Hugging Face Hub model repository. `card`: name, val_bpb, data, license, ..."""
        return persistence.save_model(self, path, **card)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None, revision: str | None = None):
        """Load a model folder, a run folder or a hub id (`org/name`, via the local hub cache)."""
        return persistence.load_model(path, device=device, expect=cls, revision=revision)
