"""`bytelm swarm serve`: a process holding blocks start..end-1 of a model's remote stack, serving them over
hivemind's P2P to any client of the swarm.

One servicer (hivemind's ServicerBase: `rpc_*` coroutines become P2P handlers) answers six operations, each a
request of bytelm.swarm.wire:

    info      what it serves (with its blocks' fingerprints), its limits, and how full it is
    open      a decoding session: KV caches for `batch` rows of up to `max_len` positions over blocks a..b-1 (any
              sub-span of its own), refused when its cache budget, or the calling peer's share of it, cannot hold
              them, or when that peer holds `max_sessions_per_peer` sessions already
    step      one or more calls (x and a Step: rows, pos, span, lens; see wire.step_from_wire) in a session,
              exactly TransformerStack.forward's arguments, in order: one call per global step while decoding, the
              whole history after a failover
    close     frees a session (idle sessions are freed after `session_timeout` anyway, and those of a peer that is no
              longer connected after a few seconds)
    forward   stateless, for training: blocks a..b-1 over x (B, T, D)
    backward  stateless: the gradient of that forward's output, given grad_out, with respect to x

Everything a request carries is checked (dtype, shapes, lengths, positions, rows, finite values) before any compute;
a bad request gets an error naming the problem and the server goes on. Compute runs in one worker thread, so the
event loop keeps answering while a step runs; one request (forward, backward, or all the calls of one step) may
carry at most `max_request_tokens` rows x positions, so no request holds that thread for long (clients split larger
work; a request over the limit is refused naming it). The weights are frozen (`requires_grad_(False)`): no request
can change them.

Per-peer limits are per peer id, which costs nothing to make: they stop one careless or greedy client, not a party
running many peers.
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
from ..errors import UnknownSession
from ..nn import KVCache, Step, TransformerStack
from . import wire
from .registry import OFFLINE, ServerInfo, announce, choose_span, servers
from .spans import load_span_fingerprinted, remote_stack
from .wire import BadMessage, step_from_wire

MAX_BATCH = 1024  # rows in one request or session
MAX_REQUEST_SECONDS = 1.0  # the default max_request_tokens: what this server computes in about this long
DISCONNECT_CHECK = 2.0  # seconds between looks at which peers are still connected
DISCONNECT_GRACE = 5.0  # a session of a peer no longer connected is freed once idle this long


@dataclass
class Session:
    caches: list[KVCache]
    batch: int
    max_len: int
    a: int  # blocks a..b-1, relative to the server's span
    b: int
    nbytes: int
    used: float
    peer: str = ""  # who opened it


def _int(v, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise BadMessage(f"{name} must be an integer in [{lo}, {hi}], got {v!r}"[:200])
    return v


class SpanServer(ServicerBase):
    """Blocks start..end-1 served over hivemind's P2P. `fingerprints`: those blocks' (announced and reported by
    `info`); the limits: see the module's docstring and `bytelm swarm serve --help`."""

    def __init__(self, stack: TransformerStack, start: int, end: int, *, max_cache_bytes: int,
                 session_timeout: float = 60.0, fingerprints: list[str] = (), max_sessions_per_peer: int = 16,
                 peer_cache_share: float = 0.5, max_request_tokens: int | None = None) -> None:
        self.stack, self.start, self.end = stack, start, end
        self.dim, self.heads, self.max_pos = stack.dim, stack.heads, stack.max_pos
        self.dtype = next(stack.parameters()).dtype
        self.max_cache_bytes, self.session_timeout = max_cache_bytes, session_timeout
        self.fingerprints = list(fingerprints)
        self.max_sessions_per_peer = max_sessions_per_peer
        self.peer_cache_share, self.peer_cache_bytes = peer_cache_share, int(max_cache_bytes * peer_cache_share)
        self.max_request_tokens = max_request_tokens or self.max_pos
        self.sessions: dict[str, Session] = {}
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="bytelm-span")
        self.stats = {"requests": 0, "errors": 0, "steps": 0, "forwards": 0, "backwards": 0, "sessions_opened": 0}

    # --- the wire ------------------------------------------------------------------------------------------------
    async def rpc_call(self, request: runtime_pb2.ExpertRequest, context: P2PContext) -> runtime_pb2.ExpertResponse:
        tensors, meta = await self.handle(request.uid, request.tensors, request.metadata, _peer(context))
        protos, raw = wire.pack(tensors, meta)
        return runtime_pb2.ExpertResponse(tensors=protos, metadata=raw)

    async def rpc_call_stream(self, requests: AsyncIterator[runtime_pb2.ExpertRequest], context: P2PContext
                              ) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        op, protos, raw = await wire.join_stream(requests)
        tensors, meta = await self.handle(op, protos, raw, _peer(context))
        protos, raw = wire.pack(tensors, meta)
        for msg in wire.stream_parts(runtime_pb2.ExpertResponse, "", protos, raw):
            yield msg

    async def handle(self, op: str, protos, raw: bytes, peer: str = "") -> tuple[list[torch.Tensor], dict[str, Any]]:
        """Run one operation for `peer` (its id); a request it refuses is answered with an error reply
        (wire.error_reply) that names the problem in one line, and the server goes on."""
        self.stats["requests"] += 1
        try:
            meta = wire.unpack_meta(raw)
            tensors = wire.unpack_tensors(protos)
            self._expire()
            if op == "info":
                return [], self.info()
            if op == "open":
                return [], self._open(meta, peer)
            if op == "close":
                s = self.sessions.get(str(meta.get("session")))
                if s is not None and s.peer == peer:  # only its opener may close a session
                    del self.sessions[str(meta.get("session"))]
                return [], {}
            if op == "step":
                s, calls = self._step_args(meta, tensors, peer)
                self._check_tokens(tensors)
                outs = await self._run(self._step, s, tensors, calls)
                self.stats["steps"] += len(calls)
                return outs, {}
            if op in ("forward", "backward"):
                a, b = self._blocks(meta)
                want = 1 if op == "forward" else 2
                if len(tensors) != want:
                    raise BadMessage(f"{op} takes {want} tensor(s), got {len(tensors)}")
                x = self._check_x(tensors[0], MAX_BATCH, self.max_pos)
                self._check_tokens([x])
                if op == "backward":
                    g = tensors[1]
                    if g.shape != x.shape or g.dtype != x.dtype or not torch.isfinite(g).all():
                        raise BadMessage(f"grad_out must be finite {x.dtype} {tuple(x.shape)} like x")
                    self.stats["backwards"] += 1
                    return [await self._run(self._backward, x, g, a, b)], {}
                self.stats["forwards"] += 1
                return [await self._run(self._forward, x, a, b)], {}
            raise BadMessage(f"unknown operation {op[:40]!r}")
        except wire.REFUSALS as e:
            self.stats["errors"] += 1
            return [], wire.error_reply(e)

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # --- checks ----------------------------------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "dim": self.dim, "dtype": str(self.dtype).replace("torch.", ""),
                "max_pos": self.max_pos, "sessions": len(self.sessions), "cache_free": self.cache_free(),
                "version": __version__, "fingerprints": self.fingerprints,
                "max_request_tokens": self.max_request_tokens, "max_sessions_per_peer": self.max_sessions_per_peer,
                "peer_cache_bytes": self.peer_cache_bytes, **self.stats}

    def cache_free(self) -> int:
        return self.max_cache_bytes - sum(s.nbytes for s in self.sessions.values())

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [sid for sid, s in self.sessions.items() if now - s.used > self.session_timeout]:
            del self.sessions[sid]

    def free_disconnected(self, connected: set[str], grace: float = DISCONNECT_GRACE) -> int:
        """Free the sessions of peers no longer connected, idle `grace` seconds at least (a client that comes back
        finds them gone and replays its history elsewhere or here); returns how many."""
        now = time.monotonic()
        gone = [sid for sid, s in self.sessions.items() if s.peer not in connected and now - s.used > grace]
        for sid in gone:
            del self.sessions[sid]
        return len(gone)

    def _check_tokens(self, xs: list[torch.Tensor]) -> None:
        n = sum(x.shape[0] * x.shape[1] for x in xs)
        if n > self.max_request_tokens:
            raise BadMessage(f"refused: {n} rows x positions in one request, over this server's limit of "
                             f"{self.max_request_tokens} (--max-request-tokens); send it in parts")

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

    def _open(self, meta, peer: str = "") -> dict[str, Any]:
        sid = meta.get("session")
        if not isinstance(sid, str) or not 8 <= len(sid) <= 64:
            raise BadMessage("session must be a string of 8 to 64 characters")
        if sid in self.sessions:
            raise BadMessage("that session is open already")
        batch = _int(meta.get("batch"), "batch", 1, MAX_BATCH)
        max_len = _int(meta.get("max_len"), "max_len", 1, self.max_pos)
        a, b = self._blocks(meta)
        mine = [s for s in self.sessions.values() if s.peer == peer]
        if len(mine) >= self.max_sessions_per_peer:
            raise BadMessage(f"refused: this peer holds {len(mine)} sessions, the most one peer may "
                             f"(--max-sessions-per-peer {self.max_sessions_per_peer}); close some first")
        nbytes = 2 * (b - a) * batch * max_len * self.dim * self.dtype.itemsize
        if nbytes > self.cache_free():
            raise BadMessage(f"refused: a session of {nbytes / 2**20:.1f} MiB of cache does not fit in the "
                             f"{self.cache_free() / 2**20:.1f} MiB left")
        held = sum(s.nbytes for s in mine)
        if held + nbytes > self.peer_cache_bytes:
            raise BadMessage(f"refused: a session of {nbytes / 2**20:.1f} MiB of cache would take this peer's "
                             f"sessions over the {self.peer_cache_bytes / 2**20:.1f} MiB one peer may hold "
                             f"(--peer-cache-share {self.peer_cache_share:g} of --max-cache-mb; it holds "
                             f"{held / 2**20:.1f} MiB)")
        dev = next(self.stack.parameters()).device
        caches = [KVCache(batch, self.heads, max_len, self.dim // self.heads, dev, self.dtype) for _ in range(a, b)]
        self.sessions[sid] = Session(caches, batch, max_len, a, b, nbytes, time.monotonic(), peer)
        self.stats["sessions_opened"] += 1
        return {"cache_free": self.cache_free()}

    def _step_args(self, meta, tensors, peer: str = "") -> tuple[Session, list[Step]]:
        s = self.sessions.get(str(meta.get("session")))
        if s is None or s.peer != peer:  # a session id is its opener's alone
            raise UnknownSession("unknown session (never opened, closed, or expired)")
        s.used = time.monotonic()
        calls = meta.get("calls")
        if not isinstance(calls, list) or not 1 <= len(calls) == len(tensors) or len(calls) > 1 << 16:
            raise BadMessage("step takes a list of calls and one tensor per call")
        checked = []
        dev = next(self.stack.parameters()).device
        for c, x in zip(calls, tensors, strict=False):
            x = self._check_x(x, s.batch, s.max_len)
            checked.append(step_from_wire(c, x.shape[0], x.shape[1], s.batch, s.max_len, dev))
        return s, checked

    # --- compute (in the worker thread) ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _step(self, s: Session, xs, calls) -> list[torch.Tensor]:
        return [self.stack.run_blocks(x, s.a, s.b, s.caches, c) for x, c in zip(xs, calls, strict=False)]

    @torch.inference_mode()
    def _forward(self, x, a, b) -> torch.Tensor:
        return self.stack.run_blocks(x, a, b)

    def _backward(self, x, g, a, b) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.stack.run_blocks(x, a, b), x, g)
        return grad


# --- the process --------------------------------------------------------------------------------------------------
def _peer(context: P2PContext) -> str:
    return context.remote_id.to_base58() if context.remote_id is not None else ""


def measure_request_tokens(stack: TransformerStack, seconds: float = MAX_REQUEST_SECONDS) -> int:
    """Rows x positions this span computes in about `seconds` (one forward of one row, timed after a first one), and
    never fewer than one row of the stack's max positions (so that any one row fits in a request)."""
    p = next(stack.parameters())
    x = torch.zeros(1, min(stack.max_pos, 128), stack.dim, dtype=p.dtype, device=p.device)
    with torch.inference_mode():
        stack.run_blocks(x, 0, len(stack.blocks))
        t0 = time.perf_counter()
        stack.run_blocks(x, 0, len(stack.blocks))
        dt = max(time.perf_counter() - t0, 1e-6)
    return max(stack.max_pos, int(x.shape[1] * seconds / dt))


def measure_throughput(stack: TransformerStack, steps: int = 8) -> float:
    """Decode steps per second through the whole span for one row (what announcements and routing compare)."""
    caches = stack.new_caches(1, steps + 1, next(stack.parameters()).device, next(stack.parameters()).dtype)
    x = torch.zeros(1, 1, stack.dim, dtype=next(stack.parameters()).dtype)
    with torch.inference_mode():
        stack(x, caches, Step.make([0], [0], 1, x.device))
        t0 = time.perf_counter()
        for p in range(1, steps + 1):
            stack(x, caches, Step.make([0], [p], p + 1, x.device))
    return steps / max(time.perf_counter() - t0, 1e-6)


def run_server(model: str, swarm: str, blocks: tuple[int, int] | None = None, num_blocks: int | None = None,
               initial_peers: list[str] = (), host: str = "127.0.0.1", port: int = 0, max_cache_mb: float = 1024,
               announce_period: float = 30.0, session_timeout: float = 60.0, throughput: float | None = None,
               threads: int | None = None, log=print, max_sessions_per_peer: int = 16, peer_cache_share: float = 0.5,
               max_request_tokens: int | None = None) -> None:
    """Serve until SIGINT/SIGTERM: join the swarm's DHT, take a span, load it (fingerprinting its blocks), announce
    it, answer requests. max_request_tokens None: what the span computes in about a second (at least max positions)."""
    from ..errors import UsageError
    from ..models import read_config

    if threads:
        torch.set_num_threads(threads)
    for ok, why in [(max_sessions_per_peer >= 1, "--max-sessions-per-peer must be >= 1"),
                    (0 < peer_cache_share <= 1, "--peer-cache-share must be in (0, 1]"),
                    (session_timeout > 0, "--session-timeout must be > 0"),
                    (max_cache_mb > 0, "--max-cache-mb must be > 0")]:
        if not ok:
            raise UsageError(why)
    config = read_config(model)
    _, depth = remote_stack(config)
    loaded = None if blocks is None else load_span_fingerprinted(model, *blocks)  # a bad span fails before joining
    stack = None if loaded is None else loaded[1]

    def check_tokens(stack):
        if max_request_tokens is not None and max_request_tokens < stack.max_pos:
            raise UsageError(f"--max-request-tokens must be at least the {stack.max_pos} positions of one whole row")

    if stack is not None:
        check_tokens(stack)
    dht = DHT(initial_peers=list(initial_peers), host_maddrs=[f"/ip4/{host}/tcp/{port}"], start=True)
    dht.run_coroutine(partial(_exit_with_parent, parent=os.getpid()), return_future=True)
    try:
        if blocks is None:
            start, end = choose_span(servers(dht, swarm, depth), depth, num_blocks or depth)
            loaded = load_span_fingerprinted(model, start, end)
            stack = loaded[1]
            check_tokens(stack)
        else:
            start, end = blocks
        tp = throughput or measure_throughput(stack)
        server = SpanServer(stack, start, end, max_cache_bytes=int(max_cache_mb * 2**20),
                            session_timeout=session_timeout, fingerprints=loaded[2],
                            max_sessions_per_peer=max_sessions_per_peer, peer_cache_share=peer_cache_share,
                            max_request_tokens=max_request_tokens or measure_request_tokens(stack))
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
        return ServerInfo(server.start, server.end, tp, server.cache_free(), state, __version__, server.fingerprints)

    async def free_disconnected():
        while True:
            await asyncio.sleep(DISCONNECT_CHECK)
            with contextlib.suppress(Exception):  # the daemon may be going away
                server.free_disconnected({i.peer_id.to_base58() for i in await p2p.list_peers()})

    watcher = asyncio.create_task(free_disconnected())

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
    watcher.cancel()
    await loop.run_in_executor(None, announce, dht, swarm, peer, info(OFFLINE), period * 3, 5.0)
    with contextlib.suppress(Exception):  # Ctrl-C reaches the p2p daemon too: it may be gone already
        await server.remove_p2p_handlers(p2p)
        await wire.shutdown_replica(p2p)
    log(f"stopped serving blocks {server.start}:{server.end}")


def new_session_id() -> str:
    return secrets.token_hex(16)


__all__ = ["SpanServer", "measure_request_tokens", "measure_throughput", "new_session_id", "run_server"]
