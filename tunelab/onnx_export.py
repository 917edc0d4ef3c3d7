"""`tunelab export RUN --onnx [--int8] --out DIR`: an encoder run (classification, token
classification, regression) as an ONNX graph for ONNX Runtime, with a dynamically quantised
int8 copy on request, checked on the run's held-out split before it is reported.

- The method is merged into plain weights first (methods that cannot merge are refused), then
  `torch.onnx.export` (the torch.export-based exporter) writes `model.onnx` with the batch and
  sequence axes left dynamic.
- `--int8`: `onnxruntime.quantization.quantize_dynamic` writes `model_quantized.onnx`: int8
  weights, activations quantised per batch at run time (no calibration data needed).
- The check runs the PyTorch model and every ONNX file over the held-out split (test, else
  validation, the rows eval.json scored) in one process: the task's metrics, the share of
  predicted labels that agree with PyTorch's, the largest logit difference (the float32 graph
  must match within `TOLERANCE`), batch-1 and batch-32 latency with the same threads, and the
  file sizes. All of it goes into `export.json`, and the model card (README.md) quotes it.

Optimum's exporter is not used: optimum-onnx 0.1 pins transformers<4.58 and tunelab needs 5.x; the
plain exporter and ONNX Runtime's own quantiser do the whole job. The folder is written under a
hidden name and renamed into place only when the check passes.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import logging
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.config import load_config, save_config
from tunelab.data import sample
from tunelab.errors import ConfigError, TunelabError
from tunelab.methods import METHODS
from tunelab.model_card import scalar_metrics, write_model_card
from tunelab.onnx_model import INSTALL_HINT, INT8_FILE, ONNX_FILE, RUN_CONFIG, load_onnx
from tunelab.outputs import check_writable
from tunelab.run import Run

ONNX_TASKS = ("classification", "token-classification", "regression")
TOLERANCE = 1e-3  # max |logit difference| between model.onnx and the PyTorch model on the held-out rows
BATCH_1_ROWS = 32  # rows timed one at a time
BATCH_32_BATCHES = 4  # batches of 32 rows timed
REPEATS = 3  # timing rounds; each model's figure is the median call


def export_onnx(run_dir: str | Path, out: str | Path, int8: bool = False, say: Any = print) -> dict[str, Any]:
    """Write and check an ONNX export of a finished encoder run; returns the report (export.json).

    Raises:
        TunelabError: the destination exists, the run is not an encoder task, its method cannot
            be merged, its held-out data is gone, or model.onnx does not reproduce the run.
        ConfigError: onnx / onnxruntime are not installed.
    """
    out, run_dir = Path(out), Path(run_dir)
    if out.exists():
        raise TunelabError(f"{out} already exists; choose another --out or remove it")
    check_writable(out, f"--out {out}")  # before loading: a file in the way, read-only, /proc
    check_request(run_dir)
    run = Run.load(run_dir)
    run.model.to("cpu").float()
    split, source, examples = held_out(run)
    merge = METHODS[run.config.method].merge
    assert merge is not None, "check_request refuses methods that cannot merge"
    merged = merge(copy.deepcopy(run.model)).eval()
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        # two rows at least: torch.export fixes an axis whose example size is 1
        write_onnx(
            merged, run.task.probe_batch((examples * 2)[:8], run.tokenizer.pad_token_id), tmp / ONNX_FILE
        )
        if int8:
            quantize(tmp / ONNX_FILE, tmp / INT8_FILE)
        run.tokenizer.save_pretrained(tmp)
        hf_config: Any = merged.config  # a transformers PretrainedConfig
        hf_config.save_pretrained(tmp)  # config.json: labels, for Optimum's ORTModel and for people
        save_config(run.config, tmp / RUN_CONFIG)
        report = check(run, merged, tmp, int8, split, source, examples)
        (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
        write_model_card(run, tmp, "onnx", report)
        if report["max_abs_diff"] > TOLERANCE:
            raise TunelabError(f"export check failed: model.onnx's logits differ from the run's by "
                               f"{report['max_abs_diff']:.3g} (tolerance {TOLERANCE:g}); nothing was written to {out}")  # fmt: skip
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(summary(report, out))
    return report


def check_request(run_dir: Path) -> None:
    """Refuse what cannot be exported, before anything is loaded: a missing or generative run,
    a method that cannot merge, missing packages."""
    if not (run_dir / "config.yaml").is_file():
        Run.load(run_dir)  # raises its own message for a folder that is not a finished run
    config = load_config(run_dir / "config.yaml")
    if config.task not in ONNX_TASKS:
        raise TunelabError(f"--onnx exports encoder runs ({', '.join(ONNX_TASKS)}); {run_dir} is a {config.task} "
                           f"run: export it with --merge (or --gguf for llama.cpp)")  # fmt: skip
    if METHODS[config.method].merge is None:
        mergeable = "/".join(name for name, m in METHODS.items() if m.merge is not None)
        raise TunelabError(f"--onnx needs plain weights, and method {config.method} cannot be merged into "
                           f"them; train with {mergeable}")  # fmt: skip
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"{INSTALL_HINT} (missing: {', '.join(missing)})")


def held_out(run: Any) -> tuple[str, str, list[dict[str, Any]]]:
    """(split, file, encoded rows) of the run's held-out split: the test file, else the
    validation file, else the validation share of the training file, sampled as training
    sampled it (`data.max_eval_samples`), so the PyTorch figures equal eval.json's.

    Raises:
        TunelabError: the file is no longer where the run read it.
    """
    d, task = run.config.data, run.task
    for split, path in (("test", d.test), ("validation", d.validation), ("validation", d.train)):
        if not path:
            continue
        if not Path(path).is_file():
            what = "training" if path == d.train else split
            raise TunelabError(f"{path}: the run's {what} data is not there any more; the ONNX check "
                               f"scores the export on the held-out rows: put the file back")  # fmt: skip
        if path == d.train:  # no held-out file: the seeded share of train that training held out
            return split, f"{path} (held-out share)", list(task.load_splits(run.tokenizer).validation)
        return split, str(path), task.encode(sample(task.read(str(path)), d.max_eval_samples, run.config.seed),
                                             run.tokenizer)  # fmt: skip
    raise TunelabError("the run's config names no data file to check the export on")


def write_onnx(model: torch.nn.Module, batch: dict[str, torch.Tensor], path: Path) -> None:
    """`torch.onnx.export` of a plain transformers model: inputs as in `batch`, output
    `logits`, batch and sequence axes dynamic, weights inside the file."""
    from torch.export import Dim

    batch_axis = Dim("batch", min=1, max=1024)
    sequence = Dim("sequence", min=1, max=int(getattr(model.config, "max_position_embeddings", 512)))
    dynamic = {name: {0: batch_axis, 1: sequence} for name in batch}
    exporter_log = io.StringIO()
    try:  # the exporter prints its progress and warns about what this model does not use (torchvision ops)
        with contextlib.redirect_stdout(exporter_log), quiet("torch.onnx", "torch.export"), torch.no_grad():
            torch.onnx.export(model, (), str(path), kwargs=dict(batch), input_names=list(batch),
                              output_names=["logits"], dynamic_shapes=dynamic, dynamo=True,
                              external_data=False, optimize=True)  # fmt: skip
    except Exception as e:
        raise TunelabError(f"torch.onnx.export could not export {type(model).__name__}: {e}\n"
                           f"{exporter_log.getvalue()[-2000:]}") from e  # fmt: skip


def quantize(source: Path, target: Path) -> None:
    """int8 weights with activations quantised per batch at run time (ONNX Runtime's
    dynamic quantisation: no calibration rows needed)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # its advice (on the root logger) to pre-process first: quant_pre_process's shape inference
    # fails on this graph, and without it minilm-l6's int8 batch-1 latency was the same (2.9 vs 3.1 ms)
    with quiet(""):
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)


@contextlib.contextmanager
def quiet(*loggers: str) -> Iterator[None]:
    """Only errors from these loggers, and no Python warnings, inside the block."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for logger, _ in saved:
                logger.setLevel(logging.ERROR)
            yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


def check(run: Any, merged: torch.nn.Module, folder: Path, int8: bool, split: str, source: str,
          examples: list[dict[str, Any]]) -> dict[str, Any]:  # fmt: skip
    """The export report: every model's metrics on the held-out rows, agreement with PyTorch,
    logit differences, latency and size."""
    task, pad = run.task, run.tokenizer.pad_token_id
    onnx_runs = {"onnx": load_onnx(folder, ONNX_FILE)}
    if int8:
        onnx_runs["int8"] = load_onnx(folder, INT8_FILE)
    reference = task.outputs(
        merged, examples, pad, run.config.train.eval_batch_size, torch.device("cpu"), None
    )
    reference_labels = predicted_labels(task, reference, examples)
    metric = task.default_metric
    models: dict[str, dict[str, Any]] = {"pytorch": scores(task, reference, examples, metric)}
    models["pytorch"].update(file="model/ (the run)", size_mb=round(parameter_bytes(merged) / 2**20, 2))
    for name, onnx_run in onnx_runs.items():
        outputs = onnx_run.logits(examples)
        labels = predicted_labels(task, outputs, examples)
        models[name] = {**scores(task, outputs, examples, metric), "file": onnx_run.file,
                        "size_mb": round((folder / onnx_run.file).stat().st_size / 2**20, 2),
                        "max_abs_diff": max(float(np.abs(a - b).max()) for a, b in zip(outputs, reference)),
                        "label_agreement": None if labels is None else
                        float(np.mean([a == b for a, b in zip(labels, reference_labels or [])]))}  # fmt: skip
    calls: dict[str, Callable[..., Any]] = {"pytorch": merged, **{n: r.model for n, r in onnx_runs.items()}}
    for name, figures in latency(calls, task, examples, pad).items():
        models[name]["latency_ms"] = figures
        if name != "pytorch":
            models[name]["speedup"] = {
                k: round(models["pytorch"]["latency_ms"][k] / v, 2) for k, v in figures.items()
            }
    evaluation = (
        json.loads((Path(run.path) / "eval.json").read_text())
        if (Path(run.path) / "eval.json").is_file()
        else {}
    )
    return {"kind": "onnx", "task": run.config.task, "method": run.config.method,
            "loads_with": "onnxruntime.InferenceSession",
            "files": {"fp32": ONNX_FILE, **({"int8": INT8_FILE} if int8 else {})},
            "held_out": {"split": split, "file": source, "examples": len(examples)},
            "metric": metric, "run_metric_value": evaluation.get(split, {}).get(metric),
            "max_abs_diff": models["onnx"]["max_abs_diff"], "examples": len(examples),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "onnxruntime": _version("onnxruntime"), "models": models}  # fmt: skip


def scores(task: Any, outputs: list[Any], examples: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    metrics = scalar_metrics(task.metrics(outputs, examples))
    return {"metric_value": metrics.get(metric), "metrics": metrics}


def predicted_labels(task: Any, outputs: list[Any], examples: list[dict[str, Any]]) -> list[Any] | None:
    """What a person reads from each output, flattened for counting agreement: the label per
    row, the label set per row (multi-label), the tag per word; None for regression (a value)."""
    if task.name == "regression":
        return None
    if task.name == "token-classification":
        return [int(t) for o, e in zip(outputs, examples) for t in np.asarray(o)[e["word_starts"]].argmax(-1)]
    logits = np.stack(outputs)
    if getattr(task, "multi_label", False):
        return [tuple(row) for row in (1 / (1 + np.exp(-logits)) >= task.threshold)]
    return [int(i) for i in logits.argmax(-1)]


def latency(calls: dict[str, Callable[..., Any]], task: Any, examples: list[dict[str, Any]],
            pad: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """Median milliseconds per call for each model, on the same batches, in alternating rounds:
    single rows (`batch_1`) and batches of 32 rows (`batch_32`, padded to their longest row)."""
    shapes = {"batch_1": [task.probe_batch([e], pad) for e in examples[:BATCH_1_ROWS]],
              "batch_32": [task.probe_batch(examples[i : i + 32], pad)
                           for i in range(0, min(len(examples), 32 * BATCH_32_BATCHES), 32)]}  # fmt: skip
    times: dict[str, dict[str, list[float]]] = {name: {shape: [] for shape in shapes} for name in calls}
    with torch.inference_mode():
        for call in calls.values():  # warm-up: first calls allocate and pick kernels
            call(**shapes["batch_32"][0])
            call(**shapes["batch_1"][0])
        for _ in range(REPEATS):
            for name, call in calls.items():
                for shape, batches in shapes.items():
                    for batch in batches:
                        start = time.perf_counter()
                        call(**batch)
                        times[name][shape].append(time.perf_counter() - start)
    return {name: {shape: round(1000 * statistics.median(t), 3) for shape, t in by.items()}
            for name, by in times.items()}  # fmt: skip


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def summary(report: dict[str, Any], out: Path) -> str:
    """The one line `tunelab export --onnx` prints."""
    models, metric = report["models"], report["metric"]
    parts = [f"pytorch {metric} {models['pytorch']['metric_value']:.4f}"]
    for name in ("onnx", "int8"):
        if name in models:
            m = models[name]
            agree = "" if m["label_agreement"] is None else f", {m['label_agreement']:.1%} labels agree"
            parts.append(f"{name} {m['metric_value']:.4f}{agree}, batch-1 {m['speedup']['batch_1']:.2f}x")
    return (f"tunelab: ONNX export checked on {report['examples']} {report['held_out']['split']} rows: "
            f"{'; '.join(parts)}; model.onnx logits within {report['max_abs_diff']:.1e}; written to {out}")  # fmt: skip


def _version(package: str) -> str | None:
    try:
        return str(importlib.import_module(package).__version__)
    except (ImportError, AttributeError):
        return None
