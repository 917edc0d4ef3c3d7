"""The reviews of `tunelab studio`: the `tunelab review` folders under the reviews folder, each
with its report (tunelab.review.report), and each one's rating page, `tunelab.review.app`'s own
app, mounted at `/review/<name>/`.

A review folder is a folder directly under the reviews folder that holds `review.sqlite`; names
are resolved inside the reviews folder (`security.inside`), as run names are inside the runs
folder. The review page's requests are relative (`api/next`), so the same page works standalone
at `/` and here under `/review/<name>/`; its ratings are POSTs, which carry the studio's CSRF
token like every other.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from tunelab.errors import TunelabError
from tunelab.review.app import create_review_app
from tunelab.review.report import report
from tunelab.review.store import FILE
from tunelab.studio.playground import Receive, Scope, Send, reply
from tunelab.studio.security import Refused, inside


def review_names(reviews: Path) -> list[str]:
    """The review folders directly under `reviews` (those holding review.sqlite), by name."""
    if not reviews.is_dir():
        return []
    return [p.name for p in sorted(reviews.iterdir())
            if not p.name.startswith(".") and (p / FILE).is_file()]  # fmt: skip


def review_folder(reviews: Path, name: str) -> Path:
    """The review folder `name`, inside the reviews folder.

    Raises:
        Refused: a name outside the reviews folder or below its first level (403), or no review there (404).
    """
    if "/" in name.strip("/") or "\\" in name:
        raise Refused(403, f"{name}: a review is a folder directly inside the reviews folder")
    folder = inside(reviews, name)
    if not (folder / FILE).is_file():
        raise Refused(404, f"no review named {name}")
    return folder


def summary(reviews: Path, name: str) -> dict[str, Any]:
    """A review's report (win rate of A with its 95% interval, agreement, per prompt) and its name."""
    try:
        return {"name": name, **report(review_folder(reviews, name))}
    except TunelabError as e:  # a database another process is writing, or one from another version
        return {"name": name, "error": str(e)}


class ReviewMount:
    """An ASGI app (mounted at /review) that hands `/review/<name>/...` to that review's page app."""

    def __init__(self, reviews: Path) -> None:
        self.reviews = reviews
        self.apps: dict[str, FastAPI] = {}
        self.lock = threading.Lock()

    def app_for(self, name: str) -> FastAPI:
        with self.lock:
            if name not in self.apps:
                self.apps[name] = create_review_app(review_folder(self.reviews, name))
            return self.apps[name]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        rest = path.split("/review/", 1)[-1] if "/review/" in path else path.lstrip("/")
        name, slash, endpoint = rest.partition("/")
        if not name:
            await reply(send, 404, "use /review/<name>/ (the reviews are listed at /reviews)")
            return
        if not slash:  # the page's requests are relative to its folder: /review/NAME -> /review/NAME/
            location = f"/review/{name}/".encode("latin-1", "replace")
            await send({"type": "http.response.start", "status": 307, "headers": [(b"location", location)]})
            await send({"type": "http.response.body", "body": b""})
            return
        try:
            app = self.app_for(name)
        except Refused as e:
            await reply(send, e.status, e.message)
            return
        inner = dict(scope, path="/" + endpoint, raw_path=("/" + endpoint).encode(), root_path="")
        await app(inner, receive, send)
