"""`tunelab serve` under abuse, against the real process on a loopback port: bodies over the size
limit (413, unread), a streaming client that disconnects (its generation stops and the worker
takes the next request), clients that send slowly (they hold their own connection, never the
others'; a stalled body gets 408), and 64 clients mixing valid and invalid requests for
MIX_SECONDS: no 5xx, and every valid request answered 200 in the right shape.

One in-process test checks the worker's side of a cancelled stream with a stand-in model.

MIX_SECONDS is 15 here (the issue asked for 30; the whole file must stay near a minute on a shared
2-core machine): set TUNELAB_ABUSE_SECONDS=30 for the longer run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tunelab.serve.limits import Limits
from tunelab.serve.worker import Decoding, Worker

from .test_serve import ANSWER, FakeRun, Server, trained_classifier

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

MIX_SECONDS = float(os.environ.get("TUNELAB_ABUSE_SECONDS", "15"))
CLIENTS = 64
BODY_KB = 16  # the servers' --max-body-kb
LONG_STREAM = 3500  # tokens a stream would take to finish (seconds on this model) if nobody stopped it


def write_endless_llama(folder: Path) -> Path:
    """A random tiny Llama whose tokenizer has no end-of-sequence token and whose position table is
    4,096 long: it generates exactly max_tokens tokens, a few milliseconds each."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from .conftest import write_tiny_bert

    write_tiny_bert(folder)  # the WordPiece tokenizer (no eos); its weights are replaced
    for name in ("model.safetensors", "config.json"):
        (folder / name).unlink()
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=0, bos_token_id=2, eos_token_id=None)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def classifier(tmp_path_factory, tiny_bert, sentiment_files):
    run = trained_classifier(tmp_path_factory, tiny_bert, sentiment_files)
    server = Server(run, "--max-batch", "8", "--max-body-kb", str(BODY_KB), "--body-timeout-s", "2")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    model = write_endless_llama(tmp_path_factory.mktemp("endless-llama"))
    server = Server(model, "--max-tokens", str(LONG_STREAM), "--max-body-kb", str(BODY_KB))
    yield server
    server.stop()


def health(server: Server) -> dict[str, Any]:
    return httpx.get(server.url + "/health", timeout=30).json()


def test_a_body_over_the_limit_gets_413_before_it_is_read(classifier):
    big = {"input": ["good " * 1000] * 4}  # about 20 KB of JSON
    declared = httpx.post(classifier.url + "/v1/classify", json=big, timeout=30)
    assert declared.status_code == 413
    assert declared.json()["error"]["message"].startswith(
        f"the request body is over the limit of {BODY_KB} KB"
    )

    def chunks():  # no Content-Length: the limit is counted as the body arrives
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 4096):
            yield payload[i : i + 4096]

    chunked = httpx.post(classifier.url + "/v1/classify", content=chunks(), timeout=30,
                         headers={"content-type": "application/json"})  # fmt: skip
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "invalid_request_error"
    requests = health(classifier)["requests"]
    ok = httpx.post(classifier.url + "/v1/classify", json={"input": "so good"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["data"][0]["label"] in ("positive", "negative")
    assert health(classifier)["requests"] == requests + 1  # the refused bodies never reached the model


def test_a_client_that_leaves_mid_stream_stops_its_generation(chat):
    before = health(chat)
    body = {
        "messages": [{"role": "user", "content": "the movie was"}],
        "max_tokens": LONG_STREAM,
        "stream": True,
    }
    pieces = 0
    with httpx.stream("POST", chat.url + "/v1/chat/completions", json=body, timeout=30) as reply:
        assert reply.status_code == 200
        for line in reply.iter_lines():
            pieces += line.startswith("data: ")
            if pieces == 5:
                break  # leaving the block closes the connection mid-stream
    deadline = time.monotonic() + 60
    while health(chat)["streams_stopped"] == before["streams_stopped"]:
        assert time.monotonic() < deadline, "the model kept generating for a client that had left"
        time.sleep(0.1)
    # the worker is free again: the next request is answered (4 tokens, not after 3,500 others)
    reply = httpx.post(chat.url + "/v1/chat/completions", timeout=30,
                       json={"messages": [{"role": "user", "content": "the plot was"}], "max_tokens": 4})  # fmt: skip
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
    after = health(chat)
    assert after["streams_stopped"] == before["streams_stopped"] + 1
    assert after["model_calls"] == before["model_calls"] + 2  # the stopped stream, then the request


def test_a_cancelled_stream_stops_at_its_next_piece_or_never_starts():
    """In-process, with a stand-in model: the stream whose client left while it ran stops inside
    `generate`; one whose client left while it waited never reaches the model."""
    from tunelab.serve.routes import CancellableStreamer

    fake = FakeRun("causal-lm")
    worker = Worker(fake, Limits(batch_wait_ms=0))
    greedy = Decoding(max_tokens=8, temperature=0.0, top_p=None, stop=())

    async def work() -> list:
        fake.gate.clear()  # hold the model: both streams queue up
        running, waiting = (CancellableStreamer(fake.tokenizer, timeout=10) for _ in range(2))
        first = worker.submit("stream", ["first"], greedy, running)
        second = worker.submit("stream", ["second"], greedy, waiting)
        after = worker.submit("generate", ["after"], greedy)
        await asyncio.to_thread(fake.started.wait, 10)
        running.cancel()  # its client left mid-call: the next piece the model hands on stops it
        waiting.cancel()  # its client left while it waited
        fake.gate.set()
        return [await first.future, await second.future, await after.future]

    worker.start()
    try:
        assert asyncio.run(work()) == [[], [], [ANSWER]]
    finally:
        worker.stop()
    assert fake.calls == [["first"], ["after"]] and worker.streams_stopped == 2


async def slow_client(url: str, head: bytes) -> asyncio.StreamWriter:
    host, port = url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    await writer.drain()
    return writer


def test_slow_clients_do_not_block_the_others(classifier):
    async def scenario() -> None:
        stalled_head = b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        stalled_body = (b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"input\": ")  # fmt: skip
        slow = [await slow_client(classifier.url, stalled_head if i % 2 else stalled_body) for i in range(20)]
        try:
            async with httpx.AsyncClient(base_url=classifier.url, timeout=20) as client:
                replies = await asyncio.gather(*(client.post("/v1/classify", json={"input": f"so good {i}"})
                                                 for i in range(16)))  # fmt: skip
                assert [r.status_code for r in replies] == [200] * 16
            # a body that stopped arriving is answered 408 after --body-timeout-s (2 s here)
            reader, writer = await asyncio.open_connection(*classifier.url.removeprefix("http://").split(":"))
            writer.write(stalled_body)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(4096), 20)
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            writer.close()
        finally:
            for writer in slow:
                writer.close()

    asyncio.run(scenario())
    assert health(classifier)["status"] == "ok"


# (name, valid?) of the requests the mixed clients send; each is answered by `send` below
KINDS = ["classify", "classify_batch", "chat", "chat_stream", "health", "bad_json", "wrong_type", "too_many",
         "unknown_path", "too_large", "wrong_endpoint", "over_max_tokens", "no_messages", "wrong_method"]  # fmt: skip
VALID = {"classify", "classify_batch", "chat", "chat_stream", "health"}
EXPECTED = {"bad_json": 400, "wrong_type": 400, "too_many": 400, "unknown_path": 404, "too_large": 413,
            "wrong_endpoint": 404, "over_max_tokens": 400, "no_messages": 400, "wrong_method": 405}  # fmt: skip


async def send(kind: str, classify: httpx.AsyncClient, chat: httpx.AsyncClient) -> tuple[int, bool]:
    """Send one request of `kind`; its status, and whether a 200's answer had the right shape."""
    message = [{"role": "user", "content": "the movie was"}]
    if kind == "classify":
        r = await classify.post("/v1/classify", json={"input": "a lovely warm film"})
        return r.status_code, r.status_code != 200 or r.json()["data"][0]["label"] in ("positive", "negative")
    if kind == "classify_batch":
        r = await classify.post("/v1/classify", json={"input": ["good", "bad", "so dull"]})
        return r.status_code, r.status_code != 200 or [d["index"] for d in r.json()["data"]] == [0, 1, 2]
    if kind == "chat":
        r = await chat.post("/v1/chat/completions", json={"messages": message, "max_tokens": 4})
        ok = r.status_code != 200 or isinstance(r.json()["choices"][0]["message"]["content"], str)
        return r.status_code, ok
    if kind == "chat_stream":
        r = await chat.post(
            "/v1/chat/completions", json={"messages": message, "max_tokens": 4, "stream": True}
        )
        return r.status_code, r.status_code != 200 or r.text.rstrip().endswith("data: [DONE]")
    if kind == "health":
        r = await classify.get("/health")
        return r.status_code, r.status_code != 200 or r.json()["status"] == "ok"
    if kind == "bad_json":
        r = await classify.post(
            "/v1/classify", content=b'{"input": ', headers={"content-type": "application/json"}
        )
    elif kind == "wrong_type":
        r = await classify.post("/v1/classify", json={"input": 5})
    elif kind == "too_many":
        r = await classify.post("/v1/classify", json={"input": ["good"] * 9})
    elif kind == "unknown_path":
        r = await chat.post("/v1/nothing", json={})
    elif kind == "too_large":
        r = await classify.post("/v1/classify", json={"input": "good " * (BODY_KB * 300)})
    elif kind == "wrong_endpoint":
        r = await classify.post("/v1/chat/completions", json={"messages": message})
    elif kind == "over_max_tokens":
        r = await chat.post("/v1/chat/completions", json={"messages": message, "max_tokens": LONG_STREAM + 1})
    elif kind == "no_messages":
        r = await chat.post("/v1/chat/completions", json={"messages": []})
    else:
        r = await classify.get("/v1/classify")
    return r.status_code, "error" in r.json()


def test_64_clients_mixing_valid_and_invalid_requests_get_no_5xx_and_lose_nothing(classifier, chat):
    statuses: Counter[tuple[str, int]] = Counter()
    wrong: list[str] = []

    async def client(k: int, deadline: float, classify: httpx.AsyncClient, chat_: httpx.AsyncClient) -> None:
        rng = random.Random(k)
        while time.monotonic() < deadline:
            kind = rng.choice(KINDS)
            try:
                status, shaped = await send(kind, classify, chat_)
            except httpx.HTTPError as e:  # a request that got no answer at all
                wrong.append(f"{kind}: {type(e).__name__} {e}")
                continue
            statuses[kind, status] += 1
            expected = 200 if kind in VALID else EXPECTED[kind]
            if status != expected or not shaped:
                wrong.append(f"{kind}: {status} (expected {expected}), well-shaped: {shaped}")

    async def everyone() -> None:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=classifier.url, timeout=60, limits=limits) as classify, \
                httpx.AsyncClient(base_url=chat.url, timeout=60, limits=limits) as chat_:  # fmt: skip
            deadline = time.monotonic() + MIX_SECONDS
            await asyncio.gather(*(client(k, deadline, classify, chat_) for k in range(CLIENTS)))

    asyncio.run(everyone())
    print(f"{sum(statuses.values())} answers in {MIX_SECONDS:g} s: {sorted(statuses.items())}")  # with -s
    assert not [key for key in statuses if key[1] >= 500], statuses
    assert not wrong, wrong[:10]
    answered = {kind for kind, _ in statuses}
    assert answered == set(KINDS), f"some kinds were never sent: {set(KINDS) - answered}"
    assert sum(n for (kind, status), n in statuses.items() if kind in VALID) >= CLIENTS  # real traffic
    for server in (classifier, chat):
        assert health(server)["status"] == "ok"
