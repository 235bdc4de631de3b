"""Server-sent events, as OpenAI streams them: `data: <json>\\n\\n` ... `data: [DONE]\\n\\n`.

`SSEResponse` watches for the client going away *while* it streams and always closes the body
generator, which closes the engine streams under it (aborting their requests and freeing their
KV blocks). Starlette's StreamingResponse, under ASGI spec >= 2.4 (uvicorn), notices a gone
client only at the next write and never closes the generator, so a request that is queued or
between tokens would keep running for nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

DONE = b"data: [DONE]\n\n"


def sse_event(payload: BaseModel | dict[str, Any], exclude: set[str] | None = None) -> bytes:
    if isinstance(payload, BaseModel):
        data = payload.model_dump_json(exclude=exclude)
    else:
        data = json.dumps(payload)
    return b"data: " + data.encode() + b"\n\n"


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(
            content,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            media_type="text/event-stream",
        )
        self._body = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def stream() -> None:
            with contextlib.suppress(OSError):  # the client went away mid-write
                await self.stream_response(send)

        async def wait_for_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        streaming = asyncio.ensure_future(stream())
        watching = asyncio.ensure_future(wait_for_disconnect())
        try:
            await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (streaming, watching):
                task.cancel()
            results = await asyncio.gather(streaming, watching, return_exceptions=True)
            # Idempotent: a no-op when the generator ran to its end or was cancelled inside.
            aclose = getattr(self._body, "aclose", None)
            if aclose is not None:
                await aclose()
        for result in results:
            if isinstance(result, Exception):
                logger.error("SSE stream failed", exc_info=result)
