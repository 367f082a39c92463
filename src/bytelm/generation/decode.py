"""Generation as thin clients of the one decoding loop (`bytelm.generation.engine`): `decode` iterates over the next
bytes of a batch of prompts, `stream` and `generate` wrap it. Every front end (the CLI, the server, the swarm client)
decodes through the engine, so sampling and scheduling behave the same everywhere.

These functions need only the decoding protocol below, not any model class, so they sit below bytelm.models.
Everything is checked when `decode` / `stream` / `generate` is *called*, before the first byte is produced: a
caller that streams (a CLI printing the prompt, a server sending `200 OK`) never starts on a request that must fail.
Inference runs under `torch.inference_mode()` and never touches `model.training`: two threads may share a model.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from typing import Any, Protocol

import torch

from ..errors import ContextLengthError, GenerationError
from ..nn import Step
from .sampling import MAX_SEED, check_sampling, check_seed, sample


class DecodeState(Protocol):
    global_steps: int  # runs of the model's big part so far (MEGABYTE: batched global steps): a serving metric


class Decodable(Protocol):
    """What generation needs of a model: exactly what the engine calls (bytelm.models.ByteLM implements it)."""

    config: Any  # .max_seq_len
    device: torch.device
    prefill_align: int  # a prompt's chunks after the first start at multiples of this (MEGABYTE: P)
    decode_period: int  # decode steps between runs of the model's big part (MEGABYTE: P; else 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...  # (B, T) -> logits (B, T, 256)
    def check_state_memory(self, batch: int, max_len: int, hint: str = "") -> None: ...
    def new_state(self, batch: int, max_len: int) -> DecodeState: ...
    # x (n, T) right padded, step: rows, byte positions, lengths -> (n, 256) after each row's last byte
    def prefill(self, x: torch.Tensor, state: DecodeState, step: Step) -> torch.Tensor: ...
    # byte (n,) at positions step.at -> (n, 256)
    def decode_step(self, byte: torch.Tensor, state: DecodeState, step: Step) -> torch.Tensor: ...


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
    if isinstance(max_new_bytes, bool) or not isinstance(max_new_bytes, numbers.Integral):
        raise GenerationError(f"max_new_bytes must be an integer, got {max_new_bytes!r}")
    if max_new_bytes < 0:
        raise GenerationError(f"max_new_bytes must be >= 0, got {max_new_bytes}")
    check_seed(seed)
    total, limit = prompt_len + max_new_bytes, model.config.max_seq_len
    if total > limit:
        raise ContextLengthError(f"prompt ({prompt_len} bytes) + max_new_bytes ({max_new_bytes}) = {total} exceeds "
                                 f"this model's max_seq_len of {limit}")


def decode(model: Decodable, x: torch.Tensor, max_new_bytes: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
           use_cache: bool = True) -> Iterator[torch.Tensor]:
    """An iterator over the next byte of every sequence (B,), max_new_bytes times, continuing the prompts x (B, L).
    Arguments are checked now; the iterator does the work.

    The rows decode together in an `Engine` of B slots sized to L + max_new_bytes; row i samples with seed
    `seed + i` (so row 0, and a single prompt, gives what the engine gives that request with `seed`).
    `use_cache=False` recomputes the full forward over the whole prefix for every byte instead (what
    megabyte-pytorch does): the reference the cached path is tested and measured against.
    """
    check_request(model, x.shape[1], max_new_bytes, temperature, top_k, top_p, seed)
    if seed is not None and seed + x.shape[0] - 1 > MAX_SEED:
        raise GenerationError(f"seed must leave room for one seed per row: at most {MAX_SEED - x.shape[0] + 1}")
    if not use_cache:
        return _recompute(model, x, max_new_bytes, temperature, top_k, top_p, seed)
    return _engine_decode(model, x, max_new_bytes, temperature, top_k, top_p, seed)


def _engine_decode(model, x, max_new_bytes, temperature, top_k, top_p, seed) -> Iterator[torch.Tensor]:
    from .engine import Engine, SamplingParams  # the engine builds on this module's checks

    if max_new_bytes == 0:
        return
    B, L = x.shape
    engine = Engine(model, max_streams=B, max_queue=0, prefill_budget=max(B * L, 1), max_len=L + max_new_bytes)
    got: list[bytearray] = [bytearray() for _ in range(B)]
    errors: list[BaseException] = []
    for i, row in enumerate(x.tolist()):
        params = SamplingParams(max_new_bytes, temperature, top_k, top_p, None if seed is None else seed + i)
        engine.submit(bytes(row), params,
                      lambda o, i=i: (got[i].extend(o.data), o.exception and errors.append(o.exception)))
    for i in range(max_new_bytes):
        while min(len(g) for g in got) <= i and not errors:
            engine.step()
        if errors:  # the model's own error, as a direct call would raise it
            raise errors[0]
        yield torch.tensor([g[i] for g in got], dtype=torch.long, device=x.device)


def _recompute(model, x, max_new_bytes, temperature, top_k, top_p, seed) -> Iterator[torch.Tensor]:
    generator = None if seed is None else torch.Generator(device=x.device).manual_seed(int(seed))
    B = x.shape[0]
    seq = x
    for _ in range(max_new_bytes):
        with torch.inference_mode():
            # logits at position L depend on x[:, :L] only, so a dummy byte there gives the next-byte prediction
            logits = model(torch.cat((seq, seq.new_zeros(B, 1)), dim=1))[:, -1]
            nxt = sample(logits, temperature, top_k, top_p, generator)  # (B,)
        yield nxt  # outside inference mode: the caller's code runs as it would anywhere
        seq = torch.cat((seq, nxt.view(B, 1)), dim=1)


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
