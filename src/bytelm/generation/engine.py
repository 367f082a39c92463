"""A continuous-batching decoder: many streams, one batched model step per byte, streams joining and leaving freely.

    engine = Engine(model, max_streams=16)       # one decoding state with 16 rows (slots), preallocated
    engine.start()                               # a background thread runs `step()` while there is work
    for out in engine.stream(b"def ", SamplingParams(max_new_bytes=64, temperature=0)):
        print(out.data)                          # final bytes: never a held-back stop-sequence prefix
    engine.stop()

Every row of the state has its own position (see `KVCache.update`), so a request **joins** the running batch as soon
as it is prefilled into a free slot and **leaves** when it finishes or is cancelled, its slot reused by the next one.
One `step()` prefills the requests that fit, samples one byte for every running stream (each with its own settings
and random generator) and feeds those bytes back in one batched `decode_step`: for MEGABYTE, one batched global step
for the rows whose patch just completed, one batched local step for all (vLLM's split, in small: this is the
scheduler; the model's `prefill` / `decode_step` are the runner).

Outputs are exact: a stream decoded in a batch gives byte for byte what it gives alone (greedy, or sampled with a
seed: each request samples from its own `torch.Generator` with `bytelm.generation.sampling.sample`, as `generate`
does). Nothing here knows HTTP: the server (bytelm.serve) and the CLI are clients of it.
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

from ..errors import BytelmError, GenerationError
from .decode import Decodable
from .sampling import MAX_TOP_LOGPROBS, SamplingParams, check_logits, sample  # noqa: F401 - re-exported here


@dataclass(frozen=True)
class ByteLogprob:
    byte: int
    logprob: float  # natural log of the model's probability of this byte (before temperature, top-k, top-p)
    top: tuple[tuple[int, float], ...]  # the likeliest bytes and theirs, most likely first


@dataclass(frozen=True)
class Output:
    """One delivery to a request's consumer: new final bytes, and at the end the reason it finished."""

    data: bytes
    logprobs: tuple[ByteLogprob, ...] | None = None  # one per byte of data, when asked for
    finish_reason: str | None = None  # "stop" (a stop sequence), "length", "cancelled", "error"; None: more to come
    generated: int = 0  # bytes the model generated so far (stop sequences included): usage
    error: str | None = None


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
    logits: torch.Tensor | None = None  # (256,) the next byte's, waiting to be sampled
    generated: bytearray = field(default_factory=bytearray)
    held: list = field(default_factory=list)  # logprobs of bytes generated but not yet sent
    sent: int = 0  # bytes of `generated` already delivered

    def cancel(self) -> None:
        """Stop this request: its slot is freed at the engine's next step (thread-safe)."""
        self.cancelled = True


class Engine:
    """The scheduler over one decoding state of `max_streams` rows. Thread-safe `submit` / `cancel`; `step` runs in
    the engine's thread (`start`) or, without one, in the caller's."""

    def __init__(self, model: Decodable, max_streams: int = 16, max_queue: int = 64,
                 prefill_budget: int = 4096) -> None:
        if max_streams < 1 or max_queue < 0:
            raise GenerationError("max_streams must be >= 1 and max_queue >= 0")
        self.model, self.max_streams, self.max_queue = model, max_streams, max_queue
        self.prefill_budget = prefill_budget  # prompt bytes prefilled per step (at least one prompt): keeps a long
        # prompt from stalling every running stream for many prompts' worth of time
        self.max_len = model.config.max_seq_len
        check = getattr(model, "check_state_memory", None)  # a ByteLM's: refuse a state the device cannot hold
        if check is not None:
            check(max_streams, self.max_len, hint="lower max_streams (bytelm serve: --max-streams)")
        with torch.inference_mode():
            self.state = model.new_state(max_streams, self.max_len)
        self.free = list(range(max_streams - 1, -1, -1))
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}  # slot -> request
        self.cond = threading.Condition()
        self.ids = itertools.count(1)
        self.thread: threading.Thread | None = None
        self.closing = False
        self.stats = {"requests": 0, "finished": 0, "bytes": 0, "steps": 0, "global_steps": 0, "errors": 0}

    # --- clients --------------------------------------------------------------------------------------------------
    def submit(self, prompt: bytes, params: SamplingParams, on_output: Callable[[Output], None]) -> Request:
        """Queue a request; `on_output` is called from the engine's thread with each `Output` (keep it quick).
        Raises GenerationError for a bad request and EngineFull when the queue is full, before any work."""
        if not isinstance(prompt, (bytes, bytearray)):
            raise GenerationError(f"the prompt must be bytes, got {type(prompt).__name__}")
        params.check(self.model, len(prompt))
        req = Request(bytes(prompt), params, on_output)
        if params.max_new_bytes == 0:  # nothing to generate: done before it starts
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
        data, lps, last = [], [], None
        for last in self.stream(prompt, params):
            data.append(last.data)
            lps.extend(last.logprobs or ())
        return Output(b"".join(data), tuple(lps) if params.logprobs is not None else None, last.finish_reason,
                      last.generated, last.error)

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
        """Free cancelled streams, admit waiting ones, sample one byte for each running stream, feed them back."""
        with self.cond:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self._finish(req, "cancelled")
            for req in [r for r in self.running.values() if r.cancelled]:
                self._finish(req, "cancelled")
            admitted, budget = [], self.prefill_budget
            while self.waiting and self.free and (not admitted or budget >= len(self.waiting[0].prompt)):
                req = self.waiting.popleft()
                req.slot = self.free.pop()
                self.running[req.slot] = req
                budget -= len(req.prompt)
                admitted.append(req)
        with torch.inference_mode():
            for req in admitted:
                self._guard([req], self._prefill, req)
            ready = sorted((r for r in self.running.values() if r.logits is not None and not r.finished),
                           key=lambda r: r.slot)  # in slot order: when every slot runs, the model steps on views
            if not ready:
                return
            self.stats["steps"] += 1
            self._guard(ready, self._sample_and_feed, ready)

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
                        self._finish(req, "error", why)

    def _prefill(self, req: Request) -> None:
        p = req.params
        seed = p.seed if p.seed is not None else torch.seed()
        if p.temperature > 0:
            req.generator = torch.Generator(device=self.model.device).manual_seed(int(seed))
        x = torch.tensor(list(req.prompt), dtype=torch.long, device=self.model.device).view(1, -1)
        rows = torch.tensor([req.slot], device=self.model.device)
        req.logits = self.model.prefill(x, self.state, rows)[0]

    def _sample_and_feed(self, ready: list[Request]) -> None:
        logits = torch.stack([r.logits for r in ready])  # (n, 256)
        finite = torch.isfinite(logits).all(dim=-1)
        if not bool(finite.all()):  # a row whose model output is NaN or inf ends with an error; the others go on
            broken = [r for r, ok in zip(ready, finite.tolist(), strict=True) if not ok]
            self._guard(broken, check_logits, logits[~finite])
            ready = [r for r, ok in zip(ready, finite.tolist(), strict=True) if ok]
            if not ready:
                return
            logits = logits[finite]
        nxt = logits.argmax(dim=-1)  # greedy rows; the others sample with their own generator, as `decode` does
        for j, req in enumerate(ready):
            p = req.params
            if p.temperature > 0:
                nxt[j] = sample(logits[j : j + 1], p.temperature, p.top_k, p.top_p, req.generator)[0]
        lp = torch.log_softmax(logits.float(), dim=-1) if any(r.params.logprobs is not None for r in ready) else None
        feed = []
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
                        zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()))
                if self._emit(req, values[j]):
                    feed.append(j)
        self.stats["bytes"] += len(ready)
        if not feed:
            return
        slots = [ready[j].slot for j in feed]
        rows = None if slots == list(range(self.max_streams)) else torch.tensor(slots, device=nxt.device)
        before = getattr(self.state, "global_steps", None)  # MEGABYTE counts its global steps; for others every
        out = self.model.decode_step(nxt[feed], self.state, rows)  # (n, 256)   step runs the whole model
        self.stats["global_steps"] += 1 if before is None else self.state.global_steps - before
        for i, j in enumerate(feed):
            ready[j].logits = out[i]

    # --- a request's bytes: stop sequences, holding back, finishing (called with self.cond held) -------------------
    def _emit(self, req: Request, byte: int) -> bool:
        """Take one generated byte; deliver what is final. True while the request goes on."""
        if req.first_byte_at is None:
            req.first_byte_at = time.perf_counter()
        req.generated.append(byte)
        g, p = req.generated, req.params
        for s in p.stop:
            if g.endswith(s):  # the stop sequence is not sent
                self._deliver(req, len(g) - len(s), "stop")
                return False
        if len(g) >= p.max_new_bytes:
            self._deliver(req, len(g), "length")
            return False
        hold = max((k for s in p.stop for k in range(min(len(s) - 1, len(g)), 0, -1) if g.endswith(s[:k])),
                   default=0)  # the longest tail that may still become a stop sequence
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
        req.on_output(Output(data, lps, finish, len(req.generated)))

    def _finish(self, req: Request, reason: str, error: str | None = None) -> None:
        self._release(req)
        req.on_output(Output(b"", () if req.params.logprobs is not None else None, reason, len(req.generated), error))

    def _release(self, req: Request) -> None:
        req.finished = True
        req.logits = None
        if req.slot is not None and self.running.get(req.slot) is req:
            del self.running[req.slot]
            self.free.append(req.slot)
        req.slot = None

