"""Generation as small composable functions (after gpt-fast): decode a stream of next-byte tensors with a model's
KV caches, and thin wrappers that stream or collect it. Every front end (the CLI, the server, the swarm client) uses
`stream` or `decode`, so sampling behaves the same everywhere.

These functions need only the decoding protocol below, not any model class, so they sit below bytelm.models.
Everything is checked when `decode` / `stream` / `generate` is *called*, before the first byte is produced: a
caller that streams (a CLI printing the prompt, a server sending `200 OK`) never starts on a request that must fail.
Inference runs under `torch.inference_mode()` and never touches `model.training`: two threads may share a model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import torch

from ..errors import GenerationError
from .sampling import check_length, check_sampling, check_seed, sample


class Decodable(Protocol):
    """What generation needs of a model (bytelm.models.ByteLM implements it)."""

    config: Any  # .max_seq_len
    device: torch.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...  # (B, T) -> logits (B, T, 256)
    def new_state(self, batch: int, max_len: int) -> Any: ...
    def prefill(self, x: torch.Tensor, state: Any) -> torch.Tensor: ...  # (B, L) -> (B, 256)
    def decode_step(self, byte: torch.Tensor, state: Any) -> torch.Tensor: ...  # (B,) -> (B, 256)


def as_tensor(model: Decodable, prompt: bytes | bytearray | torch.Tensor) -> torch.Tensor:
    """A prompt as a LongTensor (B, L) on the model's device, or a `GenerationError` saying what is wrong with it."""
    if isinstance(prompt, (bytes, bytearray)):
        return torch.tensor(list(prompt), dtype=torch.long, device=model.device).view(1, -1)
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 1:
            prompt = prompt.view(1, -1)
        if prompt.dim() != 2 or prompt.shape[0] < 1:
            raise GenerationError(f"a tensor prompt must be (B, L) byte values, got shape {tuple(prompt.shape)}")
        if prompt.dtype.is_floating_point or prompt.dtype.is_complex or prompt.dtype == torch.bool:
            raise GenerationError(f"a tensor prompt must hold integer byte values, got dtype {prompt.dtype}")
        if prompt.numel() and (int(prompt.min()) < 0 or int(prompt.max()) > 255):
            raise GenerationError("a tensor prompt must hold byte values in 0..255")
        return prompt.to(device=model.device, dtype=torch.long)
    if isinstance(prompt, str):
        raise GenerationError("the prompt must be bytes, not str: encode it first, e.g. prompt.encode('utf-8')")
    raise GenerationError(f"the prompt must be bytes or a LongTensor (B, L), got {type(prompt).__name__}")


def check_request(model: Decodable, prompt_len: int, max_new_bytes: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> None:
    """Everything about a generation request that can be wrong, checked before any work is done."""
    check_sampling(temperature, top_k, top_p)
    check_seed(seed)
    check_length(prompt_len, max_new_bytes, model.config.max_seq_len)


def decode(model: Decodable, x: torch.Tensor, max_new_bytes: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           use_cache: bool = True) -> Iterator[torch.Tensor]:
    """An iterator over the next byte of every sequence (B,), max_new_bytes times, continuing the prompt x (B, L).
    Arguments are checked now; the iterator does the work.

    With the cache (default) the prompt is prefilled once and each new byte costs one decode step: for MEGABYTE one
    local-model step, plus one global-model step at every patch boundary. `use_cache=False` recomputes the full
    forward over the whole prefix for every byte (what megabyte-pytorch does); it exists to test and measure against.
    """
    check_request(model, x.shape[1], max_new_bytes, temperature, top_k, top_p, seed)
    return _decode(model, x, max_new_bytes, temperature, top_k, top_p, seed, use_cache)


def _decode(model, x, max_new_bytes, temperature, top_k, top_p, seed, use_cache) -> Iterator[torch.Tensor]:
    if max_new_bytes == 0:
        return
    generator = None if seed is None else torch.Generator(device=x.device).manual_seed(int(seed))
    B, L = x.shape
    with torch.inference_mode():
        if use_cache:
            state = model.new_state(B, L + max_new_bytes)
            logits = model.prefill(x, state)
        else:
            seq = x
            # logits at position L depend on x[:, :L] only, so a dummy byte there gives the next-byte prediction
            logits = model(torch.cat((seq, seq.new_zeros(B, 1)), dim=1))[:, -1]
    for i in range(max_new_bytes):
        with torch.inference_mode():
            nxt = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        yield nxt  # outside inference mode: the caller's code runs as it would anywhere
        if i + 1 == max_new_bytes:
            break
        with torch.inference_mode():
            if use_cache:
                logits = model.decode_step(nxt, state)
            else:
                seq = torch.cat((seq, nxt.view(B, 1)), dim=1)
                logits = model(torch.cat((seq, seq.new_zeros(B, 1)), dim=1))[:, -1]


def stream(model: Decodable, prompt: bytes, max_new_bytes: int, **kw) -> Iterator[bytes]:
    """An iterator yielding each new byte, as a 1-byte `bytes`, as soon as it is sampled. Options as in `decode`;
    everything is checked now, before the first byte."""
    x = as_tensor(model, prompt)
    if x.shape[0] != 1:
        raise GenerationError("stream() takes one prompt; use generate() with a (B, L) tensor for a batch")
    return (bytes([int(nxt[0])]) for nxt in decode(model, x, max_new_bytes, **kw))


def generate(model: Decodable, prompt: bytes | torch.Tensor, max_new_bytes: int, **kw) -> bytes | torch.Tensor:
    """`bytes` prompt -> the generated bytes (without the prompt); tensor (B, L) -> tensor (B, L + max_new_bytes)."""
    x = as_tensor(model, prompt)
    new = list(decode(model, x, max_new_bytes, **kw))
    out = torch.stack(new, dim=1) if new else x.new_zeros(x.shape[0], 0)  # (B, N)
    if isinstance(prompt, (bytes, bytearray)):
        return bytes(out[0].tolist())
    return torch.cat((x, out), dim=1)
