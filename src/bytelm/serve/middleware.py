"""The server's outermost layer, below FastAPI, in the order a request meets it: the `Host` header (on a loopback
server), the API key, then the body, read whole within its size limit and its time limit, all before any handler
parses a byte of it; and every response counted by the route it reached."""

from __future__ import annotations

import asyncio
import json
import secrets

from .protocol import error_body

# Open without a key: probes and scrapers hold none, and the playground page is what asks the user for one.
OPEN_PATHS = frozenset({"/health", "/metrics", "/", "/openapi.json"})
OPEN_PREFIXES = ("/static/",)
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")  # the names a loopback server is reached by


class Guard:
    """Pure ASGI middleware (it leaves streaming and disconnects alone, unlike BaseHTTPMiddleware).

    - `allowed_hosts` (None: any): a `Host` header naming another host is a 400. A server on loopback without a key
      is otherwise reachable from any web page the user opens, through DNS rebinding (a name of the attacker's that
      resolves to 127.0.0.1: the browser sends its `Host`); `bytelm serve` sets it when bound to loopback.
    - `api_key` (None: none): every path but the open ones needs `Authorization: Bearer KEY`, else a 401, before
      the body is read (so a bad body never tells a keyless client anything).
    - the body: over `limit` bytes is a 413, whether its Content-Length says so or a chunked body grows past it; a
      body that stops arriving for `timeout` seconds is a 408. The handler then reads it from memory.
    - `count(scope, status)` for every response (metrics.route_label names its route).
    """

    def __init__(self, app, limit: int, count, timeout: float = 30.0, api_key: str | None = None,
                 allowed_hosts: tuple[str, ...] | None = None) -> None:
        self.app, self.limit, self.count, self.timeout = app, limit, count, timeout
        self.key = None if api_key is None else f"Bearer {api_key}".encode()
        self.hosts = None if allowed_hosts is None else frozenset(h.lower() for h in allowed_hosts)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(msg):
            if msg["type"] == "http.response.start":
                self.count(scope, msg["status"])
            await send(msg)

        refusal = self._refusal(scope)
        if refusal is None:
            refusal, receive = await self._read_body(scope, receive)
        if refusal is not None:
            return await _answer(counted, *refusal)
        await self.app(scope, receive, counted)

    def _refusal(self, scope) -> tuple | None:
        headers = dict(scope["headers"])
        if self.hosts is not None:
            host = headers.get(b"host")
            if host is not None and _hostname(host.decode("latin-1")) not in self.hosts:
                return (400, f"Host header {host.decode('latin-1')!r} is not one this server answers to (it is on "
                        f"loopback: {', '.join(sorted(self.hosts))}; bytelm serve --allowed-hosts adds names)",
                        "invalid_request_error", "host_not_allowed")
        path = scope["path"]
        if self.key is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            if not secrets.compare_digest(headers.get(b"authorization", b""), self.key):
                return (401, "missing or wrong API key (send 'Authorization: Bearer KEY')", "authentication_error",
                        "invalid_api_key")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return self._too_large()
        return None

    def _too_large(self) -> tuple:
        return 413, f"request body over the server's limit of {self.limit} bytes", "invalid_request_error", \
            "request_too_large"

    async def _read_body(self, scope, receive):
        """(refusal or None, the receive the app gets): the whole body read here, then handed over in one message;
        after it the app's receive is the server's own (which says `http.disconnect` when the client goes)."""
        if scope["method"] in ("GET", "HEAD"):
            return None, receive
        chunks, seen, more = [], 0, True
        while more:
            try:
                msg = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                return (408, f"the request body stopped arriving for {self.timeout:g} s", "invalid_request_error",
                        "request_timeout"), receive
            if msg["type"] == "http.disconnect":
                return None, _replay({"type": "http.disconnect"}, receive)
            chunks.append(msg.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return self._too_large(), receive
            more = msg.get("more_body", False)
        return None, _replay({"type": "http.request", "body": b"".join(chunks), "more_body": False}, receive)


def _replay(first: dict, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return first
        return await receive()

    return replayed


def _hostname(host: str) -> str:
    """A Host header's name without its port: 'localhost:8000' -> 'localhost', '[::1]:8000' -> '[::1]'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _answer(send, status: int, message: str, type_: str, code: str) -> None:
    body = json.dumps(error_body(message, type_, code=code)).encode()  # ASCII: any header echoed in it is escaped
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if status in (408, 413):
        headers.append((b"connection", b"close"))  # the rest of the body is not read
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
