"""The decoding loop: a continuous-batching engine, many streams, one batched model step per byte, streams joining and
leaving freely. Every front end is its client: `model.generate` / `stream`, `bytelm generate`, the server and the
swarm client.

    engine = Engine(model, max_streams=16)       # one decoding state with 16 rows (slots), preallocated
    engine.start()                               # a background thread runs `step()` while there is work
    for out in engine.stream(b"def ", SamplingParams(max_new_bytes=64, temperature=0)):
        print(out.data)                          # final bytes: never a held-back stop-sequence prefix
    engine.stop()

This is the scheduler (vLLM's split, in small); the model's `prefill` / `decode_step` are the runner, and the engine
hands them plain data: a `Step` of state rows and their byte positions, counted here and never read back from the
device. One `step()`:

1. **prefills** the prompts that fit a per-step budget of prompt bytes, all in one batched `prefill` call; a prompt
   longer than the budget goes in chunks over several steps (chunks start where the model can resume: MEGABYTE's
   patch borders), so running streams never stall behind it;
2. **samples** one byte for every stream with logits waiting, all rows at once (`sampling.sample_rows`);
3. **feeds** those bytes back in one batched `decode_step`. For MEGABYTE the global model runs for the rows whose
   patch the byte completes. Rows that start decoding at arbitrary times would cross patch borders at different
   steps, running the global model at most steps for a few rows; so a row that has sampled its first byte waits
   (up to P - 1 steps) until its position lines up with the engine's clock before it is fed (`align`): then every
   row crosses a border at the same step, and the global model runs once per P steps for all of them.

Outputs are exact: a stream decoded in a batch gives byte for byte what it gives alone (greedy, or sampled with a
seed: each request draws from its own `torch.Generator`). Nothing here knows HTTP.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import BytelmError, ContextLengthError, GenerationError
from ..nn import Step
from .constrain import END_BYTE, Matcher, allowed_bytes
from .protocol import Decodable
from .sampling import (  # noqa: F401
    MAX_TOP_LOGPROBS,
    SamplingMetadata,
    SamplingParams,
    check_logits,
    constrain_logits,
    sample_batch,
)
from .stops import StopMatcher


@dataclass(frozen=True)
class ByteLogprob:
    byte: int
    # natural log of the model's probability of this byte (before temperature, top-k, top-p); for a request with a
    # grammar, among the bytes the grammar allowed (renormalized over them, as vLLM reports after logits processors)
    logprob: float
    top: tuple[tuple[int, float], ...]  # the likeliest bytes and theirs, most likely first


@dataclass(frozen=True)
class Output:
    """One delivery to a request's consumer: new final bytes, and at the end the reason it finished."""

    data: bytes
    logprobs: tuple[ByteLogprob, ...] | None = None  # one per byte of data, when asked for
    # "stop" (a stop sequence, or the grammar's document complete), "length", "cancelled", "error"; None: more to come
    finish_reason: str | None = None
    generated: int = 0  # bytes the model generated so far (stop sequences included): usage
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False)  # what failed, for in-process callers
    # with the first output of a request with `prompt_logprobs`: one per prompt byte, the first one's included
    prompt_logprobs: tuple[ByteLogprob, ...] | None = None


class EngineFull(GenerationError):
    """The waiting queue is full: try again later (HTTP 429)."""


@dataclass(eq=False)
class Request:
    prompt: bytes
    params: SamplingParams
    on_output: Callable[[Output], None]
    id: int = 0
    arrived: float = field(default_factory=time.perf_counter)
    first_byte_at: float | None = None
    # engine-side bookkeeping
    slot: int | None = None
    cancelled: bool = False
    finished: bool = False
    generator: torch.Generator | None = None
    matcher: Matcher | None = None  # the request's place in its grammar (SamplingParams.grammar)
    prefilled: int = 0  # prompt bytes in the state so far (a long prompt goes in chunks)
    prefilling: bool = True
    logits: torch.Tensor | None = None  # (256,) the next byte's, waiting to be sampled
    byte: int | None = None  # sampled, waiting to be fed (until its position lines up with the engine's clock)
    generated: bytearray = field(default_factory=bytearray)
    held: list = field(default_factory=list)  # logprobs of bytes generated but not yet sent
    scored: bool = False  # the prompt's logprobs are computed (when asked for)
    prompt_lps: tuple[ByteLogprob, ...] | None = None  # ... and not yet sent
    sent: int = 0  # bytes of `generated` already delivered
    stops: StopMatcher | None = None  # built at submit, outside the lock; None: no stop sequences
    stop_state: int = 0  # the matcher's state: its depth is the tail held back

    def cancel(self) -> None:
        """Stop this request: its slot is freed at the engine's next step (thread-safe)."""
        self.cancelled = True


PADDING = 1.25  # a batched prefill computes at most this much more than its real bytes (see `_groups`)


def _groups(chunks: list[tuple[Request, int]]) -> list[list[tuple[Request, int]]]:
    """A step's prefill chunks in as few batched calls as keep the right padding under PADDING: the chunks by length,
    a new call where the longest so far would pad the call past that. Prompts of similar lengths share a call; a
    64-byte prompt is never padded to a 4,096-byte one's length."""
    out: list[list[tuple[Request, int]]] = []
    for c in sorted(chunks, key=lambda c: c[1]):
        g = out[-1] if out else None
        if g is not None and (len(g) + 1) * c[1] <= PADDING * (sum(n for _, n in g) + c[1]) + 1:
            g.append(c)
        else:
            out.append([c])
    return out


class Engine:
    """The scheduler over one decoding state of `max_streams` rows. Thread-safe `submit` / `cancel`; `step` runs in
    the engine's thread (`start`) or, without one, in the caller's.

    prefill_budget: prompt bytes prefilled per step. max_len: positions per row (default: the model's context).
    align: line rows up on the model's decode period (see the module's docstring). compile: capture the model's
    decode steps with torch.compile (`model.compile_decode()`; the first steps then take a while to compile)."""

    def __init__(self, model: Decodable, max_streams: int = 16, max_queue: int = 64, prefill_budget: int = 1024,
                 max_len: int | None = None, align: bool = True, compile: bool = False) -> None:
        if max_streams < 1 or max_queue < 0 or prefill_budget < 1:
            raise GenerationError("max_streams and prefill_budget must be >= 1 and max_queue >= 0")
        self.model, self.max_streams, self.max_queue = model, max_streams, max_queue
        # prompt bytes prefilled per step: a long prompt goes in chunks, so running streams get a byte every step
        self.prefill_budget = prefill_budget
        self.max_len = model.config.max_seq_len if max_len is None else max_len  # positions per row
        self.chunk = model.prefill_align  # a prompt's chunks start at multiples of this
        self.period = model.decode_period if align else 1  # steps between runs of the model's big part
        model.check_state_memory(max_streams, self.max_len, hint="lower max_streams (bytelm serve: --max-streams)")
        if compile:  # the model's decode steps, captured once (shared by every engine of this model)
            model.compile_decode()
        with torch.inference_mode():
            self.state = model.new_state(max_streams, self.max_len)
            if compile:
                self._compile_now()
        self.free = list(range(max_streams - 1, -1, -1))
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.cond = threading.Condition()
        self.ids = itertools.count(1)
        self.thread: threading.Thread | None = None
        self.closing = False
        self._meta: tuple[tuple[int, ...], SamplingMetadata] | None = None  # the last step's sampling settings
        self.clock = 0  # steps run: a row is fed when its position lines up with it (see `_due`)
        self.stats = {"requests": 0, "finished": 0, "bytes": 0, "steps": 0, "global_steps": 0, "errors": 0,
                      "prefill_calls": 0, "held_steps": 0}

    def _compile_now(self) -> None:
        """Compile every decode-step graph before any request, not under traffic: one row and several, in slot order
        and not, inside a patch and at its border. Rows are prefilled from position 0 before they are used, so what
        these steps write into the fresh state is never read."""
        period, dev = self.model.decode_period, self.model.device
        sets = [[0], [1], [0, 1], [1, 0]] if self.max_streams > 1 else [[0]]
        for rows in sets:
            for t in sorted({0, period - 1}):
                byte = torch.zeros(len(rows), dtype=torch.long, device=dev)
                self.model.decode_step(byte, self.state, Step.make(rows, [t] * len(rows), t + 1, dev))

    # --- clients --------------------------------------------------------------------------------------------------
    def submit(self, prompt: bytes, params: SamplingParams, on_output: Callable[[Output], None]) -> Request:
        """Queue a request; `on_output` is called from the engine's thread with each `Output` (keep it quick).
        Raises GenerationError for a bad request and EngineFull when the queue is full, before any work."""
        if not isinstance(prompt, (bytes, bytearray)):
            raise GenerationError(f"the prompt must be bytes, got {type(prompt).__name__}")
        params.check(self.model, len(prompt))
        if len(prompt) + params.max_new_bytes > self.max_len:
            raise ContextLengthError(f"prompt ({len(prompt)} bytes) + max_new_bytes ({params.max_new_bytes}) exceeds "
                                     f"this engine's {self.max_len} positions per stream")
        req = Request(bytes(prompt), params, on_output, stops=StopMatcher(params.stop) if params.stop else None)
        if params.grammar is not None:
            req.matcher = params.grammar.matcher()
        if params.max_new_bytes == 0 and params.prompt_logprobs is None:  # nothing to do: done before it starts
            req.finished = True
            on_output(Output(b"", () if params.logprobs is not None else None, "length", 0))
            return req
        with self.cond:
            if self.closing:
                raise EngineFull("the engine is shutting down")
            if len(self.running) + len(self.waiting) >= self.max_streams + self.max_queue:
                raise EngineFull(f"{len(self.running)} streams running and {len(self.waiting)} waiting, the most "
                                 "this server takes; try again shortly")
            req.id = next(self.ids)
            self.waiting.append(req)
            self.stats["requests"] += 1
            self.cond.notify()
        return req

    def stream(self, prompt: bytes, params: SamplingParams) -> Iterator[Output]:
        """Submit and iterate over the outputs as they come (runs the steps itself when no thread is started).
        Closing the iterator early cancels the request."""
        q: queue.SimpleQueue[Output] = queue.SimpleQueue()
        req = self.submit(prompt, params, q.put)
        return self._outputs(req, q)

    def _outputs(self, req: Request, q) -> Iterator[Output]:
        try:
            while True:
                if self.thread is None:
                    while q.empty():
                        self.step()
                out = q.get()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            req.cancel()

    def generate(self, prompt: bytes, params: SamplingParams) -> Output:
        """The whole answer as one Output (data, logprobs, finish_reason)."""
        data, lps, plps, last = [], [], None, None
        for last in self.stream(prompt, params):
            data.append(last.data)
            lps.extend(last.logprobs or ())
            plps = plps or last.prompt_logprobs
        return Output(b"".join(data), tuple(lps) if params.logprobs is not None else None, last.finish_reason,
                      last.generated, last.error, last.exception, plps)

    @property
    def active(self) -> int:
        return len(self.running)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    # --- the loop -------------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Run the steps in a daemon thread until `stop()`."""
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="bytelm-engine", daemon=True)
            self.thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Refuse new requests; with `drain`, finish the running and waiting ones first (up to `timeout` s), then
        cancel what is left and stop the thread."""
        with self.cond:
            self.closing = True
            self.cond.notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        while drain and (self.running or self.waiting) and self.thread is not None and self.thread.is_alive():
            if deadline is not None and time.monotonic() > deadline:
                break
            time.sleep(0.01)
        with self.cond:
            for req in list(self.waiting) + list(self.running.values()):
                req.cancel()
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.thread = None
        else:
            self.step()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not (self.waiting or self.running) and not self.closing:
                    self.cond.wait()
                if self.closing and not (self.waiting or self.running):
                    return
            self.step()

    def step(self) -> None:
        """Free cancelled streams, admit waiting ones, prefill what the budget allows, sample one byte for every
        stream with logits, feed back the bytes that are due."""
        with self.cond:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish(req, "cancelled")
            for req in [r for r in self.running.values() if r.cancelled]:
                self._finish(req, "cancelled")
            while self.waiting and self.free:
                req = self.waiting.popleft()
                req.slot = self.free.pop()
                self.running[req.slot] = req
                self._seed(req)
        rows = sorted(self.running.values(), key=lambda r: r.slot)  # slot order: all slots running steps on views
        with torch.inference_mode():
            for req in [r for r in rows if r.params.prompt_logprobs is not None and not r.scored]:
                self._guard([req], self._score_prompt, req)
            chunks = self._chunks([r for r in rows if r.prefilling and not r.finished])
            for group in _groups(chunks):
                self._guard([r for r, _ in group], self._prefill, group)
            ready = [r for r in rows if r.logits is not None and not r.finished]
            if ready:
                self._guard(ready, self._sample, ready)
            fed = [r for r in rows if r.byte is not None and not r.finished]
            due = [r for r in fed if self._due(r)]
            if fed and not due:  # nobody to line up with: the clock follows the row that has waited longest
                self.clock = self._position(min(fed, key=lambda r: r.id))
                due = [r for r in fed if self._due(r)]
            self.stats["held_steps"] += len(fed) - len(due)
            if due:
                self._guard(due, self._feed, due)
        if chunks or ready or due:
            self.stats["steps"] += 1
            self.clock += 1

    def _seed(self, req: Request) -> None:
        p = req.params
        if p.temperature > 0:
            seed = p.seed if p.seed is not None else torch.seed()
            req.generator = torch.Generator(device=self.model.device).manual_seed(int(seed))

    def _chunks(self, pending: list[Request]) -> list[tuple[Request, int]]:
        """The prompt bytes to prefill this step: whole prompts while the budget lasts (at least one chunk a step),
        a long one in chunks of a multiple of the model's alignment."""
        out, budget = [], self.prefill_budget
        for req in pending:
            left = len(req.prompt) - req.prefilled
            take = left if left <= budget else budget - budget % self.chunk
            if take <= 0 and left and out:  # the budget is spent (an empty prompt costs nothing)
                break
            out.append((req, max(take, min(left, self.chunk))))
            budget -= out[-1][1]
        return out

    def _prefill(self, chunks: list[tuple[Request, int]]) -> None:
        """One batched prefill of every chunk: rows at their own positions, right padded to the longest."""
        dev = self.model.device
        T = max(n for _, n in chunks)
        x = torch.zeros(len(chunks), T, dtype=torch.long, device=dev)
        for j, (req, n) in enumerate(chunks):
            if n:
                x[j, :n] = torch.frombuffer(bytearray(req.prompt[req.prefilled : req.prefilled + n]), dtype=torch.uint8)
        at, lens = [req.prefilled for req, _ in chunks], [n for _, n in chunks]
        step = Step.make([req.slot for req, _ in chunks], at, max(map(sum, zip(at, lens, strict=True))), dev, lens)
        before = self.state.global_steps
        logits = self.model.prefill(x, self.state, step)  # (n, 256)
        self.stats["prefill_calls"] += 1
        self.stats["global_steps"] += self.state.global_steps - before
        for j, (req, n) in enumerate(chunks):
            req.prefilled += n
            if req.prefilled == len(req.prompt):
                req.prefilling = False
                req.logits = logits[j]

    def _score_prompt(self, req: Request) -> None:
        """The prompt's per-byte logprobs (vLLM's prompt_logprobs, OpenAI's echo) from one full forward pass over
        it: the function `bytelm eval` scores with, so a client summing them gets the model's own log-likelihood
        whatever the prefill's chunking. (Not from the prefill: MEGABYTE's cached prefill runs its local model on the
        last patch only.) A request with nothing to generate then ends here, never prefilled."""
        req.scored = True
        lps: tuple[ByteLogprob, ...] = ()
        if req.prompt:
            x = torch.tensor(list(req.prompt), dtype=torch.long, device=self.model.device).view(1, -1)
            lp = torch.log_softmax(self.model(x)[0].float(), dim=-1)  # (L, 256): row t predicts byte t
            check_logits(lp)
            chosen = lp.gather(1, x.view(-1, 1)).view(-1).tolist()
            n = req.params.prompt_logprobs
            top = torch.topk(lp, n, dim=-1) if n else None
            tops = zip(top.indices.tolist(), top.values.tolist(), strict=True) if top is not None else \
                [((), ())] * len(chosen)
            lps = tuple(ByteLogprob(b, v, tuple(zip(i, t, strict=True)))
                        for b, v, (i, t) in zip(req.prompt, chosen, tops, strict=True))
        with self.cond:
            req.prompt_lps = lps
            if req.params.max_new_bytes == 0:
                req.prefilling = False
                self._deliver(req, 0, "length")

    def _due(self, req: Request) -> bool:
        """Whether a row with a sampled byte is fed this step: always, unless the model's big part runs once per
        `period` positions (MEGABYTE: P); then when its position lines up with the clock, so that every row crosses
        a patch border at the same step. A row waits at most period - 1 steps, once: then it stays in line."""
        return (self._position(req) - self.clock) % self.period == 0

    @staticmethod
    def _position(req: Request) -> int:
        """Where a row's next fed byte (its last sampled one) sits in its sequence."""
        return len(req.prompt) + len(req.generated) - 1

    def _sample(self, ready: list[Request]) -> None:
        """One byte for every ready row (each with its own settings and generator); rows whose logits are not finite
        end with an error, the others go on."""
        logits = torch.stack([r.logits for r in ready])  # (n, 256)
        key = tuple(r.id for r in ready)
        if self._meta is None or self._meta[0] != key:  # the same rows as last step: the same settings
            self._meta = key, SamplingMetadata.from_params([r.params for r in ready], [r.generator for r in ready],
                                                           logits.device)
        allowed = self._allowed(ready)  # None when no row has a grammar: unconstrained batches pay nothing
        nxt, bad = sample_batch(logits, self._meta[1], allowed)
        if allowed is not None:
            stuck = ~allowed.any(dim=-1)  # a matcher in an error state allows nothing: a bug, ended as an error
            if bool(stuck.any()):
                with self.cond:
                    for req in [r for r, s in zip(ready, stuck.tolist(), strict=True) if s]:
                        self._finish(req, "error", "the grammar allows no next byte")
                keep = ~stuck if bad is None else ~stuck & ~bad
                bad = ~keep
        if bad is not None:  # rows whose model output is NaN or inf end with an error; the others go on
            keep = (~bad).tolist()
            self._guard([r for r, ok in zip(ready, keep, strict=True) if not ok and not r.finished], check_logits,
                        logits[bad])
            ready = [r for r, ok in zip(ready, keep, strict=True) if ok]
            logits, nxt = logits[~bad], nxt[~bad]
            allowed = allowed[~bad] if allowed is not None else None
        lp = None
        if any(r.params.logprobs is not None for r in ready):  # after the grammar's mask (see ByteLogprob)
            lp = torch.log_softmax((logits if allowed is None else constrain_logits(logits, allowed)).float(), dim=-1)
        values = nxt.tolist()
        with self.cond:
            for j, req in enumerate(ready):
                req.logits = None
                if req.cancelled:
                    self._finish(req, "cancelled")
                    continue
                if lp is not None and req.params.logprobs is not None:
                    top = torch.topk(lp[j], req.params.logprobs) if req.params.logprobs else None
                    req.held.append(ByteLogprob(values[j], float(lp[j, values[j]]), tuple(
                        (b, v) for b, v in zip(top.indices.tolist(), top.values.tolist(), strict=True)
                        if v > float("-inf")) if top is not None else ()))  # bytes the grammar refused: not offered
                if self._emit(req, values[j]):
                    req.byte = values[j]
        self.stats["bytes"] += len(ready)

    @staticmethod
    def _allowed(ready: list[Request]) -> torch.Tensor | None:
        """(n, 256) bool: the bytes each row may take next (all, for a row without a grammar), or None when no row has
        a grammar."""
        constrained = [j for j, r in enumerate(ready) if r.matcher is not None]
        if not constrained:
            return None
        rows = allowed_bytes([ready[j].matcher for j in constrained])
        if len(constrained) == len(ready):
            return rows
        allowed = torch.ones(len(ready), 256, dtype=torch.bool)
        allowed[constrained] = rows
        return allowed

    def _feed(self, due: list[Request]) -> None:
        """One batched decode step: each row's sampled byte at its own position."""
        at = [self._position(r) for r in due]
        step = Step.make([r.slot for r in due], at, max(at) + 1, self.model.device)
        byte = torch.tensor([r.byte for r in due], dtype=torch.long, device=self.model.device)
        before = self.state.global_steps
        out = self.model.decode_step(byte, self.state, step)  # (n, 256)
        self.stats["global_steps"] += self.state.global_steps - before
        for i, req in enumerate(due):
            req.byte = None
            req.logits = out[i]

    def _guard(self, reqs: list[Request], fn, *args) -> None:
        """Run fn; if the model fails, those requests end with an error and the engine keeps serving the others."""
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - a fault in one step must not kill the engine thread
            self.stats["errors"] += 1
            with self.cond:
                why = str(e) if isinstance(e, BytelmError) else f"{type(e).__name__}: {e}"  # else: a bug, named
                for req in reqs:
                    if not req.finished:
                        self._finish(req, "error", why, e)

    # --- a request's bytes: stop sequences, holding back, finishing (called with self.cond held) -------------------
    def _emit(self, req: Request, byte: int) -> bool:
        """Take one generated byte; deliver what is final. True while the request goes on."""
        if req.first_byte_at is None:
            req.first_byte_at = time.perf_counter()
        req.generated.append(byte)
        g, m = req.generated, req.stops
        if req.matcher is not None and req.matcher.advance(byte):  # the document is complete
            self._deliver(req, len(g) - (byte == END_BYTE), "stop")  # the end (END_BYTE) is not sent
            return False
        if m is not None:  # amortised O(1) per byte, however many and long the stop sequences (stops.py)
            req.stop_state = m.step(req.stop_state, byte)
            s = m.stop_at(req.stop_state)
            if s is not None:  # the stop sequence is not sent
                self._deliver(req, len(g) - len(s), "stop")
                return False
        if len(g) >= req.params.max_new_bytes:
            self._deliver(req, len(g), "length")
            return False
        hold = 0 if m is None else m.held(req.stop_state)  # the longest tail that may still become a stop sequence
        if len(g) - hold > req.sent:
            self._deliver(req, len(g) - hold, None)
        return True

    def _deliver(self, req: Request, upto: int, finish: str | None) -> None:
        data = bytes(req.generated[req.sent : upto])
        lps = None
        if req.params.logprobs is not None:
            lps, req.held = tuple(req.held[: upto - req.sent]), req.held[upto - req.sent :]
        req.sent = upto
        if finish is not None:
            self._release(req)
            self.stats["finished"] += 1
        plps, req.prompt_lps = req.prompt_lps, None
        req.on_output(Output(data, lps, finish, len(req.generated), prompt_logprobs=plps))

    def _finish(self, req: Request, reason: str, error: str | None = None, exc: BaseException | None = None) -> None:
        self._release(req)
        plps, req.prompt_lps = req.prompt_lps, None
        req.on_output(Output(b"", () if req.params.logprobs is not None else None, reason, len(req.generated), error,
                             exc, plps))

    def _release(self, req: Request) -> None:
        req.finished = True
        req.logits = req.byte = None
        if req.slot is not None and self.running.get(req.slot) is req:
            del self.running[req.slot]
            self.free.append(req.slot)
        req.slot = None

