"""Generation as thin clients of the one decoding loop (`bytelm.generation.engine`): `decode` iterates over the next
bytes of a batch of prompts, `stream` and `generate` wrap it. Every front end (the CLI, the server, the swarm client)
decodes through the engine, so sampling and scheduling behave the same everywhere.

These functions need only the decoding protocol (bytelm.generation.protocol), not any model class, so they sit below
bytelm.models. Everything is checked when `decode` / `stream` / `generate` is *called*, before the first byte is
produced: a caller that streams (a CLI printing the prompt, a server sending `200 OK`) never starts on a request that
must fail. Inference runs under `torch.inference_mode()` and never touches `model.training`: two threads may share a
model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from ..errors import GenerationError
from .constrain import JsonSchema
from .engine import Engine
from .protocol import Decodable, as_tensor, check_request
from .sampling import MAX_SEED, SamplingMetadata, SamplingParams, check_logits, sample_batch


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
    B = x.shape[0]  # each row draws from its own generator, seeded seed + i, as in the engine
    gens = [None if seed is None else torch.Generator(device=x.device).manual_seed(seed + i) for i in range(B)]
    meta = SamplingMetadata.build([temperature] * B, [top_k] * B, [top_p] * B, gens, x.device)
    seq = x
    for _ in range(max_new_bytes):
        with torch.inference_mode():
            # logits at position L depend on x[:, :L] only, so a dummy byte there gives the next-byte prediction
            logits = model(torch.cat((seq, seq.new_zeros(B, 1)), dim=1))[:, -1]
            nxt, bad = sample_batch(logits, meta)  # (B,)
            if bad is not None:
                check_logits(logits)
        yield nxt  # outside inference mode: the caller's code runs as it would anywhere
        seq = torch.cat((seq, nxt.view(B, 1)), dim=1)


def stream(model: Decodable, prompt: bytes, max_new_bytes: int, json_schema=None, **kw) -> Iterator[bytes]:
    """An iterator yielding each new byte, as a 1-byte `bytes`, as soon as it is sampled. Options as in `decode`;
    everything is checked now, before the first byte. `json_schema` (a dict or a `JsonSchema`): the output is one
    JSON document valid under it, and may end before max_new_bytes (see bytelm.generation.constrain)."""
    if json_schema is not None:
        return _constrained(model, prompt, max_new_bytes, json_schema, **kw)
    x = as_tensor(model, prompt)
    if x.shape[0] != 1:
        raise GenerationError("stream() takes one prompt; use generate() with a (B, L) tensor for a batch")
    return (bytes([int(nxt[0])]) for nxt in decode(model, x, max_new_bytes, **kw))


def generate(model: Decodable, prompt: bytes | torch.Tensor, max_new_bytes: int, json_schema=None,
             **kw) -> bytes | torch.Tensor:
    """`bytes` prompt -> the generated bytes (without the prompt); tensor (B, L) -> tensor (B, L + max_new_bytes).
    `json_schema` (a dict or a `JsonSchema`, bytes prompts only): the output is one JSON document valid under it
    (unless max_new_bytes runs out first), as few bytes as it takes."""
    if json_schema is not None:
        return b"".join(_constrained(model, prompt, max_new_bytes, json_schema, **kw))
    x = as_tensor(model, prompt)
    new = list(decode(model, x, max_new_bytes, **kw))
    out = torch.stack(new, dim=1) if new else x.new_zeros(x.shape[0], 0)  # (B, N)
    if isinstance(prompt, (bytes, bytearray)):
        return bytes(out[0].tolist())
    return torch.cat((x, out), dim=1)


def _constrained(model: Decodable, prompt: bytes, max_new_bytes: int, json_schema, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 use_cache: bool = True) -> Iterator[bytes]:
    """One prompt's bytes under a grammar, through an engine of one stream (checked now)."""
    if not isinstance(prompt, (bytes, bytearray)):
        raise GenerationError("a JSON schema constrains one document: give a bytes prompt, not a batch")
    if not use_cache:
        raise GenerationError("a JSON schema is applied by the engine: use_cache=False cannot take one")
    grammar = json_schema if isinstance(json_schema, JsonSchema) else JsonSchema(json_schema)
    params = SamplingParams(max_new_bytes, temperature, top_k, top_p, seed, grammar=grammar)
    engine = Engine(model, max_streams=1, max_queue=0, prefill_budget=max(len(prompt), 1),
                    max_len=max(len(prompt) + max_new_bytes, 1))
    outputs = engine.stream(bytes(prompt), params)  # submitted (and checked) now

    def each() -> Iterator[bytes]:
        for out in outputs:
            if out.exception is not None:
                raise out.exception
            yield from (bytes([b]) for b in out.data)

    return each()
