"""`tunelab studio` in headless Chromium, the issue's whole walk in one test: fill the new-run form
for a small classification run, see a field's error and fix it, start the run, watch its loss
curve gain points while it trains (and stop it, then resume it), open the finished run and its
confusion matrix and evaluate it on a picked file, compare it with a second run, and chat with a
tiny generative run in the playground.

A screenshot per step goes to $TUNELAB_ARTIFACTS (else the test's temp folder, `screenshots/`).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from .test_serve import browser, trained_chat, trained_classifier  # noqa: F401 - `browser` is a fixture

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("selenium")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from tunelab.studio import create_app  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def studio_url(tmp_path, tmp_path_factory, tiny_bert, sentiment_files):
    """A studio on a loopback port over a runs folder holding a finished classifier ("second") and a
    finished tiny chat run ("chat"), and a data folder holding the sentiment CSVs."""
    runs, data = tmp_path / "runs", tmp_path / "data"
    data.mkdir()
    for split in ("train", "validation"):
        shutil.copy(sentiment_files[split], data / f"{split}.csv")
    shutil.copytree(trained_classifier(tmp_path_factory, tiny_bert, sentiment_files), runs / "second")
    shutil.copytree(trained_chat(tmp_path_factory), runs / "chat")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(runs, data, cwd=tmp_path), host="127.0.0.1", port=port,
                                           log_level="warning", timeout_graceful_shutdown=1))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def wait(driver, condition, seconds: float = 60, message: str = ""):
    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(condition, message)


def run_names(driver) -> list[str]:
    """The runs table's rows, in the order shown."""
    return [tr.get_attribute("data-name") for tr in driver.find_elements(By.CSS_SELECTOR, "#runs tbody tr")]


def points(driver, chart: str) -> int:
    return int(driver.find_element(By.ID, chart).get_attribute("data-points") or 0)


def test_the_studio_walk_in_headless_chromium(browser, studio_url, tiny_bert, tmp_path):  # noqa: F811
    shots = Path(os.environ.get("TUNELAB_ARTIFACTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    browser.set_window_size(1400, 1000)

    def shot(name: str) -> None:
        browser.save_screenshot(str(shots / f"studio-{name}.png"))
        assert (shots / f"studio-{name}.png").stat().st_size > 5000

    def field(key: str):
        return browser.find_element(By.ID, f"f-{key}")

    def fill(key: str, value: str) -> None:
        box = field(key)
        box.clear()
        box.send_keys(value)

    # 1. the new-run form, generated from the config: defaults and help shown
    browser.get(studio_url + "/new")
    wait(browser, lambda d: d.find_elements(By.ID, "f-train.epochs"))
    assert field("train.epochs").get_attribute("value") == "3.0"
    assert "Passes over the training data" in browser.find_element(By.ID, "row-train.epochs").text
    fill("name", "first")
    fill("model", str(tiny_bert))
    Select(field("method")).select_by_value("full")
    fill("data.train", "train.csv")
    fill("data.validation", "validation.csv")
    fill("train.max_steps", "700")
    fill("train.log_steps", "5")
    fill("train.eval_steps", "100")
    fill("train.learning_rate", "0.003")
    fill("train.num_threads", "1")
    browser.execute_script("window.scrollTo(0, 0)")
    shot("1-form")

    # 2. a bad value: the error appears next to its field before anything starts; then fixed
    fill("train.epochs", "-1")
    browser.find_element(By.ID, "check").click()
    error = browser.find_element(By.ID, "err-train.epochs")
    wait(browser, lambda d: "must be > 0" in error.text, 30, "no error next to train.epochs")
    assert "invalid" in browser.find_element(By.ID, "row-train.epochs").get_attribute("class")
    shot("2-validation-error")
    fill("train.epochs", "1")
    browser.find_element(By.ID, "check").click()
    wait(browser, lambda d: error.text == "" and "config ok" in d.find_element(By.ID, "form-status").text, 30)

    # 3. start: an ordinary `tunelab train` process; the page moves to the run
    browser.find_element(By.ID, "start").click()
    wait(browser, lambda d: "/run?name=first" in d.current_url, 30, "Start did not open the run page")
    shot("3-started")

    # 4. the loss curve gains points while the run trains
    wait(browser, lambda d: points(d, "chart-loss") > 0 and "running" in d.find_element(By.ID, "status").text,
         120, "no loss point while training")  # fmt: skip
    seen = points(browser, "chart-loss")
    wait(browser, lambda d: points(d, "chart-loss") > seen, 60, "the loss curve did not grow")
    shot("4-training")

    # stop (SIGTERM: the run checkpoints and exits), then resume it from that checkpoint
    browser.find_element(By.ID, "stop").click()
    wait(
        browser, lambda d: "interrupted" in d.find_element(By.ID, "status").text, 60, "Stop did not interrupt"
    )
    stopped_at = points(browser, "chart-loss")
    assert 0 < stopped_at < 700 // 5
    shot("4b-stopped")
    wait(browser, lambda d: d.find_element(By.ID, "resume").is_enabled(), 30)
    browser.find_element(By.ID, "resume").click()
    wait(browser, lambda d: "running" in d.find_element(By.ID, "status").text, 60, "Resume did not start")

    # 5. the finished run: its page with the confusion matrix as a heat map
    wait(browser, lambda d: "finished" in d.find_element(By.ID, "status").text, 180, "the run did not finish")
    browser.get(studio_url + "/run?name=first")
    heat = wait(browser, lambda d: d.find_elements(By.ID, "confusion-validation"), 30, "no confusion matrix")[
        0
    ]
    labels = [th.text for th in heat.find_elements(By.CSS_SELECTOR, "thead th")][1:]
    assert labels == ["negative", "positive"]
    cells = [int(td.text) for td in heat.find_elements(By.CSS_SELECTOR, "td.cell")]
    assert sum(cells) == 32  # every validation row counted once
    assert points(browser, "chart-loss") == 700 // 5  # every logging step once, across the stop and resume
    shot("5-finished")
    # its Evaluate on a file: the data folder's picker, then `tunelab eval` and its metrics on the page
    browser.find_element(By.ID, "eval-file").click()
    wait(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#eval-picker a[data-file='validation.csv']"), 10
    )[0].click()
    metrics = wait(
        browser, lambda d: d.find_elements(By.CSS_SELECTOR, ".eval-metrics"), 120, "no eval metrics"
    )[0]
    assert '"accuracy"' in metrics.text

    # 6. compare it with the second run: picked on the runs table
    browser.get(studio_url + "/")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "input.pick")) == 3, 30)
    browser.find_element(By.CSS_SELECTOR, "th[data-key='name']").click()  # sorted by name
    assert run_names(browser) == ["chat", "first", "second"]
    browser.find_element(By.ID, "filter").send_keys("causal")  # filtered by task
    assert run_names(browser) == ["chat"]
    browser.find_element(By.ID, "filter").clear()
    browser.find_element(By.ID, "filter").send_keys(" ")  # an input event for the cleared box
    wait(browser, lambda d: len(run_names(browser)) == 3, 10)
    for name in ("first", "second"):
        browser.find_element(By.CSS_SELECTOR, f"input.pick[value='{name}']").click()
    shot("6a-runs")
    browser.find_element(By.ID, "compare-selected").click()
    table = wait(browser, lambda d: d.find_elements(By.ID, "side-by-side"), 30, "no side-by-side table")[0]
    assert [a.text for a in table.find_elements(By.CSS_SELECTOR, "thead a")] == ["first", "second"]
    assert "accuracy" in table.text
    assert points(browser, "compare-loss") > 0
    shot("6-compare")

    # 7. chat with the tiny generative run in the playground
    browser.get(studio_url + "/play?run=chat")
    wait(browser, lambda d: d.find_elements(By.ID, "text"))
    browser.find_element(By.ID, "text").send_keys("the movie was")
    browser.find_element(By.ID, "send").click()
    wait(browser, lambda d: d.find_element(By.ID, "play-status").text in ("done",) or "failed" in
         d.find_element(By.ID, "play-status").text, 120)  # fmt: skip
    assert browser.find_element(By.ID, "play-status").text == "done"
    reply = browser.find_element(By.CSS_SELECTOR, ".reply").text
    assert reply.strip(), "the model's reply is empty"
    shot("7-playground")
