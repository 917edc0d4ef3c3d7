"""`tunelab serve` as a real process on a loopback port: classification and chat endpoints, the
official openai client (completions, chat, streaming), micro-batching under concurrency, every
class of bad request, auth, exported folders, and the page in headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tunelab.cli import main

from .conftest import write_tiny_llama

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
ANSWER = "good great fine"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, target: Path, *args: str, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tunelab", "serve", str(target), "--port", str(self.port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited: {self.process.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("server did not start")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_bert, sentiment_files):
    out = tmp_path_factory.mktemp("serve-cls") / "run"
    assert main(["train", f"model={tiny_bert}", "method=full", "full.train_embeddings=true",
                 f"data.train={sentiment_files['train']}",
                 "train.epochs=2", "train.learning_rate=3e-3", "train.progress_bar=false", f"output_dir={out}"]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve-chat")
    llama = write_tiny_llama(folder / "llama")
    rows = [
        {"instruction": f"the {w} was", "output": ANSWER} for w in ["movie", "film", "plot", "acting"] * 12
    ]
    (folder / "train.json").write_text(json.dumps(rows))
    out = folder / "run"
    assert main(["train", f"model={llama}", "task=causal-lm", "method=full", f"data.train={folder / 'train.json'}",
                 "train.epochs=6", "train.learning_rate=3e-3", "train.progress_bar=false",
                 "generation.eval_samples=0", f"output_dir={out}"]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def classifier(classifier_run):
    server = Server(classifier_run, "--max-batch", "8", "--max-input-tokens", "32", "--batch-wait-ms", "50")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chat(chat_run):
    server = Server(chat_run, "--max-tokens", "16")
    yield server
    server.stop()


def test_health_models_and_classify(classifier):
    health = httpx.get(classifier.url + "/health").json()
    assert health["status"] == "ok" and health["task"] == "classification"
    assert httpx.get(classifier.url + "/v1/models").json()["data"][0]["id"] == "run"
    one = httpx.post(classifier.url + "/v1/classify", json={"input": "a lovely warm film"}).json()
    assert one["data"][0]["label"] == "positive"
    assert set(one["data"][0]["probabilities"]) == {"negative", "positive"}
    two = httpx.post(classifier.url + "/v1/classify", json={"input": ["so good", "so awful"]}).json()
    assert [d["label"] for d in two["data"]] == ["positive", "negative"]


def test_concurrent_requests_share_model_calls(classifier):
    before = httpx.get(classifier.url + "/health").json()

    def ask(i):
        return httpx.post(
            classifier.url + "/v1/classify", json={"input": f"the plot was good {i}"}, timeout=60
        )

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(ask, range(32)))
    assert all(r.status_code == 200 for r in replies)
    after = httpx.get(classifier.url + "/health").json()
    requests, calls = after["requests"] - before["requests"], after["model_calls"] - before["model_calls"]
    assert requests == 32 and calls < requests  # requests arriving together were batched


@pytest.mark.parametrize(
    "path, body, status, message",
    [
        ("/v1/classify", "{not json", 400, "not valid JSON"),
        ("/v1/classify", {"text": "x"}, 400, "input: Field required"),
        ("/v1/classify", {"input": 5}, 400, "input"),
        ("/v1/classify", {"input": []}, 400, "input: give at least one input"),
        ("/v1/classify", {"input": ["good"] * 9}, 400, "input: 9 inputs; the limit is 8 per request"),
        ("/v1/classify", {"input": "good " * 40}, 400, "tokens; the limit is 32"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, 404, "runs a classification model; use /v1/classify"),
        ("/v1/nothing", {}, 404, "Not Found"),
    ],
)  # fmt: skip
def test_bad_requests_get_4xx_with_an_openai_style_error(classifier, path, body, status, message):
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    reply = httpx.post(classifier.url + path, headers={"content-type": "application/json"}, **kwargs)
    assert reply.status_code == status
    error = reply.json()["error"]
    assert message in error["message"] and error["type"].endswith("_error")
    assert httpx.get(classifier.url + "/health").status_code == 200  # the worker is still alive


def test_chat_completions_with_the_openai_client(chat):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=chat.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "the plot was"}],
                                           max_tokens=8)  # fmt: skip
    assert reply.choices[0].message.content == ANSWER
    assert reply.usage.completion_tokens == 3 and reply.usage.prompt_tokens > 3
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="run", messages=[{"role": "user", "content": "the movie was"}], max_tokens=8, stream=True)]  # fmt: skip
    assert "".join(pieces).strip() == ANSWER and len([p for p in pieces if p]) >= 2  # it streamed in pieces
    completion = client.completions.create(model="run", prompt="### Instruction:\nthe film was\n\n### Response:\n",
                                           max_tokens=8)  # fmt: skip
    assert completion.choices[0].text == ANSWER
    stopped = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "the plot was"}],
                                             max_tokens=8, stop=["great"])  # fmt: skip
    assert stopped.choices[0].message.content.strip() == "good"


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
    reply = httpx.post(chat.url + "/v1/chat/completions", json=body)
    assert reply.status_code == 400 and message in reply.json()["error"]["message"]


def test_api_key_is_required_when_set(classifier_run):
    server = Server(classifier_run, env={"TUNELAB_API_KEY": "s3cret"})
    try:
        assert httpx.post(server.url + "/v1/classify", json={"input": "good"}).status_code == 401
        wrong = httpx.post(
            server.url + "/v1/classify", json={"input": "good"}, headers={"Authorization": "Bearer x"}
        )
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        right = httpx.post(server.url + "/v1/classify", json={"input": "good"},
                           headers={"Authorization": "Bearer s3cret"})  # fmt: skip
        assert right.status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200  # health stays open for probes
    finally:
        server.stop()


def test_an_exported_folder_serves_the_same_answers(classifier_run, classifier, tmp_path):
    exported = tmp_path / "merged"
    assert main(["export", str(classifier_run), "--merge", "--out", str(exported)]) == 0
    server = Server(exported)
    try:
        texts = ["so good", "so awful", "the plot was dull"]
        a = httpx.post(server.url + "/v1/classify", json={"input": texts}).json()["data"]
        b = httpx.post(classifier.url + "/v1/classify", json={"input": texts}).json()["data"]
        assert [x["label"] for x in a] == [x["label"] for x in b]
        assert [x["score"] for x in a] == pytest.approx([x["score"] for x in b], abs=1e-4)
    finally:
        server.stop()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Debian Chromium driven through chromedriver (make install adds both)."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("Chromium and chromedriver are not installed (make install adds Debian's packages)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def use_page(browser, url: str, text: str, tmp_path: Path, shot: str) -> str:
    """Type into the page's box, press Send, wait for the answer; return the answer's HTML."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(url)
    browser.find_element(By.ID, "text").send_keys(text)
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "status").text in ("done", "failed"))
    assert browser.find_element(By.ID, "status").text == "done", browser.find_element(By.ID, "answer").text
    browser.save_screenshot(str(tmp_path / shot))
    assert (tmp_path / shot).stat().st_size > 1000
    return browser.find_element(By.ID, "answer").get_attribute("innerHTML")


def test_the_page_classifies_and_chats_in_headless_chromium(browser, classifier, chat, tmp_path):
    answer = use_page(browser, classifier.url + "/", "a lovely warm film", tmp_path, "classify.png")
    assert '<table id="scores">' in answer and '<td class="label">positive</td>' in answer
    first_label = answer.split('<td class="label">')[1].split("<")[0]
    assert first_label == "positive"  # the most likely label is listed first
    answer = use_page(browser, chat.url + "/", "the movie was", tmp_path, "chat.png")
    assert answer == ANSWER
