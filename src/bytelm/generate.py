"""Generation as small composable functions (after gpt-fast): sample one byte from logits, decode a stream of bytes
with the model's KV caches, and thin wrappers that collect it. Every front end (the CLI, the server, the swarm client)
uses `stream` or `decode`, so sampling behaves the same everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .model import ByteLM


class GenerationError(ValueError):
    """Bad generation arguments (prompt type, length, sampling settings)."""


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= 256:
        raise GenerationError(f"top_k must be in 1..256, got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next bytes (B,) from logits (B, 256). temperature 0 is greedy; top_k keeps the k likeliest bytes; top_p keeps
    the smallest set whose probability reaches p (nucleus sampling, Holtzman et al. 2019)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this byte already reaches p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _as_tensor(model: ByteLM, prompt: bytes | bytearray | torch.Tensor) -> torch.Tensor:
    if isinstance(prompt, (bytes, bytearray)):
        return torch.tensor(list(prompt), dtype=torch.long, device=model.device).view(1, -1)
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 1:
            prompt = prompt.view(1, -1)
        if prompt.dim() != 2 or prompt.shape[0] < 1:
            raise GenerationError(f"a tensor prompt must be (B, L) byte values, got shape {tuple(prompt.shape)}")
        if prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
            raise GenerationError(f"a tensor prompt must hold integer byte values, got dtype {prompt.dtype}")
        if prompt.numel() and (int(prompt.min()) < 0 or int(prompt.max()) > 255):
            raise GenerationError("a tensor prompt must hold byte values in 0..255")
        return prompt.to(device=model.device, dtype=torch.long)
    if isinstance(prompt, str):
        raise GenerationError("the prompt must be bytes, not str: encode it first, e.g. prompt.encode('utf-8')")
    raise GenerationError(f"the prompt must be bytes or a LongTensor (B, L), got {type(prompt).__name__}")


@torch.inference_mode()
def decode(model: ByteLM, x: torch.Tensor, max_new_bytes: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, seed: int | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield the next byte of every sequence (B,) max_new_bytes times, continuing the prompt x (B, L).

    With the cache (default) the prompt is prefilled once and each new byte costs one decode step: for MEGABYTE one
    local-model step, plus one global-model step at every patch boundary. `use_cache=False` recomputes the full
    forward over the whole prefix for every byte (what megabyte-pytorch does); it exists to test and measure against.
    """
    check_sampling(temperature, top_k, top_p)
    if max_new_bytes < 0:
        raise GenerationError(f"max_new_bytes must be >= 0, got {max_new_bytes}")
    B, L = x.shape
    total, limit = L + max_new_bytes, model.config.max_seq_len
    if total > limit:
        raise GenerationError(f"prompt ({L} bytes) + max_new_bytes ({max_new_bytes}) = {total} exceeds this "
                              f"model's max_seq_len of {limit}")
    if max_new_bytes == 0:
        return
    generator = None
    if seed is not None:
        generator = torch.Generator(device=x.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        if use_cache:
            state = model.new_state(B, total)
            logits = model.prefill(x, state)
        else:
            seq = x
            # logits at position L depend on x[:, :L] only, so a dummy byte there gives the next-byte prediction
            logits = model(torch.cat((seq, seq.new_zeros(B, 1)), dim=1))[:, -1]
        for i in range(max_new_bytes):
            nxt = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            yield nxt
            if i + 1 == max_new_bytes:
                break
            if use_cache:
                logits = model.decode_step(nxt, state)
            else:
                seq = torch.cat((seq, nxt.view(B, 1)), dim=1)
                logits = model(torch.cat((seq, seq.new_zeros(B, 1)), dim=1))[:, -1]
    finally:
        model.train(was_training)


def stream(model: ByteLM, prompt: bytes, max_new_bytes: int, **kw) -> Iterator[bytes]:
    """Yield each new byte, as a 1-byte `bytes`, as soon as it is sampled. Options as in `decode`."""
    x = _as_tensor(model, prompt)
    if x.shape[0] != 1:
        raise GenerationError("stream() takes one prompt; use generate() with a (B, L) tensor for a batch")
    for nxt in decode(model, x, max_new_bytes, **kw):
        yield bytes([int(nxt[0])])


def generate(model: ByteLM, prompt: bytes | torch.Tensor, max_new_bytes: int, **kw) -> bytes | torch.Tensor:
    """`bytes` prompt -> the generated bytes (without the prompt); tensor (B, L) -> tensor (B, L + max_new_bytes)."""
    x = _as_tensor(model, prompt)
    new = list(decode(model, x, max_new_bytes, **kw))
    out = torch.stack(new, dim=1) if new else x.new_zeros(x.shape[0], 0)  # (B, N)
    if isinstance(prompt, (bytes, bytearray)):
        return bytes(out[0].tolist())
    return torch.cat((x, out), dim=1)
