"""`tunelab studio` without a browser (FastAPI's TestClient): the runs index read from run folders,
path traversal refused, the token for non-loopback clients, the CSRF token on POSTs, the new-run
form's field errors, and Start launching `tunelab train` into the runs folder; compare, eval on a
file and serve launched with the right argv (a real `tunelab eval` on a tiny run), their outputs
shown, servers stopped with the studio, and reviews listed with their reports and rated under
/review/<name>/."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("fastapi")
from starlette.testclient import TestClient  # noqa: E402

from tunelab.studio import create_app  # noqa: E402
from tunelab.studio.form import error_key, fields  # noqa: E402
from tunelab.studio.runs import index  # noqa: E402

from .conftest import sentiment_rows, write_csv  # noqa: E402

LOCAL = ("127.0.0.1", 50000)


def write_run(folder: Path, config: dict, metrics: list[dict], report: dict | None = None,
              env: dict | None = None) -> Path:  # fmt: skip
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if report is not None:
        (folder / "eval.json").write_text(json.dumps(report))
    if env is not None:
        (folder / "env.json").write_text(json.dumps(env))
    return folder


def dead_pid() -> int:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(done.stdout)


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """A runs folder with a finished, a running, an interrupted and a failed run, and a data folder."""
    runs, data = tmp_path / "runs", tmp_path / "data"
    data.mkdir()
    write_csv(data / "train.csv", sentiment_rows(20))
    classification = {"task": "classification", "method": "lora", "model": "/models/tiny-bert",
                      "train": {"epochs": 2.0, "max_steps": None, "metric_for_best": "auto"}}  # fmt: skip
    steps = [{"step": 5, "epoch": 0.5, "loss": 0.69, "lr": 1e-3, "samples_per_s": 40.0},
             {"step": 10, "epoch": 1.0, "loss": 0.5, "lr": 8e-4, "samples_per_s": 42.0},
             {"step": 10, "epoch": 1.0, "split": "validation", "accuracy": 0.75, "loss": 0.5}]  # fmt: skip
    write_run(runs / "done", classification, steps,
              {"validation": {"accuracy": 0.8, "confusion_matrix": {"labels": ["a", "b"], "matrix": [[4, 1], [1, 4]]}},
               "train": {"runtime_s": 12.5, "samples_per_s": 41.0, "steps": 20}})  # fmt: skip
    write_run(
        runs / ".training.partial", {**classification, "method": "full"}, steps, env={"pid": os.getpid()}
    )
    stopped = write_run(runs / ".stopped.partial", classification, steps[:1], env={"pid": dead_pid()})
    (stopped / "checkpoints" / "step-5").mkdir(parents=True)
    write_run(runs / ".broken.partial", classification, [], env={"pid": dead_pid()})
    return runs, data


def client_for(runs: Path, data: Path, host: str = "127.0.0.1", client: tuple[str, int] = LOCAL,
               token: str | None = None) -> TestClient:  # fmt: skip
    return TestClient(
        create_app(runs, data, host=host, token=token), base_url="http://127.0.0.1", client=client
    )


def csrf_headers(client: TestClient) -> dict[str, str]:
    client.get("/")  # the page sets the CSRF cookie
    return {"X-CSRF-Token": client.cookies["tunelab_studio_csrf"]}


def test_the_runs_index_reads_each_status_from_the_run_folders(folders):
    runs, data = folders
    rows = {r["name"]: r for r in client_for(runs, data).get("/api/runs").json()["runs"]}
    assert {name: r["status"] for name, r in rows.items()} == {
        "done": "finished", "training": "running", "stopped": "interrupted", "broken": "failed"}  # fmt: skip
    done, training = rows["done"], rows["training"]
    assert (done["task"], done["method"], done["model"]) == ("classification", "lora", "/models/tiny-bert")
    assert (done["metric"], done["value"], done["seconds"], done["samples_per_s"]) == (
        "accuracy",
        0.8,
        12.5,
        41.0,
    )
    assert training["method"] == "full" and training["folder"] == ".training.partial"
    assert training["progress"] == 0.5 and training["value"] == 0.75 and training["samples_per_s"] == 42.0
    assert training["eta_s"] is not None and training["pid"] == os.getpid()


def test_a_finished_folder_wins_over_a_stale_partial_only_while_nothing_trains(folders):
    runs, _ = folders
    write_run(runs / "training", {"task": "classification"}, [], {"validation": {"accuracy": 0.5}})
    statuses = {r.name: r.status for r in index(runs)}
    assert statuses["training"] == "running"  # the live partial (a resumed or restarted run) is the one shown


def test_the_run_page_api_gives_config_eval_and_metrics(folders):
    runs, data = folders
    body = client_for(runs, data).get("/api/run", params={"name": "done"}).json()
    assert body["config"]["method"] == "lora" and body["eval"]["validation"]["confusion_matrix"]["matrix"][
        0
    ] == [4, 1]
    assert [m["step"] for m in body["metrics"]] == [5, 10, 10]


@pytest.mark.parametrize(
    "url",
    [
        "/files/runs/..%2F..%2Fetc%2Fpasswd",
        "/files/runs/%2E%2E/%2E%2E/%2E%2E/etc/passwd",
        "/files/runs/%2Fetc%2Fpasswd",
        "/files/data/%252e%252e%252f%252e%252e%252fetc%252fpasswd",
        "/files/data/..%5C..%5Cetc%5Cpasswd",
        "/api/run?name=..%2F..%2Fetc",
        "/api/run?name=%2Fetc",
        "/api/files?folder=..%2F..",
        "/api/files?folder=%2Fetc",
        "/api/events?name=..%2F..%2Fetc",
    ],
)
def test_paths_outside_the_folders_are_refused(folders, url):
    runs, data = folders
    reply = client_for(runs, data).get(url)
    assert reply.status_code in (403, 404), reply.text
    assert "root:" not in reply.text


def test_a_symlink_out_of_the_runs_folder_is_refused_and_files_inside_are_served(folders, tmp_path):
    runs, data = folders
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    (runs / "done" / "leak.txt").symlink_to(secret)
    client = client_for(runs, data)
    assert client.get("/files/runs/done/leak.txt").status_code == 403
    served = client.get("/files/runs/done/eval.json")
    assert served.status_code == 200 and served.json()["validation"]["accuracy"] == 0.8
    assert client.get("/files/data/train.csv").text.startswith("text,label")


def test_a_non_loopback_client_needs_the_token(folders):
    runs, data = folders
    remote = client_for(runs, data, client=("203.0.113.7", 40000), token="s3cret")
    assert remote.get("/api/runs").status_code == 401
    assert remote.get("/api/runs", params={"token": "wrong"}).status_code == 401
    assert remote.get("/api/runs", headers={"Authorization": "token wrong"}).status_code == 401
    assert remote.get("/api/runs", headers={"Authorization": "token s3cret"}).status_code == 200
    assert remote.get("/", params={"token": "s3cret"}).status_code == 200  # once; then the cookie
    assert remote.get("/api/runs").status_code == 200
    local = client_for(runs, data)
    assert local.get("/api/runs").status_code == 200  # loopback-bound, loopback client: no token


def test_a_studio_bound_beyond_loopback_needs_the_token_from_every_client(folders):
    runs, data = folders
    client = client_for(runs, data, host="0.0.0.0", token="s3cret")
    assert client.get("/").status_code == 401
    assert client.get("/", headers={"Authorization": "token s3cret"}).status_code == 200


def test_another_host_name_is_refused_on_loopback(folders):
    runs, data = folders
    client = TestClient(create_app(runs, data), base_url="http://attacker.example", client=LOCAL)
    assert client.get("/api/runs").status_code == 403  # a rebound DNS name reaches 127.0.0.1


def test_posts_need_the_csrf_token(folders):
    runs, data = folders
    client = client_for(runs, data)
    values = {"data.train": "train.csv"}
    assert client.post("/api/check", json=values).status_code == 403
    assert client.post("/api/check", json=values, headers={"X-CSRF-Token": "guess"}).status_code == 403
    assert client.post("/api/start", json=values).status_code == 403
    assert client.post("/api/stop", json={"name": "training"}).status_code == 403
    ok = client.post("/api/check", json=values, headers=csrf_headers(client))
    assert ok.status_code == 200 and ok.json()["errors"] == {}


def test_the_form_puts_each_config_error_next_to_its_field(folders):
    runs, data = folders
    client = client_for(runs, data)
    headers = csrf_headers(client)
    cases = {
        "train.epochs": ({"data.train": "train.csv", "train.epochs": "-1"}, "must be > 0"),
        "lora.rank": ({"data.train": "train.csv", "lora.rank": "zero"}, "expected int"),
        "method": ({"data.train": "train.csv", "method": "bogus"}, "not a valid choice"),
        "data.train": ({"data.train": "../outside.csv"}, "outside the data folder"),
    }
    for key, (values, phrase) in cases.items():
        errors = client.post("/api/check", json=values, headers=headers).json()["errors"]
        assert key in errors and phrase in errors[key], (key, errors)


def test_every_config_field_is_in_the_form_with_its_doc_and_default():
    shown = {f.key: f for f in fields()}
    assert (
        shown["train.epochs"].default == 3.0 and "Passes over the training data" in shown["train.epochs"].doc
    )
    assert shown["method"].kind == "select" and "lora" in shown["method"].choices
    assert shown["data.train"].kind == "file" and shown["train.fast_kernels"].kind == "bool"
    assert "output_dir" not in shown  # the studio names the run folder itself
    assert error_key("train.epochs: -1.0 must be > 0") == "train.epochs"
    assert error_key("data.fill.name: expected str, got None") == "data.fill"  # a mapping's entry: its field
    assert error_key("something else went wrong") is None


def test_start_launches_tunelab_train_into_the_runs_folder(folders, monkeypatch, tmp_path):
    runs, data = folders
    (tmp_path / "tiny-bert").mkdir()
    app = create_app(runs, data)
    started = []
    monkeypatch.setattr(app.studio.jobs, "start", lambda kind, run, args: started.append((kind, run, args)) or
                        type("Job", (), {"run": run, "process": type("P", (), {"pid": 1})()})())  # fmt: skip
    client = TestClient(app, base_url="http://127.0.0.1", client=LOCAL)
    values = {
        "data.train": "train.csv",
        "model": str(tmp_path / "tiny-bert"),
        "method": "full",
        "train.epochs": "1",
    }
    reply = client.post("/api/start", json=values, headers=csrf_headers(client))
    assert reply.status_code == 200, reply.text
    ((kind, run, args),) = started
    assert kind == "train" and run.startswith("tiny-bert-full-")  # named as `tunelab train` names it
    assert args[0] == "train" and f"data.train={data / 'train.csv'}" in args and "method=full" in args
    assert f"output_dir={runs / run}" in args
    taken = client.post("/api/start", json={**values, "name": "done"}, headers=csrf_headers(client))
    assert taken.status_code == 400 and "exists" in taken.json()["errors"]["name"]


def test_a_finished_runs_events_are_its_metrics_then_done(folders):
    runs, data = folders
    with client_for(runs, data).stream("GET", "/api/events", params={"name": "done"}) as reply:
        text = "".join(reply.iter_text())
    events = [e for e in text.split("\n\n") if e]
    assert events[0].startswith("event: status") and '"status": "finished"' in events[0]
    assert [json.loads(e.removeprefix("data: "))["step"] for e in events[1:4]] == [5, 10, 10]
    assert events[-1].startswith("event: done")


def test_stop_and_export_refuse_what_cannot_be_done(folders):
    runs, data = folders
    client = client_for(runs, data)
    headers = csrf_headers(client)
    stop = client.post("/api/stop", json={"name": "stopped"}, headers=headers)
    assert stop.status_code == 409 and "not training" in stop.json()["error"]
    assert client.post("/api/resume", json={"name": "broken"}, headers=headers).status_code == 409
    bad = client.post("/api/export", json={"name": "done", "kind": "zip"}, headers=headers)
    assert bad.status_code == 400 and "merge" in bad.json()["error"]
    assert (
        client.post("/api/export", json={"name": "training", "kind": "merge"}, headers=headers).status_code
        == 409
    )


def test_the_data_check_preview_reads_the_forms_data(folders, tiny_bert):
    runs, data = folders
    client = client_for(runs, data)
    values = {"data.train": "train.csv", "model": str(tiny_bert)}
    body = client.post("/api/datacheck", json=values, headers=csrf_headers(client)).json()
    assert body["errors"] == {} and body["report"]["rows"]["train"] == 20
    assert body["report"]["labels"]["train"] == {"positive": 10, "negative": 10}
    assert (
        "data.train" in client.post("/api/datacheck", json={}, headers=csrf_headers(client)).json()["errors"]
    )


def test_the_command_prints_the_token_only_off_loopback(folders, monkeypatch, capsys):
    from tunelab.cli import main
    from tunelab.studio import app as studio_app

    runs, data = folders
    served = []
    monkeypatch.setattr(studio_app.uvicorn, "run", lambda guard, **kw: served.append((guard, kw)))
    assert main(["studio", "--runs", str(runs), "--data", str(data), "--port", "7999"]) == 0
    assert "open http://127.0.0.1:7999/\n" in capsys.readouterr().out and served[-1][1]["host"] == "127.0.0.1"
    assert main(["studio", "--runs", str(runs), "--data", str(data), "--host", "0.0.0.0"]) == 0
    token = served[-1][0].studio.token
    assert f"open http://0.0.0.0:7860/?token={token}" in capsys.readouterr().out
    assert main(["studio", "--runs", str(runs), "--data", str(data / "missing")]) == 2
    assert "--data" in capsys.readouterr().err


def test_compare_reports_are_listed_and_open_in_place_sandboxed(folders):
    runs, data = folders
    (runs / "compare-sst2").mkdir()
    (runs / "compare-sst2" / "report.html").write_text("<h1>tunelab compare: sst2</h1>")
    write_run(runs / "compare-sst2" / "lora-seed42", {"task": "classification", "method": "lora"}, [], {})
    client = client_for(runs, data)
    body = client.get("/api/runs").json()
    assert body["reports"] == ["compare-sst2/report.html"]
    assert "compare-sst2/lora-seed42" in {r["name"] for r in body["runs"]}  # a compare's runs, one level down
    report = client.get("/files/runs/compare-sst2/report.html")
    assert report.status_code == 200 and "tunelab compare: sst2" in report.text
    assert report.headers["content-security-policy"] == "sandbox"


def test_the_estimate_button_runs_tunelab_estimate_for_the_forms_method(folders, tiny_bert):
    runs, data = folders
    client = client_for(runs, data)
    values = {"data.train": "train.csv", "model": str(tiny_bert), "method": "full"}
    body = client.post("/api/estimate", json=values, headers=csrf_headers(client)).json()
    assert body["errors"] == {}, body
    (method,) = body["estimate"]["methods"]
    assert method["method"] == "full" and method["trainable_params"] > 0 and method["epoch_s"] > 0


def test_a_run_that_stops_before_writing_its_folder_shows_failed_with_its_output(folders, tmp_path):
    runs, data = folders
    app = create_app(runs, data)
    fails = "import sys; print('error: train.csv has no column text'); sys.exit(2)"
    app.studio.jobs.command = [sys.executable, "-c", fails]  # in place of `python -m tunelab`
    client = TestClient(app, base_url="http://127.0.0.1", client=LOCAL)
    values = {"data.train": "train.csv", "model": str(tmp_path), "method": "full", "name": "doomed"}
    assert client.post("/api/start", json=values, headers=csrf_headers(client)).status_code == 200
    app.studio.jobs.jobs[("doomed", "train")].process.wait(30)
    with client.stream("GET", "/api/events", params={"name": "doomed"}) as reply:
        text = "".join(reply.iter_text())
    assert '"status": "failed"' in text and text.endswith("event: done\ndata: {}\n\n")
    body = client.get("/api/run", params={"name": "doomed"}).json()
    assert body["info"]["status"] == "failed"
    (job,) = body["jobs"]
    assert job["returncode"] == 2 and "train.csv has no column text" in job["log"]


# ------------------------------------------------- compare, eval on a file, serve, reviews


def recording(app) -> list[tuple[str, str, list[str]]]:
    """Replace the app's process launcher with one that records what it would start."""
    started: list[tuple[str, str, list[str]]] = []

    def start(kind, run, args, extra=None):
        started.append((kind, run, args))
        return type("Job", (), {"run": run, "process": type("P", (), {"pid": 1})()})()

    app.studio.jobs.start = start
    return started


def test_compare_starts_tunelab_compare_from_a_picked_config_or_the_forms_values(folders, tmp_path):
    runs, data = folders
    (data / "exp.yaml").write_text(yaml.safe_dump({"data": {"train": "train.csv"}}))
    (tmp_path / "tiny-bert").mkdir()
    app = create_app(runs, data)
    started = recording(app)
    client = TestClient(app, base_url="http://127.0.0.1", client=LOCAL)
    body = {"config": "exp.yaml", "methods": ["none", "lora"], "name": "cmp"}
    assert client.post("/api/compare", json=body).status_code == 403  # no CSRF token
    headers = csrf_headers(client)
    reply = client.post("/api/compare", json=body, headers=headers)
    assert reply.status_code == 200 and reply.json()["name"] == "cmp", reply.text
    assert started[-1] == ("compare", "cmp", ["compare", str(data / "exp.yaml"), "train.progress_bar=false",
                                               "--methods", "none,lora", "--out", str(runs / "cmp")])  # fmt: skip
    values = {"data.train": "train.csv", "model": str(tmp_path / "tiny-bert"), "train.epochs": "1"}
    reply = client.post("/api/compare", json={"values": values, "methods": ["full"]}, headers=headers)
    assert reply.status_code == 200, reply.text
    kind, run, args = started[-1]
    assert kind == "compare" and run.startswith("compare-tiny-bert-") and args[0] == "compare"
    assert f"data.train={data / 'train.csv'}" in args and "train.epochs=1" in args
    assert args[-4:] == ["--methods", "full", "--out", str(runs / run)]
    refused_ = [
        ({"config": "../outside.yaml", "methods": ["lora"]}, 403),
        ({"config": "%2E%2E/%2E%2E/etc/passwd", "methods": ["lora"]}, 403),
        ({"config": "train.csv", "methods": ["lora"]}, 400),  # not a YAML config
        ({"config": "exp.yaml", "methods": ["lora", "rm -rf"]}, 400),
        ({"config": "exp.yaml", "methods": []}, 400),
        ({"config": "exp.yaml", "methods": ["lora"], "name": "../escape"}, 400),
        ({"config": "exp.yaml", "methods": ["lora"], "name": "done"}, 400),  # exists
        ({"values": {"data.train": "../x.csv"}, "methods": ["lora"]}, 400),
    ]
    for body, status in refused_:
        assert client.post("/api/compare", json=body, headers=headers).status_code == status, body
    assert len(started) == 2


def test_a_compare_jobs_page_shows_its_output_then_its_report_in_place(folders):
    runs, data = folders
    (data / "exp.yaml").write_text("task: classification\n")
    app = create_app(runs, data)
    # in place of `python -m tunelab`: a compare that prints a line and writes its report into --out
    app.studio.jobs.command = [sys.executable, "-c", "import sys, pathlib; "
                               "out = pathlib.Path(sys.argv[sys.argv.index('--out') + 1]); "
                               "print('tunelab: compare training lora', flush=True); out.mkdir(); "
                               "(out / 'report.html').write_text('<h1>tunelab compare: exp</h1>')"]  # fmt: skip
    client = TestClient(app, base_url="http://127.0.0.1", client=LOCAL)
    reply = client.post("/api/compare", json={"config": "exp.yaml", "methods": ["lora"], "name": "cmp"},
                        headers=csrf_headers(client))  # fmt: skip
    assert reply.status_code == 200, reply.text
    app.studio.jobs.get("cmp", "compare").process.wait(30)
    job = client.get("/api/job", params={"run": "cmp", "kind": "compare"}).json()
    assert job["returncode"] == 0 and "tunelab: compare training lora" in job["log"]
    assert job["report"] == "cmp/report.html"
    assert "tunelab compare: exp" in client.get("/files/runs/" + job["report"]).text
    assert client.get("/job", params={"run": "cmp", "kind": "compare"}).status_code == 200
    assert client.get("/api/job", params={"run": "done", "kind": "compare"}).status_code == 404
    assert client.get("/api/job", params={"run": "../..", "kind": "compare"}).status_code == 403


def test_eval_on_a_file_runs_tunelab_eval_and_shows_its_metrics(tmp_path, tmp_path_factory, tiny_bert,
                                                                sentiment_files):  # fmt: skip
    from .test_serve import trained_classifier

    runs, data = tmp_path / "runs", tmp_path / "data"
    data.mkdir()
    shutil.copy(sentiment_files["test"], data / "heldout.csv")
    shutil.copytree(trained_classifier(tmp_path_factory, tiny_bert, sentiment_files), runs / "clf")
    app = create_app(runs, data, cwd=tmp_path)
    client = TestClient(app, base_url="http://127.0.0.1", client=LOCAL)
    headers = csrf_headers(client)
    assert client.post("/api/eval", json={"name": "clf", "file": "heldout.csv"}).status_code == 403  # no CSRF
    for body, status in [({"name": "clf", "file": "../runs/clf/config.yaml"}, 403),
                         ({"name": "clf", "file": "/etc/passwd"}, 403),
                         ({"name": "../clf", "file": "heldout.csv"}, 403),
                         ({"name": "clf", "file": "missing.csv"}, 404)]:  # fmt: skip
        assert client.post("/api/eval", json=body, headers=headers).status_code == status, body
    reply = client.post("/api/eval", json={"name": "clf", "file": "heldout.csv"}, headers=headers)
    assert reply.status_code == 200 and reply.json()["output"] == "clf/eval-heldout.json", reply.text
    job = app.studio.jobs.get("clf", "eval")
    assert job.argv[-4:] == ["eval", str(runs / "clf"), "--data", str(data / "heldout.csv")]
    assert job.process.wait(120) == 0, job.log.read_text()
    (shown,) = [
        j for j in client.get("/api/run", params={"name": "clf"}).json()["jobs"] if j["kind"] == "eval"
    ]
    written = json.loads((runs / "clf" / "eval-heldout.json").read_text())
    assert shown["metrics"] == written and 0.0 <= written["accuracy"] <= 1.0
    assert shown["file"] == "heldout.csv" and "accuracy" in shown["log"]


def test_serve_starts_on_a_free_loopback_port_and_stops_with_its_button_or_the_studio(folders):
    runs, data = folders
    app = create_app(runs, data)
    app.studio.jobs.command = [
        sys.executable,
        "-c",
        "import time; time.sleep(60)",
    ]  # in place of tunelab serve
    with TestClient(app, base_url="http://127.0.0.1", client=LOCAL) as client:  # with: the studio's lifespan
        headers = csrf_headers(client)
        assert client.post("/api/serve", json={"name": "done"}).status_code == 403  # no CSRF
        assert client.post("/api/serve", json={"name": "training"}, headers=headers).status_code == 409
        assert client.post("/api/serve", json={"name": "../done"}, headers=headers).status_code == 403
        reply = client.post("/api/serve", json={"name": "done"}, headers=headers).json()
        port = reply["port"]
        first = app.studio.jobs.get("done", "serve")
        assert first.argv[-6:] == ["serve", str(runs / "done"), "--host", "127.0.0.1", "--port", str(port)]
        assert reply["url"] == f"http://127.0.0.1:{port}/"
        assert (
            client.post("/api/serve", json={"name": "done"}, headers=headers).status_code == 409
        )  # one per run
        shown = client.get("/api/run", params={"name": "done"}).json()["jobs"]
        assert [(j["kind"], j["alive"], j["url"]) for j in shown] == [("serve", True, reply["url"])]
        assert client.post("/api/serve/stop", json={"name": "done"}, headers=headers).json() == {
            "stopped": first.process.pid}  # fmt: skip
        assert first.process.poll() is not None
        assert client.post("/api/serve/stop", json={"name": "done"}, headers=headers).status_code == 409
        assert client.post("/api/serve", json={"name": "done"}, headers=headers).status_code == 200
        second = app.studio.jobs.get("done", "serve")
        assert second.alive
    assert second.process.poll() is not None  # the studio stopped the server it started when it exited


@pytest.fixture
def reviews(tmp_path: Path) -> Path:
    from tunelab.review.store import Review

    folder = tmp_path / "reviews"
    items = [("the movie was", "great", "bad"), ("the plot was", "thin", "tight")]
    review = Review.create(folder / "lora-vs-base", "runs/lora", "base", items)
    review.rate(1, "ana", "a", 4, None)
    review.rate(2, "ana", "tie", None, None)
    (folder / "not-a-review").mkdir()
    return folder


def test_reviews_are_listed_with_their_report_and_rated_under_the_studio(folders, reviews):
    runs, data = folders
    client = TestClient(create_app(runs, data, reviews=reviews), base_url="http://127.0.0.1", client=LOCAL)
    assert client.get("/reviews").status_code == 200
    (shown,) = client.get("/api/reviews").json()["reviews"]
    assert shown["name"] == "lora-vs-base" and (shown["a"], shown["b"], shown["ratings"]) == (
        "runs/lora",
        "base",
        2,
    )
    assert shown["win_rate_a"] == 0.75 and len(shown["ci95"]) == 2 and len(shown["per_prompt"]) == 2
    moved = client.get("/review/lora-vs-base", follow_redirects=False)
    assert moved.status_code == 307 and moved.headers["location"] == "/review/lora-vs-base/"
    page = client.get("/review/lora-vs-base/").text
    assert 'fetch("api/next' in page and 'fetch("api/rate' in page and 'fetch("/api' not in page
    item = client.get("/review/lora-vs-base/api/next", params={"reviewer": "bo"}).json()["item"]
    rating = {"item": item["id"], "reviewer": "bo", "pick": "tie"}
    assert client.post("/review/lora-vs-base/api/rate", json=rating).status_code == 403  # no CSRF
    rated = client.post("/review/lora-vs-base/api/rate", json=rating, headers=csrf_headers(client))
    assert rated.status_code == 200 and rated.json()["done"] == 1
    assert client.get("/api/reviews").json()["reviews"][0]["ratings"] == 3
    for url in ["/review/not-a-review/", "/review/missing/", "/review/..%2F..%2Fetc/", "/review/%2Fetc/",
                "/review/lora-vs-base%2F..%2F..%2Fruns/"]:  # fmt: skip
        reply = client.get(url)
        assert reply.status_code in (403, 404) and "prompt" not in reply.text, url


def test_no_reviews_folder_lists_none(folders, tmp_path):
    runs, data = folders
    client = client_for(runs, data)
    app = create_app(runs, data, reviews=tmp_path / "absent")
    assert (
        TestClient(app, base_url="http://127.0.0.1", client=LOCAL).get("/api/reviews").json()["reviews"] == []
    )
    assert not (tmp_path / "absent").exists() and client.get("/reviews").status_code == 200


def test_the_command_takes_the_reviews_folder(folders, reviews, monkeypatch):
    from tunelab.cli import main
    from tunelab.studio import app as studio_app

    runs, data = folders
    served = []
    monkeypatch.setattr(studio_app.uvicorn, "run", lambda guard, **kw: served.append(guard))
    assert main(["studio", "--runs", str(runs), "--data", str(data), "--reviews", str(reviews)]) == 0
    assert served[-1].studio.reviews == reviews.resolve()
    monkeypatch.chdir(runs.parent)
    assert main(["studio", "--runs", str(runs), "--data", str(data)]) == 0
    assert served[-1].studio.reviews == runs.parent / "reviews"  # the default: ./reviews
