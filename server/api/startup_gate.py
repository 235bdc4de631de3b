"""The HTTP server is up while the model loads: a load balancer or Kubernetes sees a live
process that is not ready yet, instead of a refused connection it cannot tell from a crash.

Until the engine has started, ``StartupGate`` answers on its own: `/health` 200 (the process
is alive; a liveness probe must not kill a replica for loading slowly), `/ready` 503 with code
`loading` (503 `draining` once SIGTERM came), `/metrics` an empty scrape, `/version`, and every
other route 503 `loading` with `Retry-After`, which nginx and clients retry elsewhere. Once the
engine is up, ``open`` hands every request to the real app.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.drain import DrainState
from server.api.errors import send_error

# Seconds a client is told to wait before retrying a replica that is still loading.
LOADING_RETRY_AFTER_S = 5


class StartupGate:
    def __init__(self, drain: DrainState, version: str) -> None:
        self._drain = drain
        self._version = version.encode()
        self._app: ASGIApp | None = None

    @property
    def is_open(self) -> bool:
        return self._app is not None

    def open(self, app: FastAPI) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is not None:
            await self._app(scope, receive, send)
            return
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        if path == "/health":
            await _send(send, 200, b"", b"text/plain")
        elif path == "/metrics":
            # An empty scrape, not an error: the replica is up (Prometheus' `up` = 1).
            await _send(send, 200, b"", b"text/plain; version=0.0.4; charset=utf-8")
        elif path == "/version":
            await _send(send, 200, b'{"version":"' + self._version + b'"}', b"application/json")
        elif self._drain.draining:
            await send_error(
                send,
                "The server is shutting down; retry on another replica",
                503,
                code="draining",
                headers=((b"retry-after", b"1"),),
            )
        else:
            await send_error(
                send,
                "The model is still loading; retry shortly",
                503,
                code="loading",
                headers=((b"retry-after", str(LOADING_RETRY_AFTER_S).encode()),),
            )


async def _send(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _lifespan(receive: Receive, send: Send) -> None:
    """The real app has no start-up or shut-down hooks; the gate acknowledges uvicorn's."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
