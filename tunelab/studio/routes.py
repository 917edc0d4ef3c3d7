"""The pages and the JSON API of `tunelab studio`.

Pages: `/` (runs), `/run?name=`, `/new`, `/compare?runs=a,b`, `/job?run=&kind=`, `/play?run=`,
`/reviews`. API: the runs index, a run's files and its metrics as server-sent events, stop /
resume / export / eval on a file / serve, the new-run form (fields, check, data check, estimate,
start), `tunelab compare` started and watched, the reviews with their reports, and files under
the runs and data folders. Every run, file or review name is resolved inside its folder first
(`security.inside`).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse

from tunelab.config import to_dict
from tunelab.datacheck import check_config
from tunelab.errors import TunelabError
from tunelab.run import default_output_dir
from tunelab.studio import form, pages
from tunelab.studio.jobs import Job, free_port
from tunelab.studio.reviews import review_names, summary
from tunelab.studio.runs import (
    RunInfo,
    describe,
    index,
    partial_of,
    read_json,
    read_metrics,
    read_yaml,
    reports,
)
from tunelab.studio.security import Refused, inside

router = APIRouter()
POLL_S = 0.5  # how often a run's event stream looks at its metrics.jsonl
ESTIMATE_TIMEOUT_S = 600


async def shared(request: Request) -> Any:
    return request.app.state.studio


Studio = Annotated[Any, Depends(shared)]


def refused(error: Refused) -> JSONResponse:
    return JSONResponse({"error": error.message}, error.status)


def run_folder(studio: Any, name: str) -> Path:
    """Where run `name`'s files are now: its hidden partial folder while it trains, else its folder.

    Raises:
        Refused: a name outside the runs folder (403), or no such run (404).
    """
    path = inside(studio.runs, name)
    partial = partial_of(path)
    if partial.is_dir():
        return partial
    if path.is_dir():
        return path
    raise Refused(404, f"no run named {name}")


# ---------------------------------------------------------------------------------------- pages


@router.get("/", response_class=HTMLResponse)
async def runs_page() -> str:
    return pages.page("runs", "Runs")


@router.get("/run", response_class=HTMLResponse)
async def run_page(name: str) -> str:
    return pages.page("run", name)


@router.get("/new", response_class=HTMLResponse)
async def new_page() -> str:
    return pages.page("new", "New run")


@router.get("/compare", response_class=HTMLResponse)
async def compare_page() -> str:
    return pages.page("compare", "Compare")


@router.get("/play", response_class=HTMLResponse)
async def play_page() -> str:
    return pages.page("play", "Playground")


@router.get("/job", response_class=HTMLResponse)
async def job_page(run: str, kind: str) -> str:
    return pages.page("job", f"tunelab {kind}: {run}")


@router.get("/reviews", response_class=HTMLResponse)
async def reviews_page() -> str:
    return pages.page("reviews", "Reviews")


# ------------------------------------------------------------------------------------------ runs


@router.get("/api/runs")
async def runs(studio: Studio) -> dict[str, Any]:
    rows = await asyncio.to_thread(index, studio.runs, studio.jobs.live_pids())
    return {"runs": [r.as_dict() for r in rows], "reports": reports(studio.runs)}


@router.get("/api/run")
async def run_detail(studio: Studio, name: str) -> Any:
    """Everything the run page shows: the row, config, eval.json, metrics, samples, the log."""
    try:
        folder = run_folder(studio, name)
    except Refused as e:
        jobs = studio.jobs.of(name) if e.status == 404 else []
        if not jobs:
            return refused(e)
        # started here, no folder yet: still loading, or it stopped before writing one (its log says why)
        info = RunInfo(name=name, status="starting" if any(j.alive for j in jobs) else "failed")
        return {"info": info.as_dict(), "config": {}, "eval": None, "env": None, "metrics": [], "samples": [],
                "jobs": [job_view(studio, job) for job in jobs]}  # fmt: skip
    info = describe(studio.runs, folder, studio.jobs.live_pids())
    samples = folder / "samples.jsonl"
    return {
        "info": info.as_dict(),
        "config": read_yaml(folder / "config.yaml"),
        "eval": read_json(folder / "eval.json"),
        "env": read_json(folder / "env.json"),
        "metrics": read_metrics(folder / "metrics.jsonl"),
        "samples": read_metrics(samples)[:20] if samples.is_file() else [],
        "jobs": [job_view(studio, job) for job in studio.jobs.of(name)],
    }


@router.get("/api/events")
async def run_events(request: Request, studio: Studio, name: str) -> Any:
    """metrics.jsonl as server-sent events, line by line as training writes them (`metric` events),
    and the run's row whenever it changes (`status`); the stream ends once the run has stopped."""
    try:
        inside(studio.runs, name)
    except Refused as e:
        return refused(e)
    return StreamingResponse(events(request, studio, name), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store"})  # fmt: skip


async def events(request: Request, studio: Any, name: str) -> AsyncIterator[str]:
    sent, last = 0, ""
    while not await request.is_disconnected():
        try:
            folder = run_folder(studio, name)
        except Refused:
            jobs = studio.jobs.of(name)
            if jobs and not any(j.alive for j in jobs):  # it ended before writing its folder
                yield f"event: status\ndata: {json.dumps(RunInfo(name=name, status='failed').as_dict())}\n\n"
                yield "event: done\ndata: {}\n\n"
                return
            yield f"event: status\ndata: {json.dumps({'status': 'starting', 'name': name})}\n\n"
            await asyncio.sleep(POLL_S)
            continue
        info = describe(studio.runs, folder, studio.jobs.live_pids()).as_dict()
        status = json.dumps(info)
        if status != last:  # first: it names the metric the lines below are plotted by
            yield f"event: status\ndata: {status}\n\n"
            last = status
        lines = read_metrics(folder / "metrics.jsonl")
        if len(lines) < sent:  # a resumed run rewrote the log from its checkpoint
            sent = 0
            yield "event: reset\ndata: {}\n\n"
        for line in lines[sent:]:
            yield f"data: {json.dumps(line)}\n\n"
        sent = len(lines)
        if info["status"] != "running" and not any(j.alive for j in studio.jobs.of(name)):
            yield "event: done\ndata: {}\n\n"
            return
        await asyncio.sleep(POLL_S)


@router.post("/api/stop")
async def stop(studio: Studio, name: Annotated[str, Body(embed=True)]) -> Any:
    """SIGTERM to the run's training process: it saves a checkpoint and exits (resumable)."""
    try:
        inside(studio.runs, name)
        pid = studio.jobs.stop(name)
    except Refused as e:
        return refused(e)
    except LookupError as e:
        return JSONResponse({"error": str(e)}, 409)
    return {"stopped": pid}


@router.post("/api/resume")
async def resume(studio: Studio, name: Annotated[str, Body(embed=True)]) -> Any:
    """`tunelab train --resume RUN` for an interrupted run."""
    try:
        path = inside(studio.runs, name)
    except Refused as e:
        return refused(e)
    if not (partial_of(path) / "checkpoints").is_dir():
        return JSONResponse({"error": f"{name} has no checkpoint to resume from"}, 409)
    if studio.jobs.training_pid(name) is not None:
        return JSONResponse({"error": f"{name} is training"}, 409)
    try:
        job = studio.jobs.start("resume", name, ["train", "--resume", str(path)])
    except RuntimeError as e:
        return JSONResponse({"error": str(e)}, 409)
    return {"pid": job.process.pid}


EXPORT_FLAGS = {"merge": ["--merge"], "adapter": ["--adapter-only"], "onnx": ["--onnx"], "gguf": ["--gguf"]}


@router.post("/api/export")
async def export(studio: Studio, name: Annotated[str, Body()], kind: Annotated[str, Body()] = "merge") -> Any:
    """`tunelab export RUN --merge|--adapter-only|--onnx|--gguf --out <runs>/exports/<run>-<kind>`."""
    try:
        path = inside(studio.runs, name)
    except Refused as e:
        return refused(e)
    if kind not in EXPORT_FLAGS:
        return JSONResponse({"error": f"kind: choose one of {', '.join(EXPORT_FLAGS)}"}, 400)
    if not (path / "eval.json").is_file():
        return JSONResponse({"error": f"{name} is not a finished run"}, 409)
    out = studio.runs / "exports" / f"{name.replace('/', '--')}-{kind}"
    try:
        job = studio.jobs.start("export", name, ["export", str(path), *EXPORT_FLAGS[kind], "--out", str(out)])
    except RuntimeError as e:
        return JSONResponse({"error": str(e)}, 409)
    return {"pid": job.process.pid, "out": str(out.relative_to(studio.runs))}


# ------------------------------------------------------------------------------------- new run


@router.get("/api/form")
async def form_fields() -> dict[str, Any]:
    return {"fields": [f.as_dict() for f in form.fields()]}


@router.get("/api/files")
async def data_files(studio: Studio, folder: str = "") -> Any:
    """The folders and files of a folder inside the data folder (the form's file picker)."""
    try:
        path = inside(studio.data, folder)
    except Refused as e:
        return refused(e)
    if not path.is_dir():
        return JSONResponse({"error": f"{folder}: no such folder in the data folder"}, 404)
    base = studio.data.resolve()
    entries = [p for p in sorted(path.iterdir()) if not p.name.startswith(".")][:500]
    return {
        "folder": "" if path == base else str(path.relative_to(base)),
        "folders": [str(p.relative_to(base)) for p in entries if p.is_dir()],
        "files": [str(p.relative_to(base)) for p in entries if p.is_file()],
    }


def checked(studio: Any, values: dict[str, str]) -> tuple[Any, list[str], dict[str, str]]:
    return form.check({k: str(v) for k, v in values.items()}, studio.data)


@router.post("/api/check")
async def check(studio: Studio, values: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    """The form checked by `load_config`, as `tunelab train` would: errors by key, or the overrides."""
    _, given, errors = await asyncio.to_thread(checked, studio, values)
    return {"errors": errors, "overrides": given}


@router.post("/api/datacheck")
async def datacheck(studio: Studio, values: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    """`tunelab data check` on the form's config (the tokenizer only, never the weights)."""
    config, given, errors = await asyncio.to_thread(checked, studio, values)
    if errors:
        return {"errors": errors}
    try:
        report = await asyncio.to_thread(check_config, config)
    except TunelabError as e:
        return {"errors": {"": str(e)}}
    return {"errors": {}, "report": report.as_dict(), "text": "\n".join(report.lines())}


@router.post("/api/estimate")
async def estimate(studio: Studio, values: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    """`tunelab estimate --json` on the form's config, for its method (a probe process per method)."""
    config, given, errors = await asyncio.to_thread(checked, studio, values)
    if errors:
        return {"errors": errors}
    argv = [sys.executable, "-m", "tunelab", "estimate", *given, "--methods", config.method, "--json"]
    done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True,
                                   timeout=ESTIMATE_TIMEOUT_S, cwd=studio.jobs.cwd)  # fmt: skip
    if done.returncode != 0:
        return {"errors": {"": (done.stderr.strip().splitlines() or ["estimate failed"])[-1]}}
    return {"errors": {}, "estimate": json.loads(done.stdout)}


@router.post("/api/start")
async def start(studio: Studio, values: Annotated[dict[str, Any], Body()]) -> Any:
    """Check the form, then start `tunelab train KEY=VALUE ...` with the run in the runs folder,
    named as the command names it (`<model>-<method>-<time>`) unless `name` is given."""
    name = str(values.pop("name", "") or "").strip()
    config, given, errors = await asyncio.to_thread(checked, studio, values)
    if errors:
        return JSONResponse({"errors": errors}, 400)
    name = name or Path(default_output_dir(config)).name
    try:
        out = inside(studio.runs, name)
    except Refused as e:
        return JSONResponse({"errors": {"name": e.message}}, 400)
    if out.exists() or partial_of(out).exists():
        return JSONResponse(
            {"errors": {"name": f"name: {name} exists in the runs folder; choose another"}}, 400
        )
    args = ["train", *given, f"output_dir={out}", "train.progress_bar=false"]
    job = studio.jobs.start("train", str(out.relative_to(studio.runs)), args)
    return {"name": job.run, "pid": job.process.pid, "config": to_dict(config)}


# ----------------------------------------------------------------------------------------- files


@router.get("/files/{root}/{path:path}")
async def file(studio: Studio, root: str, path: str, download: Annotated[bool, Query()] = False) -> Any:
    """A file under the runs folder (`/files/runs/...`) or the data folder (`/files/data/...`)."""
    base = {"runs": studio.runs, "data": studio.data}.get(root)
    if base is None:
        return JSONResponse({"error": "only /files/runs/... and /files/data/... are served"}, 404)
    try:
        target = inside(base, path)
    except Refused as e:
        return refused(e)
    if not target.is_file():
        return JSONResponse({"error": f"{path}: no such file"}, 404)
    # sandboxed: a page among the user's files (a compare report) shows in place, but no script in it
    # runs as the studio (with its cookies and API)
    headers = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"}
    return FileResponse(target, filename=target.name if download else None, headers=headers)


# --------------------------------------------------------------------- compare, eval, serve jobs


def job_view(studio: Any, job: Job) -> dict[str, Any]:
    """A started process as a page shows it; an eval that ended well with its metrics, a compare
    with its report once written."""
    view = job.as_dict()
    if job.kind == "eval" and not job.alive and job.process.returncode == 0:
        view["metrics"] = read_json(studio.runs / str(job.extra["output"]))
    if job.kind == "compare" and (studio.runs / job.run / "report.html").is_file():
        view["report"] = f"{job.run}/report.html"
    return view


@router.get("/api/job")
async def job_detail(studio: Studio, run: str, kind: str) -> Any:
    """A process this studio started (`/job?run=&kind=` polls it): its state, the end of its output."""
    try:
        inside(studio.runs, run)
    except Refused as e:
        return refused(e)
    job = studio.jobs.get(run, kind)
    if job is None:
        return JSONResponse({"error": f"no {kind} process for {run} was started from this studio"}, 404)
    return job_view(studio, job)


def compare_methods() -> list[str]:
    """What `--methods` takes: none (no training) and the methods the form offers."""
    method = next(f for f in form.fields() if f.key == "method")
    return ["none", *method.choices]


@router.post("/api/compare")
async def compare_start(
    studio: Studio,
    methods: Annotated[list[str], Body()],
    config: Annotated[str, Body()] = "",
    values: Annotated[dict[str, Any] | None, Body()] = None,
    name: Annotated[str, Body()] = "",
) -> Any:
    """`tunelab compare CONFIG|KEY=VALUE... --methods ... --out <runs>/<name>`: the config a YAML file
    picked inside the data folder, or the new-run form's values (checked as Start checks them)."""
    allowed = compare_methods()
    wrong = [m for m in methods if m not in allowed]
    if not methods or wrong:
        return JSONResponse(
            {"errors": {"methods": f"methods: tick one or more of {', '.join(allowed)}"}}, 400
        )
    if config:
        try:
            path = inside(studio.data, config)
        except Refused as e:
            return refused(e)
        if not path.is_file() or path.suffix not in (".yaml", ".yml"):
            return JSONResponse({"errors": {"config": f"{config}: not a .yaml file in the data folder"}}, 400)
        given, default = [str(path)], f"compare-{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    else:
        checked_config, given, errors = await asyncio.to_thread(checked, studio, dict(values or {}))
        if errors:
            return JSONResponse({"errors": errors}, 400)
        default = "compare-" + Path(default_output_dir(checked_config)).name  # <model>-<method>-<time>
    name = name.strip() or default
    try:
        out = inside(studio.runs, name)
    except Refused as e:
        return JSONResponse({"errors": {"name": e.message}}, 400)
    if out.exists():
        return JSONResponse(
            {"errors": {"name": f"name: {name} exists in the runs folder; choose another"}}, 400
        )
    run = str(out.relative_to(studio.runs))
    args = ["compare", *given, "train.progress_bar=false", "--methods", ",".join(methods), "--out", str(out)]
    try:
        job = studio.jobs.start("compare", run, args)
    except RuntimeError as e:
        return JSONResponse({"error": str(e)}, 409)
    return {"name": run, "pid": job.process.pid}


def finished_run(studio: Any, name: str) -> Path:
    """A finished run's folder.

    Raises:
        Refused: a name outside the runs folder (403), or no finished run of that name (409).
    """
    path = inside(studio.runs, name)
    if not (path / "eval.json").is_file():
        raise Refused(409, f"{name} is not a finished run")
    return path


@router.post("/api/eval")
async def evaluate(studio: Studio, name: Annotated[str, Body()], file: Annotated[str, Body()]) -> Any:
    """`tunelab eval RUN --data FILE`, the file a labelled one inside the data folder; the metrics
    land in RUN/eval-<file>.json, as the command writes them."""
    try:
        path = finished_run(studio, name)
        data = inside(studio.data, file)
    except Refused as e:
        return refused(e)
    if not data.is_file():
        return JSONResponse({"error": f"{file}: no such file in the data folder"}, 404)
    output = (path / f"eval-{data.stem}.json").relative_to(studio.runs)
    try:
        job = studio.jobs.start("eval", name, ["eval", str(path), "--data", str(data)],
                                {"file": file, "output": str(output)})  # fmt: skip
    except RuntimeError as e:
        return JSONResponse({"error": str(e)}, 409)
    return {"pid": job.process.pid, "output": str(output)}


@router.post("/api/serve")
async def serve(studio: Studio, name: Annotated[str, Body(embed=True)]) -> Any:
    """`tunelab serve RUN --host 127.0.0.1 --port P` on a free loopback port; stopped with the studio."""
    try:
        path = finished_run(studio, name)
    except Refused as e:
        return refused(e)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    try:
        job = studio.jobs.start("serve", name, ["serve", str(path), "--host", "127.0.0.1", "--port", str(port)],
                                {"port": port, "url": url})  # fmt: skip
    except RuntimeError as e:
        return JSONResponse({"error": str(e)}, 409)
    return {"pid": job.process.pid, "port": port, "url": url}


@router.post("/api/serve/stop")
async def serve_stop(studio: Studio, name: Annotated[str, Body(embed=True)]) -> Any:
    """Stop the `tunelab serve` this studio started for the run (SIGTERM; uvicorn shuts down)."""
    try:
        inside(studio.runs, name)
        pid = await asyncio.to_thread(studio.jobs.end, name, "serve")
    except Refused as e:
        return refused(e)
    except LookupError as e:
        return JSONResponse({"error": str(e)}, 409)
    return {"stopped": pid}


# --------------------------------------------------------------------------------------- reviews


@router.get("/api/reviews")
async def reviews(studio: Studio) -> dict[str, Any]:
    """The `tunelab review` folders under the reviews folder, each with its report."""
    names = await asyncio.to_thread(review_names, studio.reviews)
    found = [await asyncio.to_thread(summary, studio.reviews, n) for n in names]
    return {"folder": studio.reviews.name, "reviews": found}
