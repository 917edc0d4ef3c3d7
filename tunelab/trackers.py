"""Experiment trackers (`train.report_to`): the scalars of metrics.jsonl, the resolved config
and the final eval.json, sent as the run goes to TensorBoard, MLflow or Trackio.

```
tensorboard   event files in <run>/tensorboard (torch.utils.tensorboard; `tensorboard --logdir runs`)
mlflow        experiment "tunelab", one MLflow run per tunelab run, in train.mlflow_uri or a file
              store beside the runs (<output_dir>/../mlruns; `mlflow ui --backend-store-uri ...`)
trackio       project "tunelab" in Trackio's local store (TRACKIO_DIR; `trackio show`)
```

Each adapter is a few calls of its library's own client, imported only when chosen (the
config checks at load that it is installed). Only rank 0 reports: `run.py` opens these on
the main process only. Scalars are named `<split>/<metric>`: `train/loss`, `train/lr`,
`validation/accuracy`; the final report adds `eval/<split>/<metric>`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from tunelab.config import Config, to_dict

STATE = "trackers.json"  # in the run folder: the MLflow run id, so a resumed run reports to the same run


def scalars(entry: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numbers of a metrics.jsonl line as `<split>/<metric>` (the step and split are not values)."""
    split = entry.get("split", "train")
    return {
        f"{prefix}{split}/{k}": float(v)
        for k, v in entry.items()
        if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def report_scalars(report: dict[str, Any]) -> dict[str, float]:
    """The numbers of eval.json's splits as `eval/<split>/<metric>` (nested tables left out)."""
    out: dict[str, float] = {}
    for split, metrics in report.items():
        if isinstance(metrics, dict):
            out.update(scalars({**metrics, "split": split}, "eval/"))
    return out


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as dotted keys with text values (MLflow params)."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = json.dumps(value) if not isinstance(value, str) else value
    return out


class Tracker(Protocol):
    def log(self, step: int, values: dict[str, float]) -> None: ...

    def pause(self) -> None:
        """Close open files: the run folder is about to be renamed."""
        ...

    def finish(self, folder: Path, step: int, report: dict[str, Any] | None, status: str) -> None:
        """Send the final report (None when the run did not finish) and close."""
        ...


class TensorBoard:
    def __init__(self, config: Config, folder: Path, resume_step: int):
        from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package

        self.writer_class = SummaryWriter
        # purge_step hides the events a resumed run writes again after its checkpoint
        self.writer: Any = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_step or None)
        if not resume_step:
            text = json.dumps(to_dict(config), indent=2)
            self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def pause(self) -> None:
        self.writer.close()

    def finish(self, folder: Path, step: int, report: dict[str, Any] | None, status: str) -> None:
        if report is None:
            return
        writer = self.writer_class(str(folder / "tensorboard"))  # the run's final place
        for tag, value in report_scalars(report).items():
            writer.add_scalar(tag, value, step)
        text = json.dumps(report, indent=2)
        writer.add_text("eval.json", "\n".join("    " + line for line in text.splitlines()), step)
        writer.close()


class MLflow:
    def __init__(self, config: Config, folder: Path, resume_step: int):
        import mlflow  # optional: the mlflow (or mlflow-skinny) package

        # not inside the run folder: MLflow records absolute artifact paths, which the run
        # folder's final rename would break
        uri = config.train.mlflow_uri or (folder.parent / "mlruns").resolve().as_uri()
        if uri.startswith("file:"):  # MLflow 3 keeps its file store only on request
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.metric = mlflow.entities.Metric
        state = folder / STATE
        saved = json.loads(state.read_text()).get("mlflow_run_id") if resume_step and state.exists() else None
        if saved:
            self.run_id = saved
            return
        experiment = self.client.get_experiment_by_name("tunelab")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("tunelab")
        name = Path(config.output_dir or folder.name).name
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = flatten(to_dict(config))
        self.client.log_batch(
            self.run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in params.items()]
        )
        self.client.log_dict(self.run_id, to_dict(config), "config.json")
        state.write_text(json.dumps({"mlflow_run_id": self.run_id, "tracking_uri": uri}) + "\n")

    def log(self, step: int, values: dict[str, float]) -> None:
        stamp = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[self.metric(k, v, stamp, step) for k, v in values.items()]
        )

    def pause(self) -> None:
        pass

    def finish(self, folder: Path, step: int, report: dict[str, Any] | None, status: str) -> None:
        if report is not None:
            self.log(step, report_scalars(report))
            self.client.log_dict(self.run_id, report, "eval.json")
        self.client.set_terminated(self.run_id, status)


class Trackio:
    def __init__(self, config: Config, folder: Path, resume_step: int):
        import trackio  # optional: the trackio package

        self.trackio = trackio
        name = Path(config.output_dir or folder.name).name
        trackio.init(project="tunelab", name=name, config=to_dict(config), resume="allow",
                     embed=False, auto_log_cpu=False, auto_log_gpu=False)  # fmt: skip

    def log(self, step: int, values: dict[str, float]) -> None:
        self.trackio.log(values, step=step)

    def pause(self) -> None:
        pass

    def finish(self, folder: Path, step: int, report: dict[str, Any] | None, status: str) -> None:
        if report is not None:
            self.trackio.log(report_scalars(report), step=step)
        self.trackio.finish()


ADAPTERS: dict[str, Callable[[Config, Path, int], Tracker]] = {
    "tensorboard": TensorBoard,
    "mlflow": MLflow,
    "trackio": Trackio,
}


class Trackers:
    """The trackers a run reports to (none unless `train.report_to` names them); open them on
    rank 0 only. `log` takes metrics.jsonl lines; `finish` the final eval.json."""

    def __init__(self, config: Config, folder: Path, resume_step: int = 0, enabled: bool = True):
        names = config.train.report_to if enabled else []
        self.chosen: list[Tracker] = [ADAPTERS[name](config, folder, resume_step) for name in names]
        self.step = resume_step

    def log(self, entry: dict[str, Any]) -> None:
        self.step = max(self.step, int(entry.get("step", 0)))
        values = scalars(entry)
        for tracker in self.chosen:
            tracker.log(self.step, values)

    def pause(self) -> None:
        for tracker in self.chosen:
            tracker.pause()

    def finish(self, folder: Path, report: dict[str, Any] | None, status: str = "FINISHED") -> None:
        for tracker in self.chosen:
            tracker.finish(folder, self.step, report, status)
        self.chosen = []
