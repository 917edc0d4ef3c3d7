"""The guard in front of the `tunelab serve` app (ASGI middleware): a request body over
`--max-body-kb` is refused with 413 before it is read (by its Content-Length, or, for a chunked
body, as soon as the part received passes the limit), and a client that stalls while sending its
body is answered 408 after `--body-timeout-s`. A slow or oversized client then holds one connection
for a bounded time and never reaches the model worker.

Written by hand because neither Starlette nor uvicorn limits the size of a request body or the
time taken to send it (uvicorn bounds header size, open connections and idle keep-alive; those are
set in `app.serve`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunelab.serve.schemas import error_body


def too_large(limit_kb: int) -> str:
    return f"the request body is over the limit of {limit_kb} KB; send less (the server's --max-body-kb)"


class BodyGuard:
    """ASGI middleware: 413 for a body over `max_body_kb`, 408 for a body that stops arriving."""

    def __init__(self, app: ASGIApp, max_body_kb: int, timeout_s: float) -> None:
        self.app, self.limit_kb, self.timeout_s = app, max_body_kb, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_kb * 1024
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"").decode("latin-1").strip()
        if declared.isdigit() and int(declared) > limit:  # refused before a byte of the body is read
            await refuse(send, 413, too_large(self.limit_kb))
            return
        received, complete = 0, False

        async def guarded() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: later receives wait for a disconnect, for as long as it takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except asyncio.TimeoutError:
                raise HTTPException(
                    408, f"the request body stopped arriving for {self.timeout_s:.0f} s"
                ) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if received > limit:  # FastAPI hands an HTTPException raised here to the app's handler
                    raise HTTPException(413, too_large(self.limit_kb))
            else:
                complete = True
            return message

        await self.app(scope, guarded, send)


async def refuse(send: Send, status: int, message: str) -> None:
    """Answer with the OpenAI-style error body and close the connection (its body is left unread)."""
    body = json.dumps(error_body(message, "invalid_request_error")).encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    start: dict[str, Any] = {"type": "http.response.start", "status": status, "headers": headers}
    await send(start)
    await send({"type": "http.response.body", "body": body})
