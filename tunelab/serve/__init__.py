"""`tunelab serve`: an HTTP API for a run or an exported folder (FastAPI + uvicorn).

Endpoints: `GET /health`, `GET /v1/models`; by task `POST /v1/classify`, `/v1/entities`,
`/v1/predict`; for generative models `POST /v1/completions` and (causal-lm)
`/v1/chat/completions` in the OpenAI request/response shape, with `stream: true` as
server-sent events; `GET /` is a small page to try the model.

One worker thread owns the model and batches the requests that arrive close together (dynamic
micro-batching); waiting requests hold an asyncio future each, not a thread. Bad input
(malformed JSON, wrong types, over-limit sizes) gets a 4xx with an OpenAI-style error body
before it reaches the model.

    limits.py   Limits: the request and batching limits, their defaults and checks (the CLI flags)
    loading.py  load_served: a run directory or an exported Hugging Face folder
    schemas.py  the request models and the OpenAI-style error body (APIError)
    worker.py   the model thread and its micro-batching
    routes.py   the endpoints
    app.py      create_app (routes + error handlers + the worker's lifespan) and serve (uvicorn)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tunelab.errors import ConfigError
from tunelab.serve.limits import Limits

if TYPE_CHECKING:
    from tunelab.serve.app import create_app, serve
    from tunelab.serve.loading import load_served

__all__ = ["Limits", "create_app", "load_served", "serve"]

INSTALL_HINT = "serving needs FastAPI and uvicorn: pip install 'tunelab[serve]'"
# the optional `serve` extra (pydantic and starlette come with fastapi)
SERVE_EXTRA = {"fastapi", "uvicorn", "starlette", "pydantic"}
LAZY = {
    "create_app": "tunelab.serve.app",
    "serve": "tunelab.serve.app",
    "load_served": "tunelab.serve.loading",
}


def __getattr__(name: str) -> Any:
    """`create_app`, `serve` and `load_served`, imported on first use.

    The app needs FastAPI and uvicorn (the optional `serve` extra) and loading needs torch: the
    CLI reads `Limits` for its flags without either, and a missing extra is one line saying what
    to install.
    """
    if name not in LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module(LAZY[name])
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in SERVE_EXTRA:
            raise
        raise ConfigError(INSTALL_HINT) from None
    return getattr(module, name)
