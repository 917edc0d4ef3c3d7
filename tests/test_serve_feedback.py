"""`tunelab serve --log`: answers stored with an id, `POST /v1/feedback`, `tunelab feedback export`
into SFT, preference and classification rows (the SFT rows train), and the kill test: 32 clients
send requests and feedback, the server is killed with SIGKILL, and every feedback call that got a
2xx is in the database after a restart."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient

from tunelab.cli import main
from tunelab.serve import create_app
from tunelab.serve.feedback import FILE

from .test_serve import ANSWER, FakeRun, Server, browser, trained_chat  # noqa: F401 - browser is a fixture

httpx = pytest.importorskip("httpx")
# how long the 32 clients run before the kill (15 s in CI; TUNELAB_FEEDBACK_SOAK_S=60 for a longer soak)
KILL_TEST_S = float(os.environ.get("TUNELAB_FEEDBACK_SOAK_S", "15"))


def rows(log: Path, table: str) -> list[tuple]:
    db = sqlite3.connect(log / FILE)
    try:
        return db.execute(f"SELECT * FROM {table} ORDER BY rowid").fetchall()
    finally:
        db.close()


def export(log: Path, fmt: str, out: Path, *flags: str) -> list[dict]:
    assert main(["feedback", "export", str(log), "--format", fmt, "--output", str(out), *flags]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_without_log_answers_carry_no_id_and_feedback_is_refused(tmp_path):
    with TestClient(create_app(FakeRun())) as client:
        assert "id" not in client.post("/v1/classify", json={"input": "good"}).json()
        reply = client.post("/v1/feedback", json={"id": "x", "rating": "up"})
    assert reply.status_code == 404 and "--log" in reply.json()["error"]["message"]
    assert list(tmp_path.iterdir()) == []


def test_classify_feedback_is_stored_and_exports_labelled_rows(tmp_path):
    log = tmp_path / "log"
    fake = FakeRun()
    fake.config.data = type("Data", (), {"labels": ["negative", "positive"]})()
    with TestClient(create_app(fake, log=log)) as client:
        first = client.post("/v1/classify", json={"input": ["so good", "so bad"]}).json()
        second = client.post("/v1/classify", json={"input": "rather good"}).json()
        assert first["id"] != second["id"]
        ok = client.post("/v1/feedback", json={"id": first["id"], "rating": "down", "correction": "positive",
                                               "index": 1})  # fmt: skip
        assert ok.status_code == 200 and ok.json()["answer_id"] == first["id"]
        assert client.post("/v1/feedback", json={"id": second["id"], "rating": 5}).status_code == 200
        refused = {
            "unknown id": client.post("/v1/feedback", json={"id": "nope", "rating": "up"}),
            "score 7": client.post("/v1/feedback", json={"id": second["id"], "rating": 7}),
            "index 3": client.post("/v1/feedback", json={"id": first["id"], "rating": "up", "index": 3}),
            "not a label": client.post(
                "/v1/feedback", json={"id": second["id"], "rating": "down", "correction": "neutral"}
            ),  # fmt: skip
            "rating missing": client.post("/v1/feedback", json={"id": second["id"]}),
        }
    assert {k: r.status_code for k, r in refused.items()} == {
        "unknown id": 404, "score 7": 400, "index 3": 400, "not a label": 400, "rating missing": 400,
    }  # fmt: skip
    assert "neutral" in refused["not a label"].json()["error"]["message"]
    answers = rows(log, "answers")
    assert [(a[0], a[4], json.loads(a[5])) for a in answers] == [
        (first["id"], "classify", ["so good", "so bad"]),
        (second["id"], "classify", ["rather good"]),
    ]
    assert [(f[1], f[2], f[4], f[5], f[6]) for f in rows(log, "feedback")] == [
        (first["id"], 1, "down", None, "positive"),
        (second["id"], 0, None, 5, None),
    ]
    assert export(log, "classification", tmp_path / "labels.jsonl") == [
        {"text": "so bad", "label": "positive"}
    ]
    assert export(log, "classification", tmp_path / "all.jsonl", "--approved") == [
        {"text": "so bad", "label": "positive"},
        {"text": "rather good", "label": "positive"},  # the up-rated prediction, as the model gave it
    ]


def test_chat_and_completion_feedback_exports_sft_and_preference_rows(tmp_path):
    log = tmp_path / "log"
    with TestClient(create_app(FakeRun("causal-lm"), log=log)) as client:
        chat = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        ).json()
        streamed = client.post("/v1/chat/completions", json={
            "stream": True, "messages": [{"role": "system", "content": "be brief"},
                                         {"role": "user", "content": "and now?"}]})  # fmt: skip
        stream_id = json.loads(streamed.text.split("\n\n")[0].removeprefix("data: "))["id"]
        done = client.post("/v1/completions", json={"prompt": "once upon"}).json()
        liked = client.post("/v1/completions", json={"prompt": "twice"}).json()
        for body in (
            {"id": chat["id"], "rating": "down", "correction": "hello there"},
            {"id": stream_id, "rating": 2, "correction": "now, briefly"},
            {"id": done["id"], "rating": "up"},
            {"id": done["id"], "rating": "down", "correction": "a time"},  # the latest feedback counts
            {"id": liked["id"], "rating": "up"},
        ):
            assert client.post("/v1/feedback", json=body).status_code == 200
    kinds = {a[0]: a[4] for a in rows(log, "answers")}
    assert kinds == {
        chat["id"]: "chat",
        stream_id: "chat",
        done["id"]: "completion",
        liked["id"]: "completion",
    }
    answer = ANSWER
    assert export(log, "preference", tmp_path / "pairs.jsonl") == [
        {"prompt": "hi", "chosen": "hello there", "rejected": answer},
        {"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "and now?"}],
         "chosen": [{"role": "assistant", "content": "now, briefly"}],
         "rejected": [{"role": "assistant", "content": answer.strip() + " "}]},
        {"prompt": "once upon", "chosen": "a time", "rejected": answer},
    ]  # fmt: skip
    sft = export(log, "sft", tmp_path / "sft.jsonl", "--approved")
    assert sft == [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "and now?"},
                      {"role": "assistant", "content": "now, briefly"}]},
        {"prompt": "once upon", "completion": "a time"},
        {"prompt": "twice", "completion": answer},
    ]  # fmt: skip


def test_feedback_export_refuses_what_it_cannot_do(tmp_path, capsys):
    (tmp_path / "taken.jsonl").write_text("mine\n")
    assert main(["feedback", "export", str(tmp_path), "--format", "sft", "--output", "x.jsonl"]) == 2
    assert "no feedback log" in capsys.readouterr().err
    with TestClient(create_app(FakeRun(), log=tmp_path / "log")):
        pass
    out = tmp_path / "taken.jsonl"
    assert main(["feedback", "export", str(tmp_path / "log"), "--format", "sft", "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "mine\n"


def test_a_log_folder_that_is_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    (tmp_path / "log").write_text("not a folder")
    assert main(["serve", str(tmp_path / "no-such-run"), "--log", str(tmp_path / "log")]) == 2
    assert "--log" in capsys.readouterr().err


async def client_loop(
    url: str, seed: int, until: float, acknowledged: list[int], answered: list[str]
) -> None:
    """One client: chat, then rate the answer (sometimes with a correction), until `until`."""
    rng = random.Random(seed)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while time.monotonic() < until:
            try:
                reply = await client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": f"the {rng.choice(['movie', 'plot'])} was"}],
                    "max_tokens": 4})  # fmt: skip
                if reply.status_code != 200:
                    continue
                ident = reply.json()["id"]
                answered.append(ident)
                body = {"id": ident, "rating": rng.choice(["up", "down", 1, 5])}
                if rng.random() < 0.5:
                    body["correction"] = f"a fix {seed}"
                rated = await client.post("/v1/feedback", json=body)
                if 200 <= rated.status_code < 300:
                    acknowledged.append(rated.json()["id"])
            except httpx.HTTPError:
                return  # the server was killed


def test_every_acknowledged_feedback_survives_a_sigkill(tmp_path_factory, tmp_path):
    run, log = trained_chat(tmp_path_factory), tmp_path / "log"
    server = Server(run, "--log", str(log), "--max-tokens", "8")
    acknowledged: list[int] = []
    answered: list[str] = []

    async def soak() -> None:
        until = time.monotonic() + KILL_TEST_S
        clients = [asyncio.create_task(client_loop(server.url, i, until + 60, acknowledged, answered))
                   for i in range(32)]  # fmt: skip
        await asyncio.sleep(KILL_TEST_S)
        server.process.send_signal(signal.SIGKILL)  # while requests and feedback are in flight
        await asyncio.gather(*clients)

    asyncio.run(soak())
    assert server.process.wait(timeout=30) == -signal.SIGKILL
    assert len(acknowledged) > 32, f"too little traffic to mean anything: {len(acknowledged)} feedback calls"
    stored = {row[0] for row in rows(log, "feedback")}
    assert set(acknowledged) <= stored, f"lost: {sorted(set(acknowledged) - stored)[:10]}"
    restarted = Server(run, "--log", str(log), "--max-tokens", "8")
    try:
        reply = httpx.post(
            restarted.url + "/v1/feedback", json={"id": answered[0], "rating": "up"}, timeout=30
        )
        assert reply.status_code == 200  # an answer from before the kill still takes feedback
    finally:
        restarted.stop()
    pairs = export(log, "preference", tmp_path / "pairs.jsonl")
    assert pairs and all(p["chosen"].startswith("a fix") for p in pairs)


def test_feedback_export_sft_and_preference_rows_train(tmp_path, tmp_path_factory):
    """The SFT and preference exports of a chat log are training data as they stand: `tunelab
    train` reads them (task=causal-lm and task=preference)."""
    from .conftest import write_tiny_llama

    log = tmp_path / "log"
    with TestClient(create_app(FakeRun("causal-lm"), log=log)) as client:
        for word in ["movie", "film", "plot", "acting"] * 4:
            ident = client.post("/v1/chat/completions",
                                json={"messages": [{"role": "user", "content": f"the {word} was"}]}).json()["id"]  # fmt: skip
            assert client.post("/v1/feedback", json={"id": ident, "rating": "down",
                                                     "correction": "good great"}).status_code == 200  # fmt: skip
    export(log, "sft", tmp_path / "sft.jsonl")
    llama = write_tiny_llama(tmp_path / "llama")
    out = tmp_path / "run"
    assert main(["train", f"model={llama}", "task=causal-lm", "method=lora", f"data.train={tmp_path / 'sft.jsonl'}",
                 "train.epochs=1", "train.progress_bar=false", "generation.eval_samples=0",
                 f"output_dir={out}"]) == 0  # fmt: skip
    assert (out / "eval.json").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["format"] == "messages"
    pairs = export(log, "preference", tmp_path / "pairs.jsonl")
    assert len(pairs) == 16 and pairs[0] == {
        "prompt": "the movie was",
        "chosen": "good great",
        "rejected": ANSWER,
    }
    out = tmp_path / "dpo"
    assert main(["train", f"model={llama}", "task=preference", "method=lora", f"data.train={tmp_path / 'pairs.jsonl'}",
                 "train.epochs=1", "train.progress_bar=false", "generation.eval_samples=0",
                 f"output_dir={out}"]) == 0  # fmt: skip
    assert "reward_accuracy" in json.loads((out / "eval.json").read_text())["validation"]


def test_the_page_sends_thumbs_and_a_correction_in_headless_chromium(browser, tmp_path_factory, tmp_path):  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    log = tmp_path / "log"
    server = Server(trained_chat(tmp_path_factory), "--log", str(log), "--max-tokens", "8")
    try:
        browser.get(server.url + "/")
        browser.find_element(By.ID, "text").send_keys("the movie was")
        browser.find_element(By.ID, "send").click()
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "feedback").is_displayed())
        browser.find_element(By.ID, "up").click()
        WebDriverWait(browser, 30).until(lambda d: "saved" in d.find_element(By.ID, "thanks").text)
        browser.find_element(By.ID, "correction").send_keys("good great fine indeed")
        browser.find_element(By.ID, "send-correction").click()
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "correction").get_attribute("value") and
                                         "saved" in d.find_element(By.ID, "thanks").text)  # fmt: skip
        browser.save_screenshot(str(tmp_path / "feedback.png"))
    finally:
        server.stop()
    (answer,) = rows(log, "answers")
    assert answer[4] == "chat" and json.loads(answer[6]) == [ANSWER]
    assert [(f[1], f[4], f[6]) for f in rows(log, "feedback")] == [
        (answer[0], "up", None),
        (answer[0], "down", "good great fine indeed"),
    ]
