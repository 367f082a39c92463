"""`bytelm swarm serve`: a process holding blocks start..end-1 of a model's remote stack, serving them over
hivemind's P2P to any client of the swarm.

One servicer (hivemind's ServicerBase: `rpc_*` coroutines become P2P handlers) answers six operations, each a
request of bytelm.swarm.wire:

    info      what it serves and how full it is
    open      a decoding session: KV caches for `batch` rows of up to `max_len` positions over blocks a..b-1 (any
              sub-span of its own), refused when its cache budget cannot hold them
    step      one or more calls (x, pos, rows, span) in a session, exactly TransformerStack.forward's arguments, in
              order: one call per global step while decoding, the whole history after a failover
    close     frees a session (idle sessions are freed after `session_timeout` anyway)
    forward   stateless, for training: blocks a..b-1 over x (B, T, D)
    backward  stateless: the gradient of that forward's output, given grad_out, with respect to x

Everything a request carries is checked (dtype, shapes, lengths, positions, rows, finite values) before any compute;
a bad request gets an error naming the problem and the server goes on. Compute runs in one worker thread, so the
event loop keeps answering while a step runs. The weights are frozen (`requires_grad_(False)`): no request can
change them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

# typing's AsyncIterator, not collections.abc's: hivemind's ServicerBase tells a streaming rpc_* by typing's name
from typing import Any, AsyncIterator  # noqa: UP035

import torch
from hivemind.dht import DHT
from hivemind.p2p import P2PContext, ServicerBase
from hivemind.proto import runtime_pb2

from .._version import __version__
from ..nn import KVCache, TransformerStack
from . import wire
from .registry import OFFLINE, ServerInfo, announce, choose_span, servers
from .spans import load_span, remote_stack
from .wire import BadMessage

MAX_BATCH = 1024  # rows in one request or session


@dataclass
class Session:
    caches: list[KVCache]
    batch: int
    max_len: int
    a: int  # blocks a..b-1, relative to the server's span
    b: int
    nbytes: int
    used: float


def _int(v, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadMessage(f"{name} must be an integer in [{lo}, {hi}], got {v!r}"[:200])
    return v


class SpanServer(ServicerBase):
    def __init__(self, stack: TransformerStack, start: int, end: int, *, max_cache_bytes: int,
                 session_timeout: float = 600.0) -> None:
        self.stack, self.start, self.end = stack, start, end
        self.dim, self.heads, self.max_pos = stack.dim, stack.heads, stack.max_pos
        self.dtype = next(stack.parameters()).dtype
        self.max_cache_bytes, self.session_timeout = max_cache_bytes, session_timeout
        self.sessions: dict[str, Session] = {}
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="bytelm-span")
        self.stats = {"requests": 0, "errors": 0, "steps": 0, "forwards": 0, "backwards": 0, "sessions": 0}

    # --- the wire ------------------------------------------------------------------------------------------------
    async def rpc_call(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        tensors, meta = await self.handle(request.uid, request.tensors, request.metadata)
        protos, raw = wire.pack(tensors, meta)
        return runtime_pb2.ExpertResponse(tensors=protos, metadata=raw)

    async def rpc_call_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
                              ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        op, protos, raw = await wire.join_stream(requests)
        tensors, meta = await self.handle(op, protos, raw)
        protos, raw = wire.pack(tensors, meta)
        for msg in wire.stream_parts(runtime_pb2.ExpertResponse, "", protos, raw):
            yield msg

    async def handle(self, op: str, protos, raw: bytes) -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Run one operation; any problem with the request is raised as a one-line error the client receives."""
        self.stats["requests"] += 1
        try:
            meta = wire.unpack_meta(raw)
            tensors = wire.unpack_tensors(protos)
            self._expire()
            if op == "info":
                return [], self.info()
            if op == "open":
                return [], self._open(meta)
            if op == "close":
                self.sessions.pop(str(meta.get("session")), None)
                return [], {}
            if op == "step":
                s, calls = self._step_args(meta, tensors)
                outs = await self._run(self._step, s, tensors, calls)
                self.stats["steps"] += len(calls)
                return outs, {}
            if op in ("forward", "backward"):
                a, b = self._blocks(meta)
                want = 1 if op == "forward" else 2
                if len(tensors) != want:
                    raise BadMessage(f"{op} takes {want} tensor(s), got {len(tensors)}")
                x = self._check_x(tensors[0], MAX_BATCH, self.max_pos)
                if op == "backward":
                    g = tensors[1]
                    if g.shape != x.shape or g.dtype != x.dtype or not torch.isfinite(g).all():
                        raise BadMessage(f"grad_out must be finite {x.dtype} {tuple(x.shape)} like x")
                    self.stats["backwards"] += 1
                    return [await self._run(self._backward, x, g, a, b)], {}
                self.stats["forwards"] += 1
                return [await self._run(self._forward, x, a, b)], {}
            raise BadMessage(f"unknown operation {op[:40]!r}")
        except BadMessage as e:
            self.stats["errors"] += 1
            raise ValueError(str(e)) from None

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # --- checks ----------------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "dim": self.dim, "dtype": str(self.dtype).replace("torch.", ""),
                "max_pos": self.max_pos, "sessions": len(self.sessions), "cache_free": self.cache_free(),
                "version": __version__, **self.stats}

    def cache_free(self) -> int:
        return self.max_cache_bytes - sum(s.nbytes for s in self.sessions.values())

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, s in self.sessions.items() if now - s.used > self.session_timeout]:
            del self.sessions[sid]

    def _blocks(self, meta) -> tuple[int, int]:
        """Blocks a..b-1 asked for (absolute), as indices into this server's stack."""
        a = _int(meta.get("start"), "start", self.start, self.end - 1)
        b = _int(meta.get("end"), "end", a + 1, self.end)
        return a - self.start, b - self.start

    def _check_x(self, x: torch.Tensor, max_rows: int, max_len: int) -> torch.Tensor:
        if x.dtype != self.dtype or x.dim() != 3 or x.shape[2] != self.dim:
            raise BadMessage(f"x must be {str(self.dtype).replace('torch.', '')} (n, T, {self.dim}), got "
                             f"{str(x.dtype).replace('torch.', '')} {tuple(x.shape)}")
        if not 1 <= x.shape[0] <= max_rows or not 1 <= x.shape[1] <= max_len:
            raise BadMessage(f"x has {x.shape[0]} rows of {x.shape[1]} positions; allowed: 1..{max_rows} rows of "
                             f"1..{max_len}")
        if not torch.isfinite(x).all():
            raise BadMessage("x holds inf or nan")
        return x

    def _open(self, meta) -> dict[str, Any]:
        sid = meta.get("session")
        if not isinstance(sid, str) or not 8 <= len(sid) <= 64:
            raise BadMessage("session must be a string of 8 to 64 characters")
        if sid in self.sessions:
            raise BadMessage("that session is open already")
        batch = _int(meta.get("batch"), "batch", 1, MAX_BATCH)
        max_len = _int(meta.get("max_len"), "max_len", 1, self.max_pos)
        a, b = self._blocks(meta)
        nbytes = 2 * (b - a) * batch * max_len * self.dim * self.dtype.itemsize
        if nbytes > self.cache_free():
            raise BadMessage(f"refused: a session of {nbytes / 2**20:.1f} MiB of cache does not fit in the "
                             f"{self.cache_free() / 2**20:.1f} MiB left")
        dev = next(self.stack.parameters()).device
        caches = [KVCache(batch, self.heads, max_len, self.dim // self.heads, dev, self.dtype) for _ in range(a, b)]
        self.sessions[sid] = Session(caches, batch, max_len, a, b, nbytes, time.monotonic())
        self.stats["sessions"] += 1
        return {"cache_free": self.cache_free()}

    def _step_args(self, meta, tensors) -> tuple[Session, list[tuple]]:
        s = self.sessions.get(str(meta.get("session")))
        if s is None:
            raise BadMessage("unknown session (never opened, closed, or expired)")
        s.used = time.monotonic()
        calls = meta.get("calls")
        if not isinstance(calls, list) or not 1 <= len(calls) == len(tensors) or len(calls) > 1 << 16:
            raise BadMessage("step takes a list of calls and one tensor per call")
        checked = []
        for c, x in zip(calls, tensors, strict=False):
            if not isinstance(c, dict):
                raise BadMessage("each call must be a map of pos, rows, span")
            x = self._check_x(x, s.batch, s.max_len)
            n, m = x.shape[:2]
            rows = c.get("rows")
            if rows is None:
                if n != s.batch:
                    raise BadMessage(f"x has {n} rows; without `rows` a call covers all {s.batch} of the session")
            else:
                if not isinstance(rows, list) or len(rows) != n or len(set(rows)) != n:
                    raise BadMessage(f"rows must list {n} distinct rows")
                rows = torch.tensor([_int(r, "a row", 0, s.batch - 1) for r in rows])
            pos, span = c.get("pos"), c.get("span")
            if isinstance(pos, list):
                if m != 1 or len(pos) != n:
                    raise BadMessage("per-row positions take one position per row and x of one position")
                pos = torch.tensor([_int(p, "pos", 0, s.max_len - 1) for p in pos])
                span = _int(span, "span", int(pos.max()) + 1, s.max_len)
            else:
                pos = _int(pos, "pos", 0, s.max_len - m)
                span = None if span is None else _int(span, "span", 1, s.max_len)
            checked.append((pos, rows, span))
        return s, checked

    # --- compute (in the worker thread) ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _step(self, s: Session, xs, calls) -> list[torch.Tensor]:
        return [self.stack.run_blocks(x, s.a, s.b, s.caches, *c) for x, c in zip(xs, calls, strict=False)]

    @torch.inference_mode()
    def _forward(self, x, a, b) -> torch.Tensor:
        return self.stack.run_blocks(x, a, b)

    def _backward(self, x, g, a, b) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.stack.run_blocks(x, a, b), x, g)
        return grad


# --- the process --------------------------------------------------------------------------------------------------
def measure_throughput(stack: TransformerStack, steps: int = 8) -> float:
    """Decode steps per second through the whole span for one row (what announcements and routing compare)."""
    caches = stack.new_caches(1, steps + 1, next(stack.parameters()).device, next(stack.parameters()).dtype)
    x = torch.zeros(1, 1, stack.dim, dtype=next(stack.parameters()).dtype)
    with torch.inference_mode():
        stack(x, caches, 0)
        t0 = time.perf_counter()
        for p in range(1, steps + 1):
            stack(x, caches, p)
    return steps / max(time.perf_counter() - t0, 1e-6)


def run_server(model: str, swarm: str, blocks: tuple[int, int] | None = None, num_blocks: int | None = None,
               initial_peers: list[str] = (), host: str = "127.0.0.1", port: int = 0, max_cache_mb: float = 1024,
               announce_period: float = 30.0, session_timeout: float = 600.0, throughput: float | None = None,
               threads: int | None = None, log=print) -> None:
    """Serve until SIGINT/SIGTERM: join the swarm's DHT, take a span, load it, announce it, answer requests."""
    from ..models import read_config

    if threads:
        torch.set_num_threads(threads)
    config = read_config(model)
    _, depth = remote_stack(config)
    stack = None if blocks is None else load_span(model, *blocks)[1]  # a bad span fails before joining anything
    dht = DHT(initial_peers=list(initial_peers), host_maddrs=[f"/ip4/{host}/tcp/{port}"], start=True)
    dht.run_coroutine(partial(_exit_with_parent, parent=os.getpid()), return_future=True)
    try:
        if blocks is None:
            start, end = choose_span(servers(dht, swarm, depth), depth, num_blocks or depth)
            _, stack = load_span(model, start, end)
        else:
            start, end = blocks
        tp = throughput or measure_throughput(stack)
        server = SpanServer(stack, start, end, max_cache_bytes=int(max_cache_mb * 2**20),
                            session_timeout=session_timeout)
        asyncio.run(_serve(dht, server, swarm, tp, announce_period, log))
    finally:
        dht.shutdown()


async def _exit_with_parent(dht, node, parent: int) -> None:
    """Runs inside the DHT's process: hivemind's DHT process (and its p2p daemon) outlive a server killed with
    SIGKILL alone, holding ports and announcing a peer that answers nothing. End them with their parent."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    with contextlib.suppress(Exception):
        await asyncio.wait_for(node.shutdown(), timeout=5.0)  # stops the p2p daemon it started
    os._exit(0)


async def _serve(dht: DHT, server: SpanServer, swarm: str, tp: float, period: float, log) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    p2p = await dht.replicate_p2p()
    await server.add_p2p_handlers(p2p)
    peer = dht.peer_id.to_base58()

    def info(state="online") -> ServerInfo:
        return ServerInfo(server.start, server.end, tp, server.cache_free(), state, __version__)

    await loop.run_in_executor(None, announce, dht, swarm, peer, info(), period * 3)
    addrs = " ".join(str(a) for a in dht.get_visible_maddrs())
    log(f"serving blocks {server.start}:{server.end} of swarm {swarm} ({tp:.0f} steps/s); peer {peer}; "
        f"other servers and clients can join with --initial-peers {addrs}")
    sys.stdout.flush()
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=period)
        except asyncio.TimeoutError:
            await loop.run_in_executor(None, announce, dht, swarm, peer, info(), period * 3)
    await loop.run_in_executor(None, announce, dht, swarm, peer, info(OFFLINE), period * 3, 5.0)
    with contextlib.suppress(Exception):  # Ctrl-C reaches the p2p daemon too: it may be gone already
        await server.remove_p2p_handlers(p2p)
        await wire.shutdown_replica(p2p)
    log(f"stopped serving blocks {server.start}:{server.end}")


def new_session_id() -> str:
    return secrets.token_hex(16)


__all__ = ["SpanServer", "measure_throughput", "new_session_id", "run_server"]
