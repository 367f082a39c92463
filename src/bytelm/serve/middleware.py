"""The server's outermost layer, below FastAPI: every response counted, and bodies over the limit refused."""

from __future__ import annotations

import json

from .protocol import ApiError, error_body


class Guard:
    """Pure ASGI middleware (it leaves streaming and disconnects alone, unlike BaseHTTPMiddleware): counts responses
    by path and status, and refuses a body over the limit with 413 before it is read (Content-Length) or as soon as
    it passes the limit (a chunked body)."""

    def __init__(self, app, limit: int, count) -> None:
        self.app, self.limit, self.count = app, limit, count

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counted(msg):
            if msg["type"] == "http.response.start":
                self.count(scope["path"], msg["status"])
            await send(msg)

        await self._guarded(scope, receive, counted)

    async def _guarded(self, scope, receive, send):
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            body = json.dumps(error_body(f"request body over the server's limit of {self.limit} bytes",
                                         code="request_too_large")).encode()
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]})
            return await send({"type": "http.response.body", "body": body})
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                raise ApiError(413, f"request body over the server's limit of {self.limit} bytes")
            return msg

        await self.app(scope, limited, send)
