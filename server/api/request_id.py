"""Echoes a client's X-Request-Id on the response, as proxies and vLLM do, so a client or a
load balancer can match answers and logs. A plain ASGI middleware: it also covers error
responses and streams, whatever route or handler produced them."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class RequestIdMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers", [])).get(b"x-request-id")
        if not given:
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", given)]
            await send(message)

        await self.app(scope, receive, send_with_id)
