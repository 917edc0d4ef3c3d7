"""Request models and the OpenAI-style error body: each model on its own, then every class of bad
request to the trained classifier and chat apps, answered with a 4xx and the error body before
the model sees it."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")  # the optional `serve` extra: without it these tests skip

from fastapi.testclient import TestClient
from pydantic import ValidationError

from tunelab.serve import Limits, create_app, load_served
from tunelab.serve.schemas import APIError, ChatRequest, CompletionRequest, InputRequest, Sampling, error_body

from .test_serve import trained_chat, trained_classifier


def test_error_body_has_the_openai_shape():
    assert error_body("input: bad", "invalid_request_error", "input") == {
        "error": {"message": "input: bad", "type": "invalid_request_error", "param": "input", "code": None}
    }
    refused = APIError(401, "no key", "authentication_error")
    assert refused.status == 401 and str(refused) == "no key"
    assert refused.body()["error"] == {
        "message": "no key",
        "type": "authentication_error",
        "param": None,
        "code": None,
    }


def test_requests_take_one_or_many_texts_and_ignore_unknown_fields():
    assert InputRequest(input="a").texts() == ["a"]
    assert InputRequest.model_validate({"input": ["a", "b"], "user": "x"}).texts() == ["a", "b"]
    assert CompletionRequest(prompt="p").prompts() == ["p"]
    assert Sampling(stop="x").stops() == ("x",) and Sampling().stops() == ()
    assert Sampling(stop=["a", "b"]).stops() == ("a", "b")
    chat = ChatRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi", "name": "me"}], "seed": 1}
    )
    assert chat.messages[0].model_dump() == {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "body, field",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ],
)
def test_chat_requests_out_of_range_are_refused(body, field):
    with pytest.raises(ValidationError) as caught:
        ChatRequest.model_validate(body)
    assert field in str(caught.value)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_bert, sentiment_files):
    run = load_served(trained_classifier(tmp_path_factory, tiny_bert, sentiment_files))
    app = create_app(run, limits=Limits(max_batch=8, max_input_tokens=32, batch_wait_ms=50))
    with TestClient(app) as client:
        yield client


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    app = create_app(load_served(trained_chat(tmp_path_factory)), limits=Limits(max_tokens=16))
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/classify", "{not json", 400, "not valid JSON"),
        ("/v1/classify", {"text": "x"}, 400, "input: Field required"),
        ("/v1/classify", {"input": 5}, 400, "input"),
        ("/v1/classify", {"input": []}, 400, "input: give at least one input"),
        ("/v1/classify", {"input": ["good"] * 9}, 400, "input: 9 inputs; the limit is 8 per request"),
        ("/v1/classify", {"input": "good " * 40}, 400, "tokens; the limit is 32"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}]},
            404,
            "runs a classification model; use /v1/classify",
        ),
        ("/v1/nothing", {}, 404, "Not Found"),
    ],
)
def test_bad_requests_get_4xx_with_an_openai_style_error(classifier, path, body, status, message):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    reply = classifier.post(path, headers={"content-type": "application/json"}, **kwargs)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert message in error["message"] and error["type"].endswith("_error")
    assert classifier.get("/health").status_code == 200  # the worker is still alive


@pytest.mark.parametrize(
    "body, message",
    [
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 17},
            "max_tokens: 17; the limit is 16",
        ),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "the last message must be the user's"),
        (
            {"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
            "stop: at most 4",
        ),
    ],
)
def test_bad_chat_requests(chat, body, message):
    reply = chat.post("/v1/chat/completions", json=body)
    assert reply.status_code == 400 and message in reply.json()["error"]["message"]


def test_a_validation_error_names_the_field_as_param(chat):
    error = chat.post("/v1/chat/completions", json={"messages": [{"role": "robot", "content": "hi"}]}).json()
    assert error["error"]["param"] == "messages.0.role" and error["error"]["code"] is None
