"""The `tunelab serve` application: `create_app` puts the routes, the error handlers and the model
worker together into a FastAPI app; `serve` loads a model and runs the app under uvicorn.

The worker's thread lives exactly as long as the app: the lifespan starts it and, on shutdown,
joins it. Every refused request, whatever refused it (FastAPI's validation, routing, a handler),
is answered with the OpenAI-style error body.
"""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.errors import ConfigError
from tunelab.serve.feedback import AnswerLog, check_log_folder
from tunelab.serve.guard import BodyGuard
from tunelab.serve.limits import Limits
from tunelab.serve.loading import load_served
from tunelab.serve.routes import Served, router
from tunelab.serve.schemas import APIError, error_body
from tunelab.serve.worker import ServedRun, Worker, WorkerStopped

# uvicorn's own default (5 s) equals the idle expiry of httpx's connection pool (which the openai
# client uses): a client may then send a request on a connection the server is closing at that
# moment and get "Server disconnected". Idle connections are kept longer than the 60 s of common
# load balancers and proxies too, so that the side in front always closes first.
KEEP_ALIVE_S = 75
# On SIGTERM uvicorn waits for open requests, by default forever: a streaming client could hold a
# stop indefinitely. Orchestrators kill after 30 s (Kubernetes' default grace period): 15 s for
# open requests plus at most JOIN_TIMEOUT_S (10 s) for the worker's model call stay within it.
GRACEFUL_SHUTDOWN_S = 15
# the largest incomplete request head (request line and headers) the h11 parser holds; uvicorn's
# httptools parser, used where it is installed, has its own fixed bound
MAX_HEAD_BYTES = 16 * 1024


async def on_api_error(request: Request, error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), error.status)


async def on_invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's validation errors, as one message naming the field (`messages.0.role: ...`)."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        reason = (first.get("ctx") or {}).get("error", "")
        message = f"the request body is not valid JSON ({reason}); send a JSON object"
        return JSONResponse(error_body(message, "invalid_request_error"), 400)
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
    return JSONResponse(error_body(message, "invalid_request_error", where or None), 400)


async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    """Routing errors (an unknown path, a wrong method) in the same shape as every other error."""
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(error.detail), kind), error.status_code)


async def on_worker_stopped(request: Request, error: WorkerStopped) -> JSONResponse:
    return JSONResponse(error_body(f"{error}; retry", "server_error"), 503)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Run the model worker while the app runs; on shutdown, join its thread."""
    worker: Worker = app.state.served.worker
    worker.start()
    try:
        yield
    finally:
        worker.stop()
        if app.state.served.log is not None:
            app.state.served.log.close()


def create_app(
    run: ServedRun,
    api_key: str | None = None,
    limits: Limits | None = None,
    name: str | None = None,
    log: str | Path | None = None,
) -> FastAPI:
    """The FastAPI application serving `run` (a loaded run or exported folder).

    Args:
        run: what `load_served` returns.
        api_key: when set, every endpoint but `/health` and `/` needs `Authorization: Bearer KEY`.
        limits: request limits and batching (default `Limits()`).
        name: the model id the API reports (default: the folder's name).
        log: a folder for the answer log (`feedback.sqlite`): every answer is stored with an id,
            and `POST /v1/feedback` takes ratings and corrections (off when None).
    """
    limits = limits or Limits()
    app = FastAPI(
        title="tunelab",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
        exception_handlers={
            APIError: on_api_error,
            RequestValidationError: on_invalid_request,
            StarletteHTTPException: on_http_error,
            WorkerStopped: on_worker_stopped,
        },
    )
    model_id = name or Path(run.path).name
    answers = AnswerLog(log, model_id, run.config.task) if log is not None else None
    app.state.served = Served(run, Worker(run, limits), limits, model_id, api_key, answers)
    app.include_router(router)
    # inside Starlette's error handling, so that a 413 or 408 raised while the body is read gets
    # the same error body as every other refusal
    app.add_middleware(BodyGuard, max_body_kb=limits.max_body_kb, timeout_s=limits.body_timeout_s)
    return app


def check_address(host: str, port: int) -> None:
    """Refuse a port out of range, a host that does not resolve, or an address something else
    listens on, before the model loads (uvicorn would find out only after it had loaded).

    Raises:
        ConfigError: naming `--host` or `--port` and what to do.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535 (got {port}); 8000 is the default")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(
            f"--host {host}: not an address of this machine ({e.strerror}); use 127.0.0.1, or 0.0.0.0 for all"
        ) from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            raise ConfigError(
                f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); choose another --port "
                "or stop what uses it"
            ) from None


def serve(
    path: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    limits: Limits | None = None,
    log: str | Path | None = None,
) -> None:
    """Load the model at `path` (a run or an exported folder) and serve it until interrupted;
    with `log`, store every answer and take feedback (see `create_app`).

    Raises:
        TunelabError: `path` holds nothing servable, `log` is not a writable folder, or the
            address cannot be listened on.
    """
    limits = limits or Limits()
    check_address(host, port)
    api_key = api_key or os.environ.get("TUNELAB_API_KEY") or None
    if log is not None:
        check_log_folder(log)  # before the model loads
    run = load_served(path)
    app = create_app(run, api_key, limits, log=log)
    print(
        f"tunelab: serving {path} ({run.config.task}) on http://{host}:{port}"
        + (" (API key required)" if api_key else "")
        + (f"; logging answers and feedback to {Path(log) / 'feedback.sqlite'}" if log is not None else ""),
        flush=True,
    )
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level="warning",
        timeout_keep_alive=KEEP_ALIVE_S,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        # past this many open connections uvicorn answers 503 at once, instead of queueing requests
        # without bound or failing to accept once the process runs out of file descriptors
        limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
    )
