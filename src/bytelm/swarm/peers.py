"""The servers a swarm client knows and the requests it sends them: `SwarmClient` holds the DHT, the RPCs, the
servers' announcements and limits, bans and liars, the spot-check rule and the traffic counters; training's
stateless `forward`/`backward` run here (a request over a server's `max_request_tokens` goes in chunks of rows:
rows are independent in every block). Decoding sessions are built on it in bytelm.swarm.session.

Which servers are used at all: those whose announced fingerprints (one per block, bytelm.swarm.spans) equal the
model's. A server of other weights under the same swarm name (another model, a fine-tune, a changed file) is refused
and never routed to. An announcement is the server's word, not a proof: a server that announces the right
fingerprints and computes something else is caught only by the spot checks (`verify_fraction`), like any liar.
"""

from __future__ import annotations

import asyncio
import atexit
import random
import re
import time
from collections.abc import Sequence
from typing import Any

import torch
from hivemind.dht import DHT
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from ..errors import UnknownSession
from . import wire
from .registry import Bans, ServerInfo, route, servers
from .server import SpanServer
from .wire import SwarmError


class ServerFailed(Exception):
    """One server did not answer, answered with an error, or answered something that cannot be right. `error`: the
    error it answered with, as its type (wire.error_of), or None."""

    def __init__(self, peer: str, why: str, error: Exception | None = None) -> None:
        super().__init__(f"server {peer[-8:]}: {why}")
        self.peer, self.error = peer, error

    @property
    def session_lost(self) -> bool:
        """The server let the session go (idle too long), which is no fault of the server's."""
        return isinstance(self.error, UnknownSession)


def _short(e: BaseException) -> str:
    """One line of an error: hivemind reports a handler's exception as "... at PEER: ValueError('why')"."""
    lines = str(e).strip().splitlines()
    text = lines[-1] if lines else type(e).__name__
    m = re.search(r"\w+\((['\"])(.*)\1\)$", text)
    return (m[2] if m else text)[:300]


def _agree(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= tol * max(1.0, float(b.abs().max())))


class SwarmClient:
    """`fingerprints`: the model's, one per block (bytelm.swarm.spans.fingerprints(...).blocks); servers announcing
    others are refused (`others`). None accepts any server of the swarm (for tools that only look)."""

    def __init__(self, swarm: str, depth: int, initial_peers: list[str], *, request_timeout: float = 30.0,
                 refresh_period: float = 5.0, ban_seconds: float = 15.0, verify_fraction: float = 0.0,
                 verify_tolerance: float = 1e-3, max_failures: int = 8, seed: int | None = None,
                 fingerprints: Sequence[str] | None = None) -> None:
        if not 0.0 <= verify_fraction <= 1.0:
            raise SwarmError(f"verify_fraction must be in [0, 1], got {verify_fraction}")
        if fingerprints is not None and len(fingerprints) != depth:
            raise SwarmError(f"{len(fingerprints)} fingerprints for {depth} blocks")
        self.swarm, self.depth = swarm, depth
        self.fingerprints = None if fingerprints is None else tuple(fingerprints)
        self.others: dict[str, tuple[ServerInfo, list[int]]] = {}  # refused: other weights (the blocks that differ)
        self.old: dict[str, ServerInfo] = {}  # refused: a bytelm whose calls differ from ours (wire.speaks_our_wire)
        self.limits: dict[str, int] = {}  # max_request_tokens of each server, from its info
        self.request_timeout, self.refresh_period, self.max_failures = request_timeout, refresh_period, max_failures
        self.verify_fraction, self.verify_tolerance = verify_fraction, verify_tolerance
        self.rng = random.Random(seed)
        self.bans = Bans(base=ban_seconds)
        self.liars: set[str] = set()
        self.infos: dict[str, ServerInfo] = {}
        self.rtt: dict[str, float] = {}  # seconds, measured once per server
        self._seen = -1e9
        self.stats = {"messages": 0, "bytes_sent": 0, "bytes_received": 0, "failovers": 0, "verified": 0,
                      "replayed_calls": 0}
        try:
            self.dht = DHT(initial_peers=list(initial_peers), client_mode=True, start=True)
        except Exception as e:
            raise SwarmError(f"cannot join the swarm through {', '.join(initial_peers) or 'no initial peers'}: "
                             f"{_short(e)}") from None
        self.p2p = RemoteExpertWorker.run_coroutine(self.dht.replicate_p2p())
        atexit.register(self.close)  # before interpreter shutdown, where hivemind's P2P.__del__ would print tracebacks

    def close(self) -> None:
        if self.p2p is not None:
            RemoteExpertWorker.run_coroutine(wire.shutdown_replica(self.p2p))
            self.p2p = None
            self.dht.shutdown()

    # --- who serves what ---------------------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> dict[str, ServerInfo]:
        """The announcements of the servers with the model's weights, looked up again when older than
        refresh_period (the others are kept in `others`, never used); a server seen for the first time is pinged
        (its round trip is what routing charges for one more hop)."""
        if force or time.monotonic() - self._seen > self.refresh_period:
            found, self._seen = servers(self.dht, self.swarm, self.depth), time.monotonic()
            self.infos, self.others, self.old = {}, {}, {}
            for peer, info in found.items():
                differ = [] if self.fingerprints is None else info.mismatches(self.fingerprints)
                if not wire.speaks_our_wire(info.version):
                    self.old[peer] = info
                elif differ:
                    self.others[peer] = (info, differ)
                else:
                    self.infos[peer] = info
            for peer in self.infos:
                if peer not in self.rtt and not self.avoided(peer):
                    try:
                        self.rtt[peer] = min(self._ping(peer) for _ in range(2))  # the first also connects
                    except ServerFailed:
                        self.bans.ban(peer)
        return self.infos

    def avoided(self, peer: str) -> bool:
        """Caught lying, or banned for now."""
        return peer in self.liars or self.bans.banned(peer)

    def route(self, a: int, b: int, exclude: tuple[str, ...] = (), cache_per_block: int = 0
              ) -> list[tuple[str, int, int]]:
        """The best chain of (peer, a, b) over blocks a..b-1 among servers not banned (and with cache_per_block
        bytes of free cache per block); SwarmError if there is none."""
        for force in (False, True):
            chain = route(self.refresh(force), a, b, lambda p: self.avoided(p) or p in exclude, self.rtt,
                          cache_per_block)
            if chain:
                return chain
        known = ", ".join(f"{p[-8:]} {i.start}:{i.end}{' (avoided)' if self.avoided(p) else ''}"
                          for p, i in sorted(self.infos.items())) or "none"
        others = [f"{p[-8:]} {i.start}:{i.end}" for p, (i, _) in sorted(self.others.items())
                  if i.start < b and a < i.end]
        refused = (f"; refused {len(others)} server(s) of this swarm name with other weights ({', '.join(others)}): "
                   "they serve another model or fine-tune" if others else "")
        old = [f"{p[-8:]} {i.start}:{i.end} (bytelm {i.version or '?'})" for p, i in sorted(self.old.items())
               if i.start < b and a < i.end]
        if old:
            refused += f"; refused {len(old)} server(s) running a bytelm whose calls differ ({', '.join(old)}): " \
                       "upgrade them"
        raise SwarmError(f"no server of swarm {self.swarm} with this model's weights can serve blocks {a}:{b} now "
                         f"(servers: {known}){refused}")

    def holders(self, a: int, b: int, exclude=()) -> list[str]:
        """Servers holding all of blocks a..b-1, fastest first."""
        infos = self.refresh()
        return sorted((p for p, i in infos.items() if i.start <= a and b <= i.end and not self.avoided(p)
                       and p not in exclude), key=lambda p: -infos[p].throughput)

    # --- one request ---------------------------------------------------------------------------------------------
    def call(self, peer: str, op: str, tensors: list[torch.Tensor], meta: dict[str, Any]
             ) -> tuple[list[torch.Tensor], dict[str, Any]]:
        protos, raw = wire.pack(tensors, meta)
        self.stats["messages"] += 1
        self.stats["bytes_sent"] += wire.size_of(protos) + len(raw)
        try:
            out_protos, out_raw = RemoteExpertWorker.run_coroutine(self._call(peer, op, protos, raw))
            outs, out_meta = wire.unpack_tensors(out_protos), wire.unpack_meta(out_raw)
        except (Exception, asyncio.CancelledError) as e:  # the daemon's, the handler's, a timeout, a bad reply
            why = "no answer in time" if isinstance(e, (asyncio.TimeoutError, TimeoutError)) else _short(e)
            raise ServerFailed(peer, why) from None
        self.stats["bytes_received"] += wire.size_of(out_protos) + len(out_raw)
        error = wire.error_of(out_meta)
        if error is not None:
            raise ServerFailed(peer, str(error), error)
        return outs, out_meta

    async def _call(self, peer: str, op: str, protos, raw: bytes):
        stub = SpanServer.get_stub(self.p2p, PeerID.from_base58(peer))
        if not wire.is_large(protos):
            msg = await stub.rpc_call(runtime_pb2.ExpertRequest(uid=op, tensors=protos, metadata=raw),
                                      timeout=self.request_timeout)
            return list(msg.tensors), msg.metadata

        async def streamed():
            async def requests():
                for m in wire.stream_parts(runtime_pb2.ExpertRequest, op, protos, raw):
                    yield m
            _, tensors, meta = await wire.join_stream(await stub.rpc_call_stream(requests()))
            return tensors, meta
        return await asyncio.wait_for(streamed(), timeout=self.request_timeout)

    def _ping(self, peer: str) -> float:
        t0 = time.perf_counter()
        info = self.info(peer)
        dt = time.perf_counter() - t0
        limit = info.get("max_request_tokens")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 1:
            self.limits[peer] = limit
        return dt

    def info(self, peer: str) -> dict[str, Any]:
        return self.call(peer, "info", [], {})[1]

    def close_session(self, peer: str, sid: str) -> None:
        """Best effort, not waited for: a server that is gone or slow lets the session go by itself when idle."""
        protos, raw = wire.pack([], {"session": sid})
        RemoteExpertWorker.run_coroutine(_quietly(self._call(peer, "close", protos, raw)), return_future=True)

    # --- stateless (training) -----------------------------------------------------------------------------------------
    def stateless(self, op: str, tensors: list[torch.Tensor], a: int, b: int, prefer: str | None = None
                  ) -> torch.Tensor:
        """forward or backward over blocks a..b-1 on any server holding them all (the preferred one first), trying
        the next on failure; with spot checks, a fraction re-run on a second server."""
        tried: list[str] = []
        while True:
            peers = self.holders(a, b, exclude=tuple(tried))
            if prefer in peers:
                peers.remove(prefer)
                peers.insert(0, prefer)
            if not peers or len(tried) >= self.max_failures:
                raise SwarmError(f"no server could run {op} over blocks {a}:{b}"
                                 f"{' (tried ' + ', '.join(p[-8:] for p in tried) + ')' if tried else ''}")
            peer = peers[0]
            try:
                out = self._checked(peer, op, tensors, {"start": a, "end": b}, tensors[0])
            except ServerFailed:
                self.bans.ban(peer)
                tried.append(peer)
                self.stats["failovers"] += 1
                continue
            self.bans.ok(peer)
            if self.verify_fraction and self.rng.random() < self.verify_fraction:
                out = self.arbitrate(peer, out, a, b, lambda p: self._checked(p, op, tensors,
                                                                                {"start": a, "end": b}, tensors[0]))
            return out

    def _checked(self, peer: str, op: str, tensors, meta, like: torch.Tensor) -> torch.Tensor:
        """One stateless request, in chunks of rows when it is over the server's max_request_tokens."""
        n, t = like.shape[:2]
        per = max(1, self.limits.get(peer, n * t) // t)
        outs = []
        for i in range(0, n, per):
            part = [x[i:i + per] for x in tensors]
            got, _ = self.call(peer, op, part, meta)
            check_outputs(peer, got, part[:1])
            outs.append(got[0])
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def arbitrate(self, peer: str, out: torch.Tensor, a: int, b: int, rerun, first_other=None):
        """Spot check: `out` (from `peer`) against a second server's `rerun(p)`; if they disagree, a third decides,
        and whoever it contradicts is banned for good. Returns the agreed output."""
        self.stats["verified"] += 1
        others = self.holders(a, b, exclude=(peer,))
        if first_other is None:
            if not others:
                return out  # nobody to compare with
            first_other = others.pop(0)
        check = rerun(first_other)
        if _agree(out, check, self.verify_tolerance):
            return out
        thirds = [p for p in others if p != first_other]
        if not thirds:
            raise SwarmError(f"servers {peer[-8:]} and {first_other[-8:]} disagree on blocks {a}:{b} and no third "
                             "server holds them to tell which is right")
        referee = rerun(thirds[0])
        if _agree(referee, check, self.verify_tolerance):
            self.liars.add(peer)
            return check
        self.liars.add(first_other)
        if not _agree(referee, out, self.verify_tolerance):
            self.liars.add(peer)
            raise SwarmError(f"three servers disagree on blocks {a}:{b}; all three are avoided from now on")
        return out


def check_outputs(peer: str, outs: list[torch.Tensor], likes: list[torch.Tensor]) -> None:
    if len(outs) != len(likes):
        raise ServerFailed(peer, f"sent {len(outs)} outputs for {len(likes)} inputs")
    for o, x in zip(outs, likes, strict=False):
        if o.shape != x.shape or o.dtype != x.dtype:
            raise ServerFailed(peer, f"sent {o.dtype} {tuple(o.shape)} for {x.dtype} {tuple(x.shape)}")
        if not torch.isfinite(o).all():
            raise ServerFailed(peer, "sent inf or nan")


async def _quietly(coro) -> None:
    try:
        await coro
    except Exception:
        pass


__all__ = ["ServerFailed", "SwarmClient", "check_outputs"]
