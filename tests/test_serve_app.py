"""The app around the routes: the worker's thread lives exactly as long as the app, refusals of
every origin share the OpenAI error body, and `serve` hands uvicorn explicit timeouts."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")  # the optional `serve` extra: without it these tests skip

from fastapi.testclient import TestClient

from tunelab.serve import Limits, create_app, serve
from tunelab.serve import app as serve_app
from tunelab.serve.worker import JOIN_TIMEOUT_S

from .test_serve import FakeRun


def test_the_worker_thread_starts_and_stops_with_the_app():
    application = create_app(FakeRun())
    worker = application.state.served.worker
    assert worker.thread is None  # nothing runs before the app starts
    with TestClient(application) as client:
        thread = worker.thread
        assert thread is not None and thread.is_alive() and thread.name == "tunelab-model"
        assert client.post("/v1/classify", json={"input": "good"}).status_code == 200
    assert not thread.is_alive()  # joined on shutdown
    with TestClient(application) as client:  # an app started again gets a fresh worker thread
        assert worker.thread is not thread and worker.thread.is_alive()
        assert client.post("/v1/classify", json={"input": "good"}).status_code == 200
        assert client.get("/health").json()["requests"] == 2
    assert not worker.thread.is_alive()


def test_a_request_after_the_worker_stopped_gets_a_503():
    application = create_app(FakeRun())
    with TestClient(application) as client:
        application.state.served.worker.stop()
        reply = client.post("/v1/classify", json={"input": "good"})
    assert reply.status_code == 503
    message = "the server is not taking requests now (starting or shutting down); retry"
    assert reply.json()["error"] == {"message": message, "type": "server_error", "param": None, "code": None}


def test_routing_errors_share_the_error_body():
    with TestClient(create_app(FakeRun())) as client:
        wrong_method = client.get("/v1/classify")
        missing = client.get("/v1/nothing")
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["type"] == "invalid_request_error"
    assert missing.json()["error"] == {
        "message": "Not Found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }


def test_serve_sets_uvicorns_timeouts_and_the_connection_limit(monkeypatch, capsys):
    served: dict = {}
    monkeypatch.setattr(serve_app, "load_served", lambda path: FakeRun(name="sst2"))
    monkeypatch.setattr(
        serve_app.uvicorn,
        "run",
        lambda application, **settings: served.update(application=application, **settings),
    )
    monkeypatch.setenv("TUNELAB_API_KEY", "s3cret")
    serve("runs/sst2", port=8123, limits=Limits(max_connections=40))
    assert served["timeout_keep_alive"] == serve_app.KEEP_ALIVE_S > 5  # longer than uvicorn's and httpx's 5 s
    assert served["timeout_graceful_shutdown"] == serve_app.GRACEFUL_SHUTDOWN_S
    assert serve_app.GRACEFUL_SHUTDOWN_S + JOIN_TIMEOUT_S < 30  # stopped before orchestrators kill
    assert served["limit_concurrency"] == 40
    assert (served["host"], served["port"], served["log_level"]) == ("127.0.0.1", 8123, "warning")
    assert served["application"].state.served.api_key == "s3cret"  # from the environment
    assert capsys.readouterr().out == (
        "tunelab: serving runs/sst2 (classification) on http://127.0.0.1:8123 (API key required)\n"
    )


def test_an_app_that_was_never_started_refuses_instead_of_hanging():
    client = TestClient(create_app(FakeRun()))  # no `with`: the lifespan (and so the worker) never runs
    reply = client.post("/v1/classify", json={"input": "good"})
    assert reply.status_code == 503 and "starting or shutting down" in reply.json()["error"]["message"]


def test_the_openapi_schema_lists_the_endpoints():
    with TestClient(create_app(FakeRun())) as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/v1/models", "/v1/classify", "/v1/completions", "/v1/chat/completions"} <= set(paths)
