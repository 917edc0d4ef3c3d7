"""The playground of `tunelab studio`: any finished run answers through `tunelab serve`'s own app.

A run is loaded by `tunelab.serve.load_served` and wrapped in `tunelab.serve.create_app`, with its
model worker started, so the studio's `/play/<run>/-/v1/classify`, `/v1/entities`, `/v1/predict`,
`/v1/answer` and `/v1/chat/completions` (streamed) are exactly serve's endpoints, limits and
errors. At most `KEEP` runs stay loaded; the least recently used one is closed (its worker joined)
to make room for another.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from tunelab.errors import TunelabError
from tunelab.serve.app import create_app
from tunelab.serve.loading import load_served
from tunelab.studio.security import Refused, inside

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
KEEP = 2  # loaded runs; each holds a model in memory
SEPARATOR = "/-/"  # /play/<run>/-/v1/...: run names may hold slashes (runs of a compare)


class Playground:
    """An ASGI app (mounted at /play) that hands each request to its run's serve app."""

    def __init__(self, runs: Path) -> None:
        self.runs = runs
        self.apps: OrderedDict[str, FastAPI] = OrderedDict()
        self.lock = asyncio.Lock()

    async def app_for(self, name: str) -> FastAPI:
        """The serve app of run `name`, loaded on first use (in a thread: loading takes seconds)."""
        async with self.lock:
            if name in self.apps:
                self.apps.move_to_end(name)
                return self.apps[name]
            path = inside(self.runs, name)
            if not (path / "eval.json").is_file():
                raise Refused(404, f"{name} is not a finished run")
            try:
                run = await asyncio.to_thread(load_served, path)
            except TunelabError as e:
                raise Refused(400, str(e)) from None
            app = create_app(run, name=name)
            app.state.served.worker.start()  # the serve app's lifespan would; a mounted app has none
            self.apps[name] = app
            while len(self.apps) > KEEP:
                _, old = self.apps.popitem(last=False)
                await asyncio.to_thread(old.state.served.worker.stop)
            return app

    def close(self) -> None:
        for app in self.apps.values():
            app.state.served.worker.stop()
        self.apps.clear()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        rest = path.split("/play/", 1)[-1] if "/play/" in path else path.lstrip("/")
        if SEPARATOR not in "/" + rest:
            await reply(send, 404, "use /play/<run>/-/<endpoint>")
            return
        name, endpoint = ("/" + rest).split(SEPARATOR, 1)
        try:
            app = await self.app_for(name.strip("/"))
        except Refused as e:
            await reply(send, e.status, e.message)
            return
        inner = dict(scope, path="/" + endpoint, raw_path=("/" + endpoint).encode(), root_path="")
        await app(inner, receive, send)


async def reply(send: Send, status: int, message: str) -> None:
    """An error in serve's shape, so the page reads every refusal the same way."""
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": None}}).encode()  # fmt: skip
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
