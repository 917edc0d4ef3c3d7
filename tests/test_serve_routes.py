"""The endpoints, on a stand-in model: response shapes (OpenAI's for completions and chat, with
streaming as server-sent events), stop sequences, the 404 that names the right endpoint, the API
key, and the page's configuration."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")  # the optional `serve` extra: without it these tests skip

from fastapi.testclient import TestClient

from tunelab.serve import Limits, create_app

from .test_serve import ANSWER, FakeRun


def client_for(fake: FakeRun, **kwargs) -> TestClient:
    return TestClient(create_app(fake, **kwargs))


def events(reply) -> list:
    """The JSON of each server-sent event, then the final '[DONE]'."""
    assert reply.headers["content-type"].startswith("text/event-stream")
    data = [line.removeprefix("data: ") for line in reply.text.split("\n\n") if line]
    return [json.loads(d) for d in data[:-1]] + [data[-1]]


def test_health_and_models_describe_the_served_model():
    with client_for(FakeRun(name="sst2"), name=None) as client:
        assert client.get("/health").json() == {
            "status": "ok",
            "task": "classification",
            "model": "sst2",
            "requests": 0,
            "model_calls": 0,
            "streams_stopped": 0,
        }
        assert client.get("/v1/models").json() == {
            "object": "list",
            "data": [
                {
                    "id": "sst2",
                    "object": "model",
                    "created": 0,
                    "owned_by": "tunelab",
                    "task": "classification",
                }
            ],
        }
    with client_for(FakeRun(), name="mine") as client:
        assert client.get("/v1/models").json()["data"][0]["id"] == "mine"


def test_classify_answers_each_input_with_its_index():
    with client_for(FakeRun()) as client:
        reply = client.post("/v1/classify", json={"input": ["so good", "so bad"]}).json()
    assert reply == {
        "object": "list",
        "model": "fake",
        "data": [
            {"index": 0, "label": "positive", "score": 0.9},
            {"index": 1, "label": "negative", "score": 0.9},
        ],
    }


@pytest.mark.parametrize(
    "task, path, use",
    [
        ("classification", "/v1/completions", "/v1/classify"),
        ("token-classification", "/v1/classify", "/v1/entities"),
        ("regression", "/v1/entities", "/v1/predict"),
        ("causal-lm", "/v1/predict", "/v1/chat/completions or /v1/completions"),
        ("seq2seq", "/v1/chat/completions", "/v1/completions"),
    ],
)
def test_another_tasks_endpoint_is_a_404_naming_the_right_one(task, path, use):
    with client_for(FakeRun(task)) as client:
        reply = client.post(
            path, json={"input": "x", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
        )
    assert reply.status_code == 404
    assert reply.json()["error"] == {
        "message": f"this server runs a {task} model; use {use}",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }


def test_chat_and_completions_have_the_openai_shape():
    fake = FakeRun("causal-lm")
    with client_for(fake) as client:
        chat = client.post(
            "/v1/chat/completions",
            json={
                "messages": [
                    {"role": "system", "content": "be kind"},
                    {"role": "user", "content": "the plot was"},
                ]
            },
        ).json()
        completion = client.post("/v1/completions", json={"prompt": ["one", "two"], "max_tokens": 4}).json()
    assert (
        chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-") and chat["model"] == "fake"
    )
    assert chat["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}
    ]
    prompt = "system: be kind\nuser: the plot was\nassistant:"
    assert fake.calls[0] == [prompt]
    assert chat["usage"] == {
        "prompt_tokens": len(prompt.split()),
        "completion_tokens": 3,
        "total_tokens": len(prompt.split()) + 3,
    }
    assert completion["object"] == "text_completion" and completion["id"].startswith("cmpl-")
    assert [c["text"] for c in completion["choices"]] == [ANSWER, ANSWER]
    assert fake.calls[1] == ["one", "two"] and fake.options[1][0] == 4  # one model call, max_tokens passed on
    assert (
        fake.options[0][0] == 8
    )  # without max_tokens: the run's generation.max_new_tokens, within the limit


def test_stop_sequences_cut_the_answer():
    with client_for(FakeRun("causal-lm")) as client:
        reply = client.post("/v1/completions", json={"prompt": "p", "stop": "great"}).json()
    assert reply["choices"][0]["text"] == "good "


def test_chat_streams_server_sent_events_ending_in_done():
    with client_for(FakeRun("causal-lm")) as client:
        reply = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True}
        )
    *chunks, done = events(reply)
    assert done == "[DONE]" and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks).strip() == ANSWER
    assert len(chunks) == 1 + len(ANSWER.split())  # one event per piece, then the finishing one
    assert chunks[-1]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}


def test_completions_stream_stops_at_a_stop_sequence():
    with client_for(FakeRun("seq2seq")) as client:
        reply = client.post("/v1/completions", json={"prompt": "p", "stream": True, "stop": ["great"]})
        many = client.post("/v1/completions", json={"prompt": ["p", "q"], "stream": True})
    *chunks, done = events(reply)
    assert done == "[DONE]" and "".join(c["choices"][0]["text"] for c in chunks) == "good "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert (
        many.status_code == 400 and many.json()["error"]["message"] == "prompt: stream one prompt at a time"
    )


def test_a_conversation_the_template_rejects_is_a_400():
    with client_for(FakeRun("causal-lm")) as client:
        reply = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "reject me"}]}
        )
    assert reply.status_code == 400
    assert (
        reply.json()["error"]["message"]
        == "messages: the chat template cannot render them (template says no)"
    )


def test_over_limit_inputs_name_the_input():
    with client_for(FakeRun(), limits=Limits(max_input_tokens=3)) as client:
        reply = client.post("/v1/classify", json={"input": ["a b", "a b c d"]})
    assert reply.json()["error"] == {
        "message": "input[1]: 4 tokens; the limit is 3",
        "type": "invalid_request_error",
        "param": "input[1]",
        "code": None,
    }


def test_the_api_key_guards_all_but_health_and_the_page():
    with client_for(FakeRun(), api_key="s3cret") as client:
        assert client.get("/v1/models").status_code == 401
        assert client.post("/v1/classify", json={"input": "good"}).status_code == 401
        ok = client.post("/v1/classify", json={"input": "good"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert client.get("/health").status_code == 200
        page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert (
        json.dumps({"task": "classification", "model": "fake", "auth": True, "feedback": False}) in page.text
    )


def test_the_page_is_configured_for_the_model():
    with client_for(FakeRun("causal-lm", name="alpaca")) as client:
        page = client.get("/").text
    assert "__CONFIG__" not in page
    assert json.dumps({"task": "causal-lm", "model": "alpaca", "auth": False, "feedback": False}) in page
