"""The client side of a swarm: a model whose remote stack runs on other machines, with everything else at home.

    remote_model(MODEL, initial_peers)  a ByteLM like any other (generate, stream, the decoding engine, loss,
                                        LoRA): MEGABYTE's global model is a `RemoteStack`, a chain of servers;
                                        embeddings, the local model, the final norm and the head are local
    RemoteStack                         TransformerStack's interface (forward(x, caches, step),
                                        new_caches) over the swarm: caches are a `RemoteSession`
    RemoteSession                       one decoding state's chain of server sessions, with the history of calls
                                        each was sent: a failed server's part is re-routed and its history replayed,
                                        so the new caches equal the lost ones and the output is unchanged
    SwarmClient                         the DHT, the RPCs, the servers known, bans, spot checks, traffic counters

Routing and bans: bytelm.swarm.registry. Training goes through `forward`/`backward` RPCs (stateless), one autograd
Function per server in the chain: servers return the gradient for their input and never change their weights.

Which servers are used at all: those whose announced fingerprints (one per block, bytelm.swarm.spans) equal the
model's. A server of other weights under the same swarm name (another model, a fine-tune, a changed file) is refused
and never routed to. An announcement is the server's word, not a proof: a server that announces the right
fingerprints and computes something else is caught only by the spot checks (`verify_fraction`), like any liar.

Work larger than a server's `max_request_tokens` (rows x positions in one request, from its `info`) is sent in
parts: a step's calls over several requests, a call's or a training batch's rows in chunks (rows are independent in
every block).
"""

from __future__ import annotations

import asyncio
import atexit
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from hivemind.dht import DHT
from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2
from torch import nn

from ..errors import BytelmError, UnknownSession
from ..io import WEIGHTS_NAME
from ..nn import Step, TransformerStack
from . import wire
from .registry import Bans, ServerInfo, route, servers
from .server import SpanServer, new_session_id
from .spans import client_weights, fingerprints, load_client_parts, remote_stack
from .wire import SwarmError, step_to_wire


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
            self.infos, self.others = {}, {}
            for peer, info in found.items():
                differ = [] if self.fingerprints is None else info.mismatches(self.fingerprints)
                if differ:
                    self.others[peer] = (info, differ)
                else:
                    self.infos[peer] = info
            for peer in self.infos:
                if peer not in self.rtt and not self._avoid(peer):
                    try:
                        self.rtt[peer] = min(self._ping(peer) for _ in range(2))  # the first also connects
                    except ServerFailed:
                        self.bans.ban(peer)
        return self.infos

    def _avoid(self, peer: str) -> bool:
        return peer in self.liars or self.bans.banned(peer)

    def route(self, a: int, b: int, exclude: tuple[str, ...] = (), cache_per_block: int = 0
              ) -> list[tuple[str, int, int]]:
        """The best chain of (peer, a, b) over blocks a..b-1 among servers not banned (and with cache_per_block
        bytes of free cache per block); SwarmError if there is none."""
        for force in (False, True):
            chain = route(self.refresh(force), a, b, lambda p: self._avoid(p) or p in exclude, self.rtt,
                          cache_per_block)
            if chain:
                return chain
        known = ", ".join(f"{p[-8:]} {i.start}:{i.end}{' (avoided)' if self._avoid(p) else ''}"
                          for p, i in sorted(self.infos.items())) or "none"
        others = [f"{p[-8:]} {i.start}:{i.end}" for p, (i, _) in sorted(self.others.items())
                  if i.start < b and a < i.end]
        refused = (f"; refused {len(others)} server(s) of this swarm name with other weights ({', '.join(others)}): "
                   "they serve another model or fine-tune" if others else "")
        raise SwarmError(f"no server of swarm {self.swarm} with this model's weights can serve blocks {a}:{b} now "
                         f"(servers: {known}){refused}")

    def holders(self, a: int, b: int, exclude=()) -> list[str]:
        """Servers holding all of blocks a..b-1, fastest first."""
        infos = self.refresh()
        return sorted((p for p, i in infos.items() if i.start <= a and b <= i.end and not self._avoid(p)
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
                out = self._arbitrate(peer, out, a, b, lambda p: self._checked(p, op, tensors,
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

    def _arbitrate(self, peer: str, out: torch.Tensor, a: int, b: int, rerun, first_other=None):
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


# --- decoding sessions ------------------------------------------------------------------------------------------------
@dataclass
class Segment:
    """One server's part of a session's chain: blocks a..b-1, and every call it was sent (its inputs)."""

    peer: str
    a: int
    b: int
    sid: str
    history: list[tuple[torch.Tensor, dict]] = field(default_factory=list)
    verifier: Segment | None = None
    synced: int = 0  # calls of `history` the verifier has seen


class RemoteSession:
    """The remote stack's KV caches for `batch` rows of up to `max_len` positions: a chain of server sessions."""

    def __init__(self, client: SwarmClient, batch: int, max_len: int, dim: int, itemsize: int = 4) -> None:
        self.client, self.batch, self.max_len = client, batch, max_len
        self.cache_per_block = 2 * batch * max_len * dim * itemsize  # keys and values: what a server must hold
        self.chain: list[Segment] | None = None
        self.live: list[set[int]] = []  # per call of the history: the rows it wrote that no later prefill rewrote

    def _open(self, peer: str, a: int, b: int) -> Segment:
        seg = Segment(peer, a, b, new_session_id())
        self.client.call(peer, "open", [], {"session": seg.sid, "batch": self.batch, "max_len": self.max_len,
                                            "start": a, "end": b})
        return seg

    def _send(self, seg: Segment, xs: list[torch.Tensor], calls: list[dict]) -> list[torch.Tensor]:
        """Calls to seg's server, in as many requests as its max_request_tokens needs (in order: each call sees the
        caches the previous ones wrote); a call over the limit alone goes in chunks of its rows."""
        limit = self.client.limits.get(seg.peer)
        if limit is None or sum(x.shape[0] * x.shape[1] for x in xs) <= limit:
            outs, _ = self.client.call(seg.peer, "step", xs, {"session": seg.sid, "calls": calls})
            check_outputs(seg.peer, outs, xs)
            return outs
        pieces: list[tuple[int, torch.Tensor, dict]] = []  # (which call, x, call) small enough to send
        for j, (x, c) in enumerate(zip(xs, calls, strict=True)):
            per = max(1, limit // x.shape[1])
            if x.shape[0] <= per:
                pieces.append((j, x, c))
                continue
            for i in range(0, x.shape[0], per):  # rows are independent: a chunk of them is a call of its own
                part = {k: c[k] if k == "span" or c[k] is None else c[k][i:i + per] for k in c}
                pieces.append((j, x[i:i + per], part))
        parts: list[list[torch.Tensor]] = [[] for _ in xs]
        while pieces:
            batch, size = [], 0
            while pieces and (not batch or size + pieces[0][1].shape[0] * pieces[0][1].shape[1] <= limit):
                batch.append(pieces.pop(0))
                size += batch[-1][1].shape[0] * batch[-1][1].shape[1]
            sent = [p[1] for p in batch]
            outs, _ = self.client.call(seg.peer, "step", sent, {"session": seg.sid, "calls": [p[2] for p in batch]})
            check_outputs(seg.peer, outs, sent)
            for (j, _, _), o in zip(batch, outs, strict=True):
                parts[j].append(o)
        return [p[0] if len(p) == 1 else torch.cat(p) for p in parts]

    def _build(self, a: int, b: int, history: list[tuple[torch.Tensor, dict]]) -> list[Segment]:
        """Open sessions on the best chain over a..b-1 and replay `history` (the calls block a was sent) through
        it, so the new caches are the ones lost; servers that fail on the way are banned and routed around."""
        c = self.client
        for _ in range(c.max_failures):
            segs: list[Segment] = []
            try:
                xs, calls = [h[0] for h in history], [h[1] for h in history]
                for peer, a2, b2 in c.route(a, b, cache_per_block=self.cache_per_block):
                    seg = self._open(peer, a2, b2)
                    segs.append(seg)
                    if xs:
                        outs = self._send(seg, xs, calls)
                        c.stats["replayed_calls"] += len(xs)
                        seg.history = list(zip(xs, calls, strict=False))
                        xs = outs
                return segs
            except ServerFailed as e:
                c.bans.ban(e.peer)
                for s in segs:
                    self._close(s)
        raise SwarmError(f"could not rebuild blocks {a}:{b} after {c.max_failures} failed servers")

    def step(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        call = step_to_wire(step)
        c = self.client
        if self.chain is None:
            self.chain = self._build(0, c.depth, [])
        try:
            h = self._through_chain(x.detach(), call)
        except BaseException:  # the step did not happen: no segment may keep it in its history
            for seg in self.chain:
                if seg.history and seg.history[-1][1] is call:
                    seg.history.pop()
            raise
        self._forget(call)
        return h

    def _through_chain(self, h: torch.Tensor, call: dict) -> torch.Tensor:
        c, i, failures = self.client, 0, 0
        while i < len(self.chain):
            seg = self.chain[i]
            try:
                out = self._send(seg, [h], [call])[0]
            except ServerFailed as e:
                failures += 1
                if failures > c.max_failures:
                    raise SwarmError(f"blocks {seg.a}:{seg.b} failed {failures} times in one step; last: {e}") from None
                if not e.session_lost:  # not an idle session the server let go: a failed server
                    c.bans.ban(seg.peer)
                c.stats["failovers"] += 1
                self._close(seg)
                self._close(seg.verifier)
                self.chain[i:i + 1] = self._build(seg.a, seg.b, seg.history)
                continue
            c.bans.ok(seg.peer)
            if c.verify_fraction and c.rng.random() < c.verify_fraction:
                out = self._verify(seg, h, call, out)
            seg.history.append((h, call))
            h, i = out, i + 1
        return h

    def _forget(self, call: dict) -> None:
        """Keep the history as short as the caches need: a prefill of rows from position 0 rewrites them, so calls
        before it that wrote only such rows are dropped (a long-running engine's history stays bounded by its
        live rows). Rows are independent in every block, so what replaying the rest gives the live rows is
        unchanged."""
        fresh = {r for r, p in zip(call["rows"], call["pos"], strict=True) if p == 0}
        for live in self.live:
            live -= fresh
        self.live.append(set(call["rows"]))
        drop = {j for j, live in enumerate(self.live) if not live}
        if not drop:
            return
        self.live = [live for j, live in enumerate(self.live) if j not in drop]
        for seg in self.chain:
            seg.history = [h for j, h in enumerate(seg.history) if j not in drop]
            seg.synced -= sum(1 for j in drop if j < seg.synced)  # the verifier holds those rows' old values: fine

    def _verify(self, seg: Segment, x: torch.Tensor, call: dict, out: torch.Tensor) -> torch.Tensor:
        """Spot check a step: a second server holding seg's blocks (kept in step by replaying what it missed) runs
        it too; on disagreement a third, replaying everything, decides. A liar primary is replaced by the verifier,
        whose caches are in step already."""
        c = self.client
        if seg.verifier is None or c._avoid(seg.verifier.peer):
            others = c.holders(seg.a, seg.b, exclude=(seg.peer,))
            if not others:
                return out
            try:
                seg.verifier, seg.synced = self._open(others[0], seg.a, seg.b), 0
            except ServerFailed as e:
                c.bans.ban(e.peer)
                return out
        v = seg.verifier
        todo = seg.history[seg.synced:] + [(x, call)]
        fresh = {}

        def rerun(peer: str) -> torch.Tensor:
            if peer == v.peer:
                outs = self._send(v, [t[0] for t in todo], [t[1] for t in todo])
                seg.synced = len(seg.history) + 1
                return outs[-1]
            s = self._open(peer, seg.a, seg.b)  # a referee: everything from the start
            everything = seg.history + [(x, call)]
            fresh[peer] = s
            return self._send(s, [t[0] for t in everything], [t[1] for t in everything])[-1]

        try:
            agreed = c._arbitrate(seg.peer, out, seg.a, seg.b, rerun, first_other=v.peer)
        except ServerFailed as e:
            if e.peer == v.peer and e.session_lost:  # idle too long there: a new verifier next time
                seg.verifier = None
            else:
                c.bans.ban(e.peer)
            for s in fresh.values():
                self._close(s)
            return out
        if seg.peer in c.liars:  # the verifier takes over; the referee, in step too, becomes the verifier
            self._close(Segment(seg.peer, seg.a, seg.b, seg.sid))
            seg.peer, seg.sid = v.peer, v.sid
            ref = next(iter(fresh.values()), None)
            seg.verifier, seg.synced = ref, len(seg.history) + 1
        elif v.peer in c.liars:
            self._close(v)
            ref = next(iter(fresh.values()), None)
            seg.verifier, seg.synced = ref, len(seg.history) + 1
        for s in fresh.values():
            if s is not seg.verifier:
                self._close(s)
        return agreed

    def _close(self, seg: Segment | None) -> None:
        if seg is None:
            return
        protos, raw = wire.pack([], {"session": seg.sid})
        coro = self.client._call(seg.peer, "close", protos, raw)
        RemoteExpertWorker.run_coroutine(_quietly(coro), return_future=True)  # best effort, not waited for

    def close(self) -> None:
        for seg in self.chain or []:
            self._close(seg)
            self._close(seg.verifier)
        self.chain = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


async def _quietly(coro) -> None:
    try:
        await coro
    except Exception:
        pass


# --- the model's stand-in -----------------------------------------------------------------------------------------
class _RemoteBlocks(torch.autograd.Function):
    """Blocks a..b-1 on a server: forward there, and backward there too (the input's gradient, weights frozen)."""

    @staticmethod
    def forward(ctx, x, client: SwarmClient, peer: str, a: int, b: int):
        ctx.client, ctx.peer, ctx.a, ctx.b = client, peer, a, b
        ctx.save_for_backward(x)
        return client.stateless("forward", [x.detach()], a, b, prefer=peer)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        grad = ctx.client.stateless("backward", [x.detach(), g.contiguous()], ctx.a, ctx.b, prefer=ctx.peer)
        return grad, None, None, None, None


class RemoteStack(nn.Module):
    """A TransformerStack whose blocks run on the swarm; its final norm (and rope, unused here) stay local."""

    def __init__(self, client: SwarmClient, stack: TransformerStack, depth: int) -> None:
        super().__init__()
        self.client, self.depth = client, depth
        self.dim, self.heads, self.max_pos = stack.dim, stack.heads, stack.max_pos
        self.norm = stack.norm

    def forward(self, x: torch.Tensor, caches: RemoteSession | None = None, step: Step | None = None
                ) -> torch.Tensor:
        if caches is not None:
            return self.norm(caches.step(x, step))
        h = x
        for peer, a, b in self.client.route(0, self.depth):
            h = _RemoteBlocks.apply(h, self.client, peer, a, b)
        return self.norm(h)

    def new_caches(self, batch: int, max_len: int, device, dtype) -> RemoteSession:
        return RemoteSession(self.client, batch, max_len, self.dim, torch.empty((), dtype=dtype).element_size())


def remote_model(model: str, initial_peers: list[str], swarm: str | None = None, **client_options):
    """MODEL (a model folder, run folder or hub id) with its remote stack served by the swarm reached through
    `initial_peers`: a ByteLM whose `.swarm` is its SwarmClient. Only the weights outside the remote stack are held;
    the blocks' are read once, a tensor at a time, for their fingerprints (which servers must announce to be used)."""
    config, weights = client_weights(model)
    _, depth = remote_stack(config)
    prints = fingerprints(model)
    client = SwarmClient(swarm or prints.name, depth, initial_peers, fingerprints=prints.blocks, **client_options)
    try:
        m = load_client_parts(config, weights, lambda cfg, stack: RemoteStack(client, stack, depth),
                              f"{model} ({WEIGHTS_NAME})")
    except BytelmError:
        client.close()
        raise
    m.swarm = client
    return m


__all__ = ["RemoteSession", "RemoteStack", "ServerFailed", "SwarmClient", "SwarmError", "remote_model"]
