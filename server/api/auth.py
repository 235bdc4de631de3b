"""Bearer-token auth for /v1/* (as vLLM's --api-key): /health, /metrics etc. stay open.

Several keys may be configured (one per client, so a key can be rotated or revoked alone).
The header is compared against every key, each in constant time and without stopping at a
match, so the response time says nothing about which key, or how much of one, matched.

A plain ASGI middleware rather than a FastAPI dependency, so that a request with a wrong key is
refused before its body is read or validated.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import send_error


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_keys: Sequence[str]) -> None:
        if not api_keys:
            raise ValueError("APIKeyMiddleware needs at least one key")
        self.app = app
        self._expected = [f"Bearer {key}".encode() for key in api_keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        if not (path == "/v1" or path.startswith("/v1/")):
            await self.app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
                break
        matched = False
        for expected in self._expected:
            matched |= hmac.compare_digest(given, expected)
        if matched:
            await self.app(scope, receive, send)
            return
        message = (
            "Incorrect API key provided."
            if given
            else "Missing API key: send the header 'Authorization: Bearer <key>'."
        )
        await send_error(
            send, message, 401, code="invalid_api_key", headers=((b"www-authenticate", b"Bearer"),)
        )
