"""`tunelab serve` as a real process on a loopback port: classification and chat endpoints, the
official openai client (completions, chat, streaming), auth from the environment, the CLI's limits
reaching the server, the install hint without FastAPI, and the page in headless Chromium.

Also the helpers the test_serve_*.py modules share: trained tiny runs (trained once per session
and kept in the session's temp folder) and FakeRun, a stand-in model for fast tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from tunelab.cli import main
from tunelab.config import GenerationConfig

from .conftest import write_tiny_llama

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
ANSWER = "good great fine"


# ------------------------------------------------------------------ shared by test_serve_*.py


def trained_classifier(
    tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path, sentiment_files: dict
) -> Path:
    """A tiny BERT sentiment classifier run, trained on first use in this session."""
    out = tmp_path_factory.getbasetemp() / "serve-runs" / "classifier" / "run"
    if not (out / "model").is_dir():
        assert (
            main(
                [
                    "train",
                    f"model={tiny_bert}",
                    "method=full",
                    "full.train_embeddings=true",
                    f"data.train={sentiment_files['train']}",
                    "--overwrite",
                    "train.epochs=2",
                    "train.learning_rate=3e-3",
                    "train.progress_bar=false",
                    f"output_dir={out}",
                ]
            )
            == 0
        )
    return out


def trained_chat(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama instruction run that answers ANSWER, trained on first use in this session."""
    folder = tmp_path_factory.getbasetemp() / "serve-runs" / "chat"
    out = folder / "run"
    if not (out / "model").is_dir():
        llama = write_tiny_llama(folder / "llama")
        rows = [
            {"instruction": f"the {w} was", "output": ANSWER}
            for w in ["movie", "film", "plot", "acting"] * 12
        ]
        (folder / "train.json").write_text(json.dumps(rows))
        assert (
            main(
                [
                    "train",
                    f"model={llama}",
                    "task=causal-lm",
                    "method=full",
                    f"data.train={folder / 'train.json'}",
                    "train.epochs=6",
                    "train.learning_rate=3e-3",
                    "train.progress_bar=false",
                    "--overwrite",
                    "generation.eval_samples=0",
                    f"output_dir={out}",
                ]
            )
            == 0
        )
    return out


class FakeTokenizer:
    """Words are tokens."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[str]]:
        return {"input_ids": text.split()}


class FakeRun:
    """A stand-in for a loaded run: labels by keyword, answers ANSWER, and records every model call.

    Clear `gate` to hold the model (every call waits until it is set again; `started` tells that
    one has begun); set `fail` to make model calls raise."""

    def __init__(self, task: str = "classification", name: str = "fake") -> None:
        self.path = Path("/runs") / name
        self.config = SimpleNamespace(task=task, generation=GenerationConfig(max_new_tokens=8))
        self.task = SimpleNamespace(prompt_for=self.prompt_for)
        self.tokenizer = FakeTokenizer()
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()  # set when a model call begins (before it waits for the gate)
        self.fail: Exception | None = None
        self.calls: list[list[str]] = []
        self.options: list[Any] = []
        self.threads: set[str] = set()

    def prompt_for(self, text: str, tokenizer: Any, history: list[dict[str, str]] | None = None) -> str:
        if text == "reject me":
            raise ValueError("template says no")
        return "".join(f"{m['role']}: {m['content']}\n" for m in history or []) + f"user: {text}\nassistant:"

    def _model_call(self, inputs: list[str]) -> None:
        self.started.set()
        assert self.gate.wait(30), "the test never released the model"
        self.threads.add(threading.current_thread().name)
        self.calls.append(list(inputs))
        if self.fail is not None:
            raise self.fail

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        self._model_call(texts)
        return [{"label": "positive" if "good" in t else "negative", "score": 0.9} for t in texts]

    def generate(
        self,
        prompts: list[str],
        streamer: Any = None,
        max_new_tokens: int | None = None,
        options: Any = None,
        stop: tuple[str, ...] = (),
    ) -> list[str]:
        self.options.append((max_new_tokens, options, stop))
        self._model_call(prompts)
        if streamer is not None:  # as transformers' streamers hand on decoded text, word by word
            for word in ANSWER.split():
                streamer.on_finalized_text(word + " ")
            streamer.on_finalized_text("", stream_end=True)
        return [ANSWER for _ in prompts]


# ------------------------------------------------------------------ the real process


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
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
        )
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
        # a clean stop: uvicorn ran the app's shutdown (which joins the model thread) and then ended
        # by the signal it was sent, as uvicorn does; a failed shutdown would print its traceback
        output = self.process.stdout.read()
        assert self.process.returncode in (0, -signal.SIGTERM) and "Traceback" not in output, output


@pytest.fixture(scope="module")
def classifier_run(tmp_path_factory, tiny_bert, sentiment_files):
    return trained_classifier(tmp_path_factory, tiny_bert, sentiment_files)


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    return trained_chat(tmp_path_factory)


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


def test_the_cli_limits_reach_the_server(classifier, chat):
    many = httpx.post(classifier.url + "/v1/classify", json={"input": ["good"] * 9})
    assert (
        many.status_code == 400 and "9 inputs; the limit is 8 per request" in many.json()["error"]["message"]
    )
    long = httpx.post(chat.url + "/v1/completions", json={"prompt": "the plot was", "max_tokens": 17})
    assert long.status_code == 400 and "max_tokens: 17; the limit is 16" in long.json()["error"]["message"]


def test_chat_completions_with_the_openai_client(chat):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=chat.url + "/v1", api_key="unused")
    reply = client.chat.completions.create(
        model="run", messages=[{"role": "user", "content": "the plot was"}], max_tokens=8
    )
    assert reply.choices[0].message.content == ANSWER
    assert reply.usage.completion_tokens == 3 and reply.usage.prompt_tokens > 3
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="run", messages=[{"role": "user", "content": "the movie was"}], max_tokens=8, stream=True
        )
    ]
    assert "".join(pieces).strip() == ANSWER and len([p for p in pieces if p]) >= 2  # it streamed in pieces
    completion = client.completions.create(
        model="run", prompt="### Instruction:\nthe film was\n\n### Response:\n", max_tokens=8
    )
    assert completion.choices[0].text == ANSWER
    stopped = client.chat.completions.create(
        model="run", messages=[{"role": "user", "content": "the plot was"}], max_tokens=8, stop=["great"]
    )
    assert stopped.choices[0].message.content.strip() == "good"


def test_api_key_is_required_when_set(classifier_run):
    server = Server(classifier_run, env={"TUNELAB_API_KEY": "s3cret"})
    try:
        assert httpx.post(server.url + "/v1/classify", json={"input": "good"}).status_code == 401
        wrong = httpx.post(
            server.url + "/v1/classify", json={"input": "good"}, headers={"Authorization": "Bearer x"}
        )
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        right = httpx.post(
            server.url + "/v1/classify", json={"input": "good"}, headers={"Authorization": "Bearer s3cret"}
        )
        assert right.status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200  # health stays open for probes
    finally:
        server.stop()


def test_without_fastapi_serve_says_what_to_install(tmp_path):
    hide_fastapi = (  # an import of fastapi now fails as if it were not installed
        "import sys; sys.modules['fastapi'] = None\n"
        "from tunelab.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", hide_fastapi, "serve", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: serving needs FastAPI and uvicorn: pip install 'tunelab[serve]'"
    ]


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
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
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
