"""The `tunelab studio` application: `create_app` puts the pages, the API, the playground and the
static files behind the access check; `studio` runs it under uvicorn and prints where it listens
(with the token when one is needed, as Jupyter does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from tunelab.errors import TunelabError
from tunelab.studio.jobs import Jobs
from tunelab.studio.playground import Playground, Receive, Scope, Send, reply
from tunelab.studio.reviews import ReviewMount
from tunelab.studio.routes import router
from tunelab.studio.security import (
    CSRF_COOKIE,
    CSRF_HEADER,
    TOKEN_COOKIE,
    is_loopback,
    new_token,
    presented_token,
    same,
    token_needed,
)

STATIC = Path(__file__).parent / "static"
# hosts a loopback-bound studio answers to: a page of another site that rebinds its own name to
# 127.0.0.1 (DNS rebinding) sends its own name as Host, and is refused
LOCAL_NAMES = {"localhost", "127.0.0.1", "[::1]", "::1"}


@dataclass
class Studio:
    """What every handler shares."""

    runs: Path
    data: Path
    reviews: Path
    host: str
    token: str
    jobs: Jobs
    playground: Playground


class Guard:
    """ASGI middleware: the access token, the Host check, and the CSRF token on every POST."""

    def __init__(self, app: FastAPI, studio: Studio, allowed_hosts: set[str]) -> None:
        self.app, self.studio, self.allowed_hosts = app, studio, allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":  # the studio has none; refused before any check could be skipped
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        cookies = {k: m.value for k, m in SimpleCookie(headers.get("cookie", "")).items()}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        client = (scope.get("client") or ("", 0))[0]
        studio = self.studio
        set_cookies: list[str] = []
        if token_needed(studio.host, client):
            shown = presented_token((query.get("token") or [None])[0], headers.get("authorization"),
                                    cookies.get(TOKEN_COOKIE))  # fmt: skip
            if not same(shown, studio.token):
                await reply(send, 401, "this studio needs its token: open the URL it printed at start "
                                       "(…/?token=...), or send 'Authorization: token <token>'")  # fmt: skip
                return
            if cookies.get(TOKEN_COOKIE) != studio.token:
                set_cookies.append(f"{TOKEN_COOKIE}={studio.token}; Path=/; HttpOnly; SameSite=Strict")
        else:
            host = headers.get("host", "").rsplit(":", 1)[0] if "]" not in headers.get("host", "") else \
                headers.get("host", "").split("]")[0] + "]"  # fmt: skip
            if host not in self.allowed_hosts:
                await reply(send, 403, f"host {host!r} refused: open the studio at http://127.0.0.1")
                return
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            csrf = cookies.get(CSRF_COOKIE)
            if not same(headers.get(CSRF_HEADER), csrf):
                await reply(send, 403, "missing or wrong CSRF token: reload the page and try again")
                return
        if CSRF_COOKIE not in cookies:
            set_cookies.append(f"{CSRF_COOKIE}={new_token()}; Path=/; SameSite=Strict")

        async def send_with_cookies(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start" and set_cookies:
                message["headers"] = list(message.get("headers", [])) + [
                    (b"set-cookie", c.encode("latin-1")) for c in set_cookies
                ]
            await send(message)

        await self.app(scope, receive, send_with_cookies)


def create_app(runs: str | Path = "runs", data: str | Path = ".", host: str = "127.0.0.1",
               token: str | None = None, cwd: Path | None = None, reviews: str | Path = "reviews") -> Guard:  # fmt: skip
    """The studio over the `runs` and `data` folders, as an ASGI app (the FastAPI app, guarded).

    Args:
        runs: the runs folder (created when missing).
        data: the folder whose files the new-run form may pick.
        host: the address it is bound to; off loopback, every request needs `token`.
        token: the access token (default: a new random one).
        cwd: where started processes run (default: the current folder).
        reviews: the folder of `tunelab review` folders (read when it exists; never created).
    """
    runs, data, reviews = Path(runs).resolve(), Path(data).resolve(), Path(reviews).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    studio = Studio(runs, data, reviews, host, token or new_token(), Jobs(runs, cwd), Playground(runs))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            studio.playground.close()
            studio.jobs.close()

    app = FastAPI(title="tunelab studio", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.studio = studio
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/play", studio.playground, name="play")
    app.mount("/review", ReviewMount(reviews), name="review")
    return Guard(app, studio, LOCAL_NAMES | {host})


def studio(runs: str | Path = "runs", data: str | Path = ".", host: str = "127.0.0.1", port: int = 7860,
           reviews: str | Path = "reviews") -> None:  # fmt: skip
    """Run the studio until interrupted (stopping the servers it started); prints its URL (with the token when it listens beyond loopback).

    Raises:
        TunelabError: the data folder does not exist.
    """
    if not Path(data).is_dir():
        raise TunelabError(f"--data {data}: no such folder; give the folder that holds your data files")
    guard = create_app(runs, data, host, reviews=reviews)
    where = f"http://{host}:{port}/"
    if not is_loopback(host):
        where += f"?token={guard.studio.token}"
    print(f"tunelab studio: runs in {guard.studio.runs}, data in {guard.studio.data}\n"
          f"  open {where}" + ("" if is_loopback(host) else "  (the token is needed from other machines)"),
          flush=True)  # fmt: skip
    # SSE streams stay open while a page shows a run: give them 3 s at shutdown, not forever
    uvicorn.run(guard, host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
