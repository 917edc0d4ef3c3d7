"""The processes `tunelab studio` starts: ordinary `tunelab` commands (`train`, `train --resume`,
`export`, `compare`, `eval`, `serve`), each its own process (`sys.executable -m tunelab ...`),
exactly what a user would type.

A training process is its own process group leader, so stopping it sends SIGTERM to it alone,
as Ctrl-C in its terminal would: the loop saves a checkpoint and exits (tunelab.loop), and the
run can be resumed. Each process's output goes to a log under `<runs>/.studio/logs/`, which the
run page shows; nothing else is written beside the runs. The `tunelab serve` processes it started
are stopped when the studio exits (a server nobody can see is left running otherwise); the others
(training, compare, eval, export) finish their work.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tunelab.studio.runs import partial_of, pid_alive, read_json

LOG_FOLDER = Path(".studio") / "logs"
LOG_TAIL_CHARS = 6000


@dataclass
class Job:
    """A `tunelab` process the studio started."""

    kind: str  # train, resume, export, compare, eval, serve
    run: str  # the run's name under the runs folder (a compare: its folder's)
    argv: list[str]
    log: Path
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.time)
    extra: dict[str, object] = field(default_factory=dict)  # what the page shows besides: a port, a file

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def as_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "run": self.run, "pid": self.process.pid, "alive": self.alive,
                "returncode": self.process.returncode, "started": self.started, "log": tail(self.log), **self.extra}  # fmt: skip


def tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The end of a log (a progress bar's carriage returns kept to their last state)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - chars))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.splitlines())


class Jobs:
    """The processes started from this studio, by run name (the latest per run and kind)."""

    def __init__(self, runs: Path, cwd: Path | None = None) -> None:
        self.runs, self.cwd = runs, cwd or Path.cwd()
        self.jobs: dict[tuple[str, str], Job] = {}
        self.command = [sys.executable, "-m", "tunelab"]  # what `tunelab` is, in this Python

    def start(self, kind: str, run: str, args: list[str], extra: dict[str, object] | None = None) -> Job:
        """Start `tunelab ARGS` for `run`, its output to a log; refused while one of its kind runs."""
        held = self.jobs.get((run, kind))
        if held is not None and held.alive:
            raise RuntimeError(f"{run}: a {kind} process is already running (pid {held.process.pid})")
        logs = self.runs / LOG_FOLDER
        logs.mkdir(parents=True, exist_ok=True)
        log = logs / f"{run.replace('/', '--')}.{kind}.log"
        argv = [*self.command, *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       cwd=self.cwd, env=env, start_new_session=True)  # fmt: skip
        job = Job(kind, run, argv, log, process, extra=dict(extra or {}))
        self.jobs[(run, kind)] = job
        return job

    def live_pids(self) -> dict[str, int]:
        """Run name -> pid of the training processes started here that still run."""
        return {run: job.process.pid for (run, kind), job in self.jobs.items()
                if kind in ("train", "resume") and job.alive}  # fmt: skip

    def of(self, run: str) -> list[Job]:
        return [job for (name, _), job in self.jobs.items() if name == run]

    def training_pid(self, run: str) -> int | None:
        """The pid of `run`'s live training process: started here, or named in its env.json."""
        pid = self.live_pids().get(run)
        if pid is not None:
            return pid
        partial = partial_of(self.runs / run)
        env = read_json(partial / "env.json") or {}
        try:
            since = (partial / "env.json").stat().st_mtime
        except OSError:
            return None
        pid = env.get("pid")
        return pid if isinstance(pid, int) and pid_alive(pid, since) else None

    def stop(self, run: str) -> int:
        """SIGTERM to `run`'s training process (it checkpoints, then exits); returns its pid.

        Raises:
            LookupError: no live training process for `run`.
        """
        pid = self.training_pid(run)
        if pid is None:
            raise LookupError(f"{run} is not training")
        os.kill(pid, signal.SIGTERM)
        return pid

    def get(self, run: str, kind: str) -> Job | None:
        return self.jobs.get((run, kind))

    def end(self, run: str, kind: str, wait_s: float = 5.0) -> int:
        """SIGTERM to the live `kind` process of `run` (a server: uvicorn shuts down on it), SIGKILL
        after `wait_s`; returns its pid.

        Raises:
            LookupError: no such live process started here.
        """
        job = self.jobs.get((run, kind))
        if job is None or not job.alive:
            raise LookupError(f"{run}: no {kind} process of this studio is running")
        job.process.terminate()
        try:
            job.process.wait(wait_s)
        except subprocess.TimeoutExpired:
            job.process.kill()
            job.process.wait()
        return job.process.pid

    def close(self) -> None:
        """Stop the servers started here; reap the processes that have ended (those still training
        keep going without the studio)."""
        for (run, kind), job in list(self.jobs.items()):
            if kind == "serve" and job.alive:
                self.end(run, kind)
            job.process.poll()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it), for a `tunelab serve` the studio starts."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
