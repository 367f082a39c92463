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

Routing and bans: bytelm.swarm.registry; the DHT, the RPCs and the spot-check rule: bytelm.swarm.peers.
Training goes through `forward`/`backward` RPCs (stateless), one autograd
Function per server in the chain: servers return the gradient for their input and never change their weights.

Work larger than a server's `max_request_tokens` (rows x positions in one request, from its `info`) is sent in
parts: a step's calls over several requests, a call's or a training batch's rows in chunks (rows are independent in
every block).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import BytelmError
from ..io import WEIGHTS_NAME
from ..nn import Step, TransformerStack
from .peers import ServerFailed, SwarmClient, check_outputs
from .server import new_session_id
from .spans import client_weights, fingerprints, load_client_parts, remote_stack
from .wire import SwarmError, step_to_wire


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
        if seg.verifier is None or c.avoided(seg.verifier.peer):
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
            agreed = c.arbitrate(seg.peer, out, seg.a, seg.b, rerun, first_other=v.peer)
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
        self.client.close_session(seg.peer, seg.sid)

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
