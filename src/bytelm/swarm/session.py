"""A decoding state on the swarm: the remote stack's caches held by a chain of server sessions, kept equal to the
caches the model would hold at home whatever the servers do.

    ServerSession   one session on one server over blocks a..b-1: open, run calls, close
    split           calls cut into requests that fit a server's max_request_tokens
    History         every call a link was sent (inputs and wire steps): replayed on a fresh session, the same caches
    LiveRows        which calls of the history still hold some row's caches (the others are forgotten)
    Verifier        spot checks of one link with a second server kept in step, a third to decide
    Link            blocks a..b-1 of the chain: its server session, history and verifier
    RemoteSession   the chain: routes it, fails over by replaying history, forgets, spot checks
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..nn import Step
from .peers import ServerFailed, SwarmClient, check_outputs
from .server import new_session_id
from .wire import SwarmError, step_to_wire

Piece = tuple[int, torch.Tensor, dict]  # (which call, its input or a chunk of its rows, the call for those rows)


def _size(x: torch.Tensor) -> int:
    return x.shape[0] * x.shape[1]  # rows x positions: what max_request_tokens counts


def split(xs: list[torch.Tensor], calls: list[dict], limit: int) -> list[list[Piece]]:
    """Requests of at most `limit` tokens, in order (each call sees the caches the previous ones wrote); a call over
    the limit alone goes in chunks of its rows (rows are independent: a chunk of them is a call of its own)."""
    pieces: list[Piece] = []
    for j, (x, c) in enumerate(zip(xs, calls, strict=True)):
        per = max(1, limit // x.shape[1])
        if x.shape[0] <= per:
            pieces.append((j, x, c))
            continue
        for i in range(0, x.shape[0], per):
            pieces.append((j, x[i:i + per], {k: c[k] if k == "span" or c[k] is None else c[k][i:i + per] for k in c}))
    requests: list[list[Piece]] = []
    size = 0
    for p in pieces:
        if not requests or size + _size(p[1]) > limit:
            requests.append([])
            size = 0
        requests[-1].append(p)
        size += _size(p[1])
    return requests


@dataclass(frozen=True)
class ServerSession:
    """One session on one server over blocks a..b-1."""

    client: SwarmClient
    peer: str
    a: int
    b: int
    sid: str

    @classmethod
    def open(cls, client: SwarmClient, peer: str, a: int, b: int, batch: int, max_len: int) -> ServerSession:
        s = cls(client, peer, a, b, new_session_id())
        client.call(peer, "open", [], {"session": s.sid, "batch": batch, "max_len": max_len, "start": a, "end": b})
        return s

    def run(self, xs: list[torch.Tensor], calls: list[dict]) -> list[torch.Tensor]:
        """The calls' outputs, in as many requests as the server's max_request_tokens needs."""
        limit = self.client.limits.get(self.peer)
        if limit is None or sum(_size(x) for x in xs) <= limit:
            return self._request(xs, calls)
        parts: list[list[torch.Tensor]] = [[] for _ in xs]
        for request in split(xs, calls, limit):
            outs = self._request([x for _, x, _ in request], [c for _, _, c in request])
            for (j, _, _), o in zip(request, outs, strict=True):
                parts[j].append(o)
        return [p[0] if len(p) == 1 else torch.cat(p) for p in parts]

    def _request(self, xs: list[torch.Tensor], calls: list[dict]) -> list[torch.Tensor]:
        outs, _ = self.client.call(self.peer, "step", xs, {"session": self.sid, "calls": calls})
        check_outputs(self.peer, outs, xs)
        return outs

    def close(self) -> None:
        self.client.close_session(self.peer, self.sid)


class History:
    """Every call a link was sent, in order: its input and its wire step. Replaying them on a fresh session over
    the same blocks gives the same caches."""

    def __init__(self, xs: list[torch.Tensor] | None = None, calls: list[dict] | None = None) -> None:
        self.xs, self.calls = list(xs or []), list(calls or [])

    def __len__(self) -> int:
        return len(self.calls)

    def append(self, x: torch.Tensor, call: dict) -> None:
        self.xs.append(x)
        self.calls.append(call)

    def since(self, start: int) -> tuple[list[torch.Tensor], list[dict]]:
        return self.xs[start:], self.calls[start:]

    def replay(self, server: ServerSession, x: torch.Tensor, call: dict, start: int = 0) -> torch.Tensor:
        """`server`, which has seen the calls before `start`, runs the rest and then (x, call): the last output."""
        xs, calls = self.since(start)
        return server.run(xs + [x], calls + [call])[-1]

    def undo(self, call: dict) -> None:
        """Take back `call` if it is the last one (a step that failed further down the chain did not happen)."""
        if self.calls and self.calls[-1] is call:
            self.xs.pop()
            self.calls.pop()

    def forget(self, drop: set[int]) -> None:
        self.xs = [x for j, x in enumerate(self.xs) if j not in drop]
        self.calls = [c for j, c in enumerate(self.calls) if j not in drop]


class LiveRows:
    """Per call of a session's history, the rows it wrote that no later prefill rewrote. A prefill of rows from
    position 0 rewrites them, so a call left with none is not needed to rebuild the caches: rows are independent in
    every block, so replaying the rest gives the live rows the same values, and a long-running engine's history stays
    bounded by its live rows."""

    def __init__(self) -> None:
        self.live: list[set[int]] = []

    def __len__(self) -> int:
        return len(self.live)

    def add(self, call: dict) -> set[int]:
        """Count `call` in; the indices of the calls no longer needed (forgotten here too)."""
        fresh = {r for r, p in zip(call["rows"], call["pos"], strict=True) if p == 0}
        for live in self.live:
            live -= fresh
        self.live.append(set(call["rows"]))
        drop = {j for j, live in enumerate(self.live) if not live}
        self.live = [live for j, live in enumerate(self.live) if j not in drop]
        return drop


Opener = Callable[[str, int, int], ServerSession]  # (peer, a, b) -> a new session shaped like the chain's


class Verifier:
    """Spot checks of one link: a second server over its blocks runs the step too, kept in step by replaying the
    calls it missed (`synced`: how many of the link's history it has seen); if the two disagree, a third, replaying
    everything, decides (the client's `arbitrate`). A lying primary is replaced by the verifier, whose caches are in
    step already, and the third, in step too, becomes the verifier."""

    def __init__(self, client: SwarmClient, open_session: Opener) -> None:
        self.client, self.open = client, open_session
        self.server: ServerSession | None = None
        self.synced = 0

    def check(self, primary: ServerSession, history: History, x: torch.Tensor, call: dict, out: torch.Tensor
              ) -> tuple[torch.Tensor, ServerSession]:
        """The agreed output of the step (`out` from `primary`) and the session that serves the link from now on."""
        if not self._ready(primary):
            return out, primary
        referees: dict[str, ServerSession] = {}

        def rerun(peer: str) -> torch.Tensor:  # the verifier catches up; anyone else referees from the start
            if peer == self.server.peer:
                got, self.synced = history.replay(self.server, x, call, self.synced), len(history) + 1
                return got
            referees[peer] = self.open(peer, primary.a, primary.b)
            return history.replay(referees[peer], x, call)

        try:
            agreed = self.client.arbitrate(primary.peer, out, primary.a, primary.b, rerun, first_other=self.server.peer)
        except ServerFailed as e:
            if e.peer == self.server.peer and e.session_lost:  # idle too long there: a new verifier next time
                self.server = None
            else:
                self.client.bans.ban(e.peer)
            for s in referees.values():
                s.close()
            return out, primary
        return agreed, self._settle(primary, len(history) + 1, referees)

    def _settle(self, primary: ServerSession, synced: int, referees: dict[str, ServerSession]) -> ServerSession:
        """After a check, the session that serves the link from now on (the verifier's if the primary lied): a liar's
        session is closed and the referee, in step with `synced` calls, becomes the verifier."""
        liar = next((s for s in (primary, self.server) if s.peer in self.client.liars), None)
        serving = self.server if liar is primary else primary
        if liar is not None:
            liar.close()
            self.server, self.synced = next(iter(referees.values()), None), synced
        for s in referees.values():
            if s is not self.server:
                s.close()
        return serving

    def _ready(self, primary: ServerSession) -> bool:
        """A verifier session on a server other than the primary, not avoided; False if there is none to be had."""
        if self.server is not None and not self.client.avoided(self.server.peer):
            return True
        others = self.client.holders(primary.a, primary.b, exclude=(primary.peer,))
        if not others:
            return False
        try:
            self.server, self.synced = self.open(others[0], primary.a, primary.b), 0
        except ServerFailed as e:
            self.client.bans.ban(e.peer)
            return False
        return True

    def forget(self, drop: set[int]) -> None:
        self.synced -= sum(1 for j in drop if j < self.synced)  # the verifier holds those rows' old values: fine

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@dataclass
class Link:
    """Blocks a..b-1 of a session's chain: the server session serving them, every call they were sent, and the
    verifier that spot checks them."""

    server: ServerSession
    history: History
    verifier: Verifier

    @property
    def a(self) -> int:
        return self.server.a

    @property
    def b(self) -> int:
        return self.server.b

    def close(self) -> None:
        self.server.close()
        self.verifier.close()


class RemoteSession:
    """The remote stack's KV caches for `batch` rows of up to `max_len` positions: a chain of links over the blocks.
    A failed server's link is rebuilt on other servers by replaying its history, so the new caches equal the lost
    ones and the output is unchanged."""

    def __init__(self, client: SwarmClient, batch: int, max_len: int, dim: int, itemsize: int = 4) -> None:
        self.client, self.batch, self.max_len = client, batch, max_len
        self.cache_per_block = 2 * batch * max_len * dim * itemsize  # keys and values: what a server must hold
        self.chain: list[Link] | None = None
        self.live = LiveRows()

    def step(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        call = step_to_wire(step)
        if self.chain is None:
            self.chain = self._build(0, self.client.depth, History())
        try:
            h = self._through_chain(x.detach(), call)
        except BaseException:  # the step did not happen: no link may keep it in its history
            for link in self.chain:
                link.history.undo(call)
            raise
        drop = self.live.add(call)
        if drop:
            for link in self.chain:
                link.history.forget(drop)
                link.verifier.forget(drop)
        return h

    def _through_chain(self, h: torch.Tensor, call: dict) -> torch.Tensor:
        c, i, failures = self.client, 0, 0
        while i < len(self.chain):
            link = self.chain[i]
            try:
                out = link.server.run([h], [call])[0]
            except ServerFailed as e:
                failures += 1
                if failures > c.max_failures:
                    raise SwarmError(f"blocks {link.a}:{link.b} failed {failures} times in one step; last: {e}"
                                     ) from None
                self._fail_over(i, e)
                continue
            c.bans.ok(link.server.peer)
            if c.verify_fraction and c.rng.random() < c.verify_fraction:
                out, link.server = link.verifier.check(link.server, link.history, h, call, out)
            link.history.append(h, call)
            h, i = out, i + 1
        return h

    def _fail_over(self, i: int, e: ServerFailed) -> None:
        """Link i is rebuilt by replaying its history on the best chain over its blocks: the caches come back as
        they were."""
        link = self.chain[i]
        if not e.session_lost:  # not an idle session the server let go: a failed server
            self.client.bans.ban(link.server.peer)
        self.client.stats["failovers"] += 1
        link.close()
        self.chain[i:i + 1] = self._build(link.a, link.b, link.history)

    def _build(self, a: int, b: int, history: History) -> list[Link]:
        """Open sessions on the best chain over a..b-1 and replay `history` (the calls block a was sent) through
        it, so the new caches are the ones lost; servers that fail on the way are banned and routed around."""
        c = self.client
        for _ in range(c.max_failures):
            links: list[Link] = []
            try:
                xs, calls = history.since(0)
                for peer, a2, b2 in c.route(a, b, cache_per_block=self.cache_per_block):
                    links.append(Link(self._open(peer, a2, b2), History(xs, calls), Verifier(c, self._open)))
                    if xs:
                        xs = links[-1].server.run(xs, calls)
                        c.stats["replayed_calls"] += len(calls)
                return links
            except ServerFailed as e:
                c.bans.ban(e.peer)
                for link in links:
                    link.close()
        raise SwarmError(f"could not rebuild blocks {a}:{b} after {c.max_failures} failed servers")

    def _open(self, peer: str, a: int, b: int) -> ServerSession:
        return ServerSession.open(self.client, peer, a, b, self.batch, self.max_len)

    def close(self) -> None:
        for link in self.chain or []:
            link.close()
        self.chain = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


__all__ = ["History", "LiveRows", "RemoteSession", "ServerSession", "Verifier", "split"]
