"""Who serves what: servers' announcements in hivemind's DHT, the span a new server should take, and a client's route
through the servers (after Petals' block selection and routing, re-implemented on the DHT alone).

Announcements: one DHT key per block, `{swarm}.{block}`, and under it one subkey per server (its peer id), holding a
`ServerInfo` as a plain dict; each expires after `ttl` seconds, so a server re-announces every ttl / 3 and a dead one
drops out by itself. A server that stops cleanly announces itself offline first. An announcement carries the
fingerprints of the server's blocks (bytelm.swarm.spans), which a client compares with its model's.
"""

from __future__ import annotations

import heapq
import math
import re
import time
from dataclasses import asdict, dataclass, field
from functools import partial

from hivemind.dht import DHT
from hivemind.utils import get_dht_time

ONLINE, OFFLINE = "online", "offline"
FINGERPRINT = re.compile(r"[0-9a-f]{16}")


@dataclass
class ServerInfo:
    start: int  # blocks start..end-1
    end: int
    throughput: float  # decode steps per second through its whole span (one row)
    cache_free: int  # bytes of KV cache it can still give to new sessions
    state: str = ONLINE
    version: str = ""
    fingerprints: list[str] = field(default_factory=list)  # of blocks start..end-1, in order; [] for none announced

    @classmethod
    def parse(cls, value) -> ServerInfo | None:
        """A ServerInfo from a DHT value, or None for anything malformed (announcements are other people's data)."""
        try:
            info = cls(**value)
            ok = (isinstance(info.start, int) and isinstance(info.end, int) and 0 <= info.start < info.end
                  and not isinstance(info.start, bool) and not isinstance(info.end, bool)
                  and isinstance(info.throughput, (int, float)) and math.isfinite(info.throughput)
                  and info.throughput > 0 and isinstance(info.cache_free, int) and info.state in (ONLINE, OFFLINE)
                  and isinstance(info.version, str) and len(info.version) <= 64
                  and isinstance(info.fingerprints, list)
                  and (info.fingerprints == [] or (len(info.fingerprints) == info.end - info.start and all(
                      isinstance(f, str) and FINGERPRINT.fullmatch(f) for f in info.fingerprints))))
            return info if ok else None
        except TypeError:
            return None

    def mismatches(self, expected: list[str] | tuple[str, ...]) -> list[int]:
        """The blocks whose announced fingerprint is not `expected[block]` (all of them when none is announced)."""
        if not self.fingerprints:
            return list(range(self.start, self.end))
        return [b for b, f in zip(range(self.start, self.end), self.fingerprints, strict=True) if f != expected[b]]


async def _store(dht, node, keys, values, expiration, subkeys):  # runs in the DHT's process (hence module level)
    return await node.store_many(keys, values, expiration, subkeys=subkeys)


async def _get(dht, node, keys):
    return await node.get_many(keys, sufficient_expiration_time=float("inf"))


def announce(dht: DHT, swarm: str, peer_id: str, info: ServerInfo, ttl: float, timeout: float = 30.0) -> bool:
    """Store the announcement under every block of the span; False if the DHT did not take it in time."""
    keys = [f"{swarm}.{b}" for b in range(info.start, info.end)]
    future = dht.run_coroutine(partial(_store, keys=keys, values=[asdict(info)] * len(keys),
                                       expiration=get_dht_time() + ttl, subkeys=[peer_id] * len(keys)),
                               return_future=True)
    try:
        return all(future.result(timeout=timeout).values())
    except Exception:  # a timeout, or the DHT's process is gone (Ctrl-C reaches the whole process group)
        return False


def servers(dht: DHT, swarm: str, depth: int) -> dict[str, ServerInfo]:
    """The online servers of a swarm: peer id -> its announcement (one whose blocks disagree across keys is
    skipped)."""
    found = dht.run_coroutine(partial(_get, keys=[f"{swarm}.{b}" for b in range(depth)]))
    out: dict[str, ServerInfo] = {}
    for entry in found.values():
        if entry is None or not isinstance(entry.value, dict):
            continue
        for peer, sub in entry.value.items():
            info = ServerInfo.parse(getattr(sub, "value", None))
            if info is None or info.state != ONLINE or info.end > depth or not isinstance(peer, str):
                continue
            if peer in out and asdict(out[peer]) != asdict(info):
                continue  # announcements from two moments; the next look will agree
            out[peer] = info
    return out


def coverage(infos: dict[str, ServerInfo], depth: int) -> list[float]:
    """The swarm's throughput at each block: the sum over the servers holding it."""
    cov = [0.0] * depth
    for info in infos.values():
        for b in range(info.start, info.end):
            cov[b] += info.throughput
    return cov


def choose_span(infos: dict[str, ServerInfo], depth: int, n: int) -> tuple[int, int]:
    """The n contiguous blocks a new server should take: where the swarm is weakest (Petals' rule: the span whose
    least-served block has the least throughput; ties: the least total, then the first)."""
    n = min(n, depth)
    cov = coverage(infos, depth)
    start = min(range(depth - n + 1), key=lambda s: (min(cov[s:s + n]), sum(cov[s:s + n]), s))
    return start, start + n


@dataclass
class Bans:
    """Servers a client avoids for a while after they fail: 15 s, doubling with each failure in a row (Petals'
    rule), up to 5 minutes; a server caught lying is avoided for good."""

    base: float = 15.0
    cap: float = 300.0
    until: dict[str, float] = field(default_factory=dict)
    strikes: dict[str, int] = field(default_factory=dict)

    def ban(self, peer: str, forever: bool = False) -> None:
        self.strikes[peer] = self.strikes.get(peer, 0) + 1
        wait = math.inf if forever else min(self.cap, self.base * 2 ** (self.strikes[peer] - 1))
        self.until[peer] = time.monotonic() + wait

    def ok(self, peer: str) -> None:
        self.strikes.pop(peer, None)

    def banned(self, peer: str) -> bool:
        return self.until.get(peer, 0.0) > time.monotonic()


HOP_SECONDS = 0.01  # what one more server in the chain costs beyond its compute: a round trip on a good network


def route(infos: dict[str, ServerInfo], start: int, end: int, avoid=lambda peer: False,
          rtt: dict[str, float] | None = None, cache_per_block: int = 0) -> list[tuple[str, int, int]]:
    """The cheapest chain of (peer, a, b) covering blocks start..end-1: shortest path over block boundaries, where
    serving blocks a..b-1 costs a server its round trip plus (b - a) / (its throughput per block), and a server
    whose announced free cache is under (b - a) * cache_per_block bytes cannot serve them. [] if none."""
    rtt = rtt or {}
    best = {start: 0.0}
    prev: dict[int, tuple[int, str]] = {}
    heap = [(0.0, start)]
    while heap:
        cost, a = heapq.heappop(heap)
        if a == end:
            break
        if cost > best.get(a, math.inf):
            continue
        for peer, info in sorted(infos.items()):
            if not info.start <= a < info.end or avoid(peer):
                continue
            per_block = 1.0 / (info.throughput * (info.end - info.start))
            for b in range(a + 1, min(info.end, end) + 1):
                if info.cache_free < (b - a) * cache_per_block:
                    break
                c = cost + rtt.get(peer, HOP_SECONDS) + (b - a) * per_block
                if c < best.get(b, math.inf):
                    best[b], prev[b] = c, (a, peer)
                    heapq.heappush(heap, (c, b))
    if end not in prev and start != end:
        return []
    chain, b = [], end
    while b != start:
        a, peer = prev[b]
        chain.append((peer, a, b))
        b = a
    return chain[::-1]
