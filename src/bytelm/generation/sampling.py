"""Next-byte sampling from logits: greedy, temperature, top-k and nucleus (top-p), with settings checked up front.

`sample_batch` samples every row of a batch at once from per-row settings (`SamplingMetadata`, after vLLM's): an
all-greedy batch is one argmax; otherwise temperature, top-k and top-p are tensor ops over the batch, and each row
draws one uniform number u and takes the first byte whose cumulative probability passes u (inverse CDF, one
`searchsorted` for the batch). A seeded row draws from its own `torch.Generator` only, so it gives the same bytes alone
or beside any other rows. `sample` (one setting for every row) is the same code, so a request sampled alone equals it
sampled in a batch bit for bit.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ContextLengthError, GenerationError, GenerationFailed
from .constrain import JsonSchema

# Logits are sampled in float32: a temperature or top-p below its smallest normal number (~1.2e-38) would be divided
# by or compared as 0 or a denormal there, and could not give a distribution to sample from.
SMALLEST = torch.finfo(torch.float32).tiny
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0..2**64 - 1 (and negative ones, which it wraps)
MAX_TOP_LOGPROBS = 20  # as OpenAI's API
# Stop sequences are matched in amortised O(1) per byte whatever their number (stops.py); these bound only the
# automaton built per request (one state per byte of them). The server's own limits are lower (ServerLimits).
MAX_STOPS = 128
MAX_STOP_BYTES = 1024


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """One clear error for any setting `sample` cannot honour (NaN, infinities and float32 underflow included)."""
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise GenerationError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature!r}")
    if 0 < temperature < SMALLEST:
        raise GenerationError(f"temperature {temperature!r} underflows float32 (below {SMALLEST:.2g}): nothing can be "
                              "sampled at it; use 0 for greedy decoding")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral)
                              or not 1 <= top_k <= 256):
        raise GenerationError(f"top_k must be an integer in 1..256, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0.0 < top_p <= 1.0):  # NaN fails the comparison too
        raise GenerationError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_p is not None and top_p < SMALLEST:
        raise GenerationError(f"top_p {top_p!r} underflows float32 (below {SMALLEST:.2g}): no byte would be kept; "
                              "use a larger top_p, or temperature 0 for greedy decoding")


def check_seed(seed: int | None) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)
                             or not 0 <= seed <= MAX_SEED):
        raise GenerationError(f"seed must be an integer in 0..2**64-1, got {seed!r}")


def check_logits(logits: torch.Tensor) -> None:
    """A model whose output is NaN or infinite (broken weights, an overflow) cannot be sampled from: say so, rather
    than let argmax pick an arbitrary byte or multinomial fail deep inside torch."""
    if not bool(torch.isfinite(logits).all()):
        raise GenerationFailed("the model's next-byte logits are not finite (NaN or inf): its weights, or a remote "
                               "server's output, are broken")


def check_length(prompt_len: int, max_new_bytes: int, max_seq_len: int) -> None:
    """max_new_bytes is a count, and the prompt and the bytes asked for fit the model's context."""
    if isinstance(max_new_bytes, bool) or not isinstance(max_new_bytes, numbers.Integral):
        raise GenerationError(f"max_new_bytes must be an integer, got {max_new_bytes!r}")
    if max_new_bytes < 0:
        raise GenerationError(f"max_new_bytes must be >= 0, got {max_new_bytes}")
    total = prompt_len + max_new_bytes
    if total > max_seq_len:
        raise ContextLengthError(f"prompt ({prompt_len} bytes) + max_new_bytes ({max_new_bytes}) = {total} exceeds "
                                 f"this model's max_seq_len of {max_seq_len}")


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks for. temperature 0 is greedy; `stop`: byte strings that end the stream (not sent);
    `logprobs`: None for none, n >= 0 for the chosen byte's log-probability and the n likeliest bytes';
    `prompt_logprobs` (vLLM's name): the same for every byte of the prompt, given with the first output (OpenAI's
    `echo`). The first prompt byte's is real: the model predicts it from the empty context.
    `grammar`: a `JsonSchema` the output must follow (bytelm.generation.constrain); each request gets a matcher."""

    max_new_bytes: int = 256
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[bytes, ...] = ()
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    grammar: JsonSchema | None = None

    def check(self, model: Any, prompt_len: int) -> None:
        """Every field, and that the prompt plus max_new_bytes fits `model.config.max_seq_len` (a `Decodable`)."""
        check_sampling(self.temperature, self.top_k, self.top_p)
        check_seed(self.seed)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, bytes) and s for s in self.stop):
            raise GenerationError("stop must be a tuple of non-empty byte strings")
        if len(self.stop) > MAX_STOPS or any(len(s) > MAX_STOP_BYTES for s in self.stop):
            raise GenerationError(f"stop: at most {MAX_STOPS} stop sequences of at most {MAX_STOP_BYTES} bytes each, "
                                  f"got {len(self.stop)} of up to {max(map(len, self.stop))} bytes")
        for name in ("logprobs", "prompt_logprobs"):
            n = getattr(self, name)
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOP_LOGPROBS):
                raise GenerationError(f"{name} must be an integer in 0..{MAX_TOP_LOGPROBS}, got {n!r}")
        check_length(prompt_len, self.max_new_bytes, model.config.max_seq_len)
        if self.grammar is not None:
            if not isinstance(self.grammar, JsonSchema):
                raise GenerationError(f"grammar must be a JsonSchema, got {type(self.grammar).__name__}")
            self.grammar.check()


@dataclass(frozen=True, eq=False)
class SamplingMetadata:
    """Per-row sampling settings of one batch as tensors (build with `from_params` or `uniform`; settings are
    assumed checked). Greedy rows (temperature 0) carry temperature 1, rows without a top-k carry 256 and rows
    without a top-p (or with 1.0) carry 2.0, a mass never reached: the batched ops leave those rows as they are."""

    temperature: torch.Tensor  # (n, 1) float32
    top_k: torch.Tensor | None  # (n, 1) long; None when no row has a top-k
    top_p: torch.Tensor | None  # (n, 1) float32; None when no row has a top-p
    greedy: torch.Tensor | None  # (n,) bool; None when no row is greedy (or every row is: all_greedy)
    seeded: tuple[tuple[int, torch.Generator], ...]  # (row, its generator) of sampled rows with one
    unseeded: torch.Tensor | None  # row indices of sampled rows without one (they draw from torch's default)
    n: int
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool

    @classmethod
    def build(cls, temperature: Sequence[float], top_k: Sequence[int | None], top_p: Sequence[float | None],
              generators: Sequence[torch.Generator | None], device: torch.device | str | None = None
              ) -> SamplingMetadata:
        n = len(temperature)
        if not len(top_k) == len(top_p) == len(generators) == n:
            raise ValueError("one temperature, top_k, top_p and generator per row")
        greedy = [t == 0 for t in temperature]
        if all(greedy):
            return cls(torch.ones(n, 1, device=device), None, None, None, (), None, n, True, False, False)
        ks = [256 if k is None or g else int(k) for k, g in zip(top_k, greedy, strict=True)]
        ps = [2.0 if p is None or p >= 1.0 or g else float(p) for p, g in zip(top_p, greedy, strict=True)]
        any_k, any_p = any(k < 256 for k in ks), any(p < 1.0 for p in ps)
        temps = [1.0 if g else float(t) for t, g in zip(temperature, greedy, strict=True)]
        floats = torch.tensor(list(zip(temps, ps, strict=True)) if any_p else temps, dtype=torch.float32,
                              device=device).view(n, -1)
        seeded = tuple((i, gen) for i, (gen, g) in enumerate(zip(generators, greedy, strict=True))
                       if gen is not None and not g)
        unseeded = [i for i, (gen, g) in enumerate(zip(generators, greedy, strict=True)) if gen is None and not g]
        return cls(
            floats[:, :1], torch.tensor(ks, device=device).view(n, 1) if any_k else None,
            floats[:, 1:] if any_p else None,
            torch.tensor(greedy, device=device) if any(greedy) else None, seeded,
            torch.tensor(unseeded, device=device) if unseeded else None, n, False, any_k, any_p)

    @classmethod
    def from_params(cls, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                    device: torch.device | str | None = None) -> SamplingMetadata:
        """One row per request, each with its generator (None: unseeded, or greedy)."""
        return cls.build([p.temperature for p in params], [p.top_k for p in params], [p.top_p for p in params],
                         generators, device)

    @classmethod
    def uniform(cls, n: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None, device: torch.device | str | None = None
                ) -> SamplingMetadata:
        """n rows with the same settings; with a generator, rows draw from it one after another."""
        return cls.build([temperature] * n, [top_k] * n, [top_p] * n, [generator] * n, device)


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor | None:
    """A bool mask (n,) of the rows of logits (n, 256) holding a NaN or an infinity, or None when there is none."""
    finite = torch.isfinite(logits)
    if bool(finite.all()):
        return None
    return ~finite.all(dim=-1)


def sample_batch(logits: torch.Tensor, meta: SamplingMetadata, allowed: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next bytes (n,) for logits (n, 256), each row with its own settings and generator, and the mask of rows
    whose logits are not finite (None when all are). Those rows' bytes mean nothing: end those requests with an
    error; the other rows are sampled as if they were alone. `allowed` (n, 256) bool, for a batch with constrained
    rows: the bytes each row may take (every byte, for an unconstrained row); the others are set to -inf before
    temperature, top-k and top-p, so a constrained row samples among what its grammar allows, and an unconstrained
    row's logits are untouched."""
    if logits.shape[0] != meta.n:
        raise ValueError(f"{logits.shape[0]} rows of logits for {meta.n} rows of sampling settings")
    bad = nonfinite_rows(logits)
    if bad is not None:
        logits = logits.masked_fill(bad[:, None], 0.0)
    if allowed is not None:
        logits = constrain_logits(logits, allowed)
    return _sample(logits, meta), bad


def constrain_logits(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """logits with the bytes not allowed at -inf (a new tensor); rows allowing every byte keep their values."""
    return logits.masked_fill(~allowed.to(logits.device, non_blocking=True), float("-inf"))


def _sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    if meta.all_greedy:
        return logits.argmax(dim=-1)
    # shifted so the largest is 0 before dividing: a tiny temperature sends the others to -inf, never overflows to
    # inf (inf - inf would be NaN in the softmax). The temperature is a tensor even for one row: a Python float is
    # a multiplication by its reciprocal on CUDA, which could round differently from a batch's division.
    x = logits.float()
    x = (x - x.amax(dim=-1, keepdim=True)) / meta.temperature
    if meta.any_top_k or meta.any_top_p:
        # stable: ties keep their byte order, so a row's kept set never depends on the rows beside it
        sorted_x, order = torch.sort(x, dim=-1, descending=True, stable=True)
        if meta.top_k is not None:  # keep the k likeliest (and any tied with the k-th); k = 256 keeps all
            kth = sorted_x.gather(-1, meta.top_k - 1)  # (n, 1)
            x = x.masked_fill(x < kth, float("-inf"))
            sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
        if meta.top_p is not None:  # keep the smallest set whose probability reaches p
            probs = sorted_x.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs >= meta.top_p  # mass before this byte already reaches p
            drop[:, 0] = False  # the likeliest byte always stays
            x = x.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # inverse CDF, one uniform number per row: the first byte whose cumulative weight passes u * total. A byte of
    # weight 0 is never the first to pass, and in float64 u <= 1 - 2**-52 keeps u * total below the total (u * total
    # rounds to at most the float below it), so some byte always passes.
    cum = x.exp().cumsum(dim=-1, dtype=torch.float64)  # x <= 0 with 0 at the likeliest byte: exp never overflows
    u = torch.zeros(meta.n, 1, dtype=torch.float64, device=x.device)
    for i, g in meta.seeded:  # each seeded row draws one number from its own generator, whatever the batch
        u[i].uniform_(generator=g)
    if meta.unseeded is not None:
        if meta.unseeded.numel() == meta.n:
            u.uniform_()
        else:
            u[meta.unseeded] = torch.rand(meta.unseeded.numel(), 1, dtype=torch.float64, device=x.device)
    nxt = torch.searchsorted(cum, u.clamp_(max=1 - 2**-52).mul_(cum[:, -1:]), right=True).squeeze(-1)
    if meta.greedy is not None:
        nxt = torch.where(meta.greedy, logits.argmax(dim=-1), nxt)
    return nxt


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next bytes (B,) from logits (B, 256). temperature 0 is greedy; top_k keeps the k likeliest bytes; top_p keeps
    the smallest set whose probability reaches p (nucleus sampling, Holtzman et al. 2019). Rows draw from the
    generator one after another (torch's default one without). Non-finite logits are a `GenerationFailed`.
    `sample_batch` with one row of the same settings gives the same byte, bit for bit."""
    check_logits(logits)
    if temperature == 0:  # what an all-greedy batch does, without building its settings
        return logits.argmax(dim=-1)
    return _sample(logits, SamplingMetadata.uniform(logits.shape[0], temperature, top_k, top_p, generator,
                                                    logits.device))
