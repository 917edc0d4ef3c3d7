"""The runs index of `tunelab studio`: what every run folder under the runs folder says about itself.

A run trains in a hidden sibling `.NAME.partial` (tunelab.run.partial_dir) and is renamed to
`NAME` when it is complete, so a folder's status is read from the files alone:

- running: a `.NAME.partial` whose training process (env.json `pid`, or one the studio started) lives;
- finished: `NAME/eval.json`;
- interrupted: a `.NAME.partial` with a checkpoint and no live process (`tunelab train --resume`);
- failed: a `.NAME.partial` without a checkpoint and no live process.

Nothing here imports torch: the index is read on every poll of the runs table.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tunelab.metrics import higher_is_better, task_metrics

# starting: a process the studio started that has not written its run folder yet
Status = Literal["starting", "running", "finished", "interrupted", "failed"]
PARTIAL_SUFFIX = ".partial"


@dataclass
class RunInfo:
    """One row of the runs table."""

    name: str  # path relative to the runs folder, as the final folder is (or will be) named
    status: Status
    task: str = ""
    method: str = ""
    model: str = ""
    metric: str = ""  # the main metric's name
    value: float | None = None  # its value (test, else validation); while training, the latest validation
    higher_is_better: bool = True
    started: float = 0.0  # unix time the folder was started (config.yaml written)
    seconds: float | None = None  # training time (finished), or time so far
    samples_per_s: float | None = None
    step: int = 0
    progress: float | None = None  # 0..1 while training, from epochs or max_steps
    eta_s: float | None = None
    pid: int | None = None
    folder: str = ""  # where its files are now: NAME or .NAME.partial (relative to the runs folder)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def final_name(folder: Path) -> str:
    """`.NAME.partial` -> `NAME`; other names unchanged."""
    name = folder.name
    if name.startswith(".") and name.endswith(PARTIAL_SUFFIX):
        return name[1 : -len(PARTIAL_SUFFIX)]
    return name


def partial_of(path: Path) -> Path:
    """The hidden folder a run at `path` trains in (as tunelab.run.partial_dir names it)."""
    return path.parent / f".{path.name}{PARTIAL_SUFFIX}"


def pid_alive(pid: int | None, since: float | None = None) -> bool:
    """Whether `pid` is a live process; with `since` (when the run wrote its env.json), also that the
    process started before then, so that a pid reused by another process does not count (where
    /proc tells start times)."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        pass
    started = process_start(pid)
    if started is None:
        return True
    return since is None or started <= since + 2  # 2 s: start times are rounded to clock ticks


def process_start(pid: int) -> float | None:
    """When `pid` started (unix time), from /proc; None where /proc does not say. A zombie (ended,
    not yet collected) counts as started never: +inf."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))  # fmt: skip
    except (OSError, StopIteration, ValueError):
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (name) "; the name may hold spaces
    if fields[0] == "Z":
        return float("inf")
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The lines of metrics.jsonl (a line being written right now is left for the next read)."""
    try:
        text = path.read_text()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def main_metric(config: dict[str, Any]) -> str:
    """`train.metric_for_best`, or the first metric the task scores."""
    chosen = (config.get("train") or {}).get("metric_for_best", "auto")
    if chosen and chosen != "auto":
        return str(chosen)
    multi = bool((config.get("classification") or {}).get("multi_label"))
    try:
        return task_metrics(config.get("task", "classification"), multi)[0]
    except KeyError:
        return "loss"


def run_folders(root: Path, depth: int = 2) -> list[Path]:
    """Every run folder (config.yaml inside) under `root`, finished or partial; compare folders
    hold their runs one level down, so the walk goes `depth` levels deep."""
    found: list[Path] = []
    if not root.is_dir():
        return found
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.is_symlink():
            continue
        if (child / "config.yaml").is_file() or (
            child.name.endswith(PARTIAL_SUFFIX) and child.name.startswith(".")
        ):
            found.append(child)
        elif depth > 1 and not child.name.startswith("."):
            found += run_folders(child, depth - 1)
    return found


def describe(root: Path, folder: Path, live_pids: dict[str, int] | None = None) -> RunInfo:
    """The runs-table row of one run folder (finished `NAME` or partial `.NAME.partial`)."""
    partial = folder.name.endswith(PARTIAL_SUFFIX) and folder.name.startswith(".")
    name = str(folder.relative_to(root).parent / final_name(folder)).removeprefix("./")
    config = read_yaml(folder / "config.yaml")
    env = read_json(folder / "env.json") or {}
    report = read_json(folder / "eval.json")
    metrics = read_metrics(folder / "metrics.jsonl")
    pid = (live_pids or {}).get(name) or env.get("pid")
    info = RunInfo(name=name, status="finished", folder=str(folder.relative_to(root)), pid=pid)
    info.task = str(config.get("task", ""))
    info.method = str(config.get("method", ""))
    info.model = str(config.get("model", ""))
    info.metric = main_metric(config) if config else ""
    info.higher_is_better = higher_is_better(info.metric) if info.metric else True
    info.started = mtime(folder / "config.yaml") or mtime(folder) or 0.0
    trained = [m for m in metrics if "loss" in m and "split" not in m]
    evaluated = [m for m in metrics if m.get("split") == "validation"]
    if trained:
        info.step = int(trained[-1].get("step", 0))
        info.samples_per_s = trained[-1].get("samples_per_s")
    if evaluated and info.metric in evaluated[-1]:
        info.value = evaluated[-1][info.metric]
    if partial:
        alive = name in (live_pids or {}) or pid_alive(pid, mtime(folder / "env.json"))
        checkpoints = folder / "checkpoints"
        has_checkpoint = checkpoints.is_dir() and any(checkpoints.iterdir())
        info.status = "running" if alive else "interrupted" if has_checkpoint else "failed"
        last = max(mtime(folder / "metrics.jsonl") or 0.0, info.started)
        info.seconds = (time.time() if alive else last) - info.started if info.started else None
        info.progress = progress(config, metrics)
        if alive and info.progress and info.seconds:
            info.eta_s = info.seconds * (1 - info.progress) / info.progress
        return info
    if not isinstance(report, dict):
        info.status = "failed"  # a renamed run always has eval.json: this one was damaged or cut short
        info.errors.append("eval.json is missing or unreadable")
        return info
    info.pid = None  # the process that wrote it has ended
    summary = report.get("train") or {}
    info.seconds = summary.get("runtime_s")
    info.samples_per_s = summary.get("samples_per_s", info.samples_per_s)
    info.step = summary.get("steps", info.step)
    info.progress = 1.0
    for split in ("test", "validation"):
        scores = report.get(split)
        if isinstance(scores, dict) and isinstance(scores.get(info.metric), (int, float)):
            info.value = scores[info.metric]
            break
    return info


def progress(config: dict[str, Any], metrics: list[dict[str, Any]]) -> float | None:
    """How far training is (0..1): steps of `train.max_steps`, else epochs of `train.epochs`."""
    train = config.get("train") or {}
    if not metrics:
        return 0.0
    last = metrics[-1]
    if train.get("max_steps"):
        return min(1.0, float(last.get("step", 0)) / float(train["max_steps"]))
    epochs = float(train.get("epochs") or 0)
    if epochs and "epoch" in last:
        return min(1.0, float(last["epoch"]) / epochs)
    return None


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def index(root: Path, live_pids: dict[str, int] | None = None) -> list[RunInfo]:
    """Every run under `root`, newest first; a partial folder beside its finished one (a resumed
    or restarted run) is shown once, as the partial one while it trains."""
    rows: dict[str, RunInfo] = {}
    for folder in run_folders(root):
        info = describe(root, folder, live_pids)
        held = rows.get(info.name)
        if (
            held is None
            or info.status == "running"
            or (held.status != "running" and info.started > held.started)
        ):
            rows[info.name] = info
    return sorted(rows.values(), key=lambda r: r.started, reverse=True)


def reports(root: Path) -> list[str]:
    """The compare reports under `root` (folders holding report.html), relative paths."""
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.glob("*/report.html")) + sorted(root.glob("*/*/report.html")):
        if not any(part.startswith(".") for part in path.relative_to(root).parts):
            found.append(str(path.relative_to(root)))
    return found
