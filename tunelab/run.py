"""A run from start to finish: build everything from the config, train, and write the run
directory; and load a finished run back to evaluate or predict.

```
runs/<name>/
  config.yaml     resolved config (labels filled in): `tunelab train` on it reproduces the run
  metrics.jsonl   one line per log or evaluation step
  env.json        versions, seed, device, threads, data file hashes, git commit
  model/          the best model: full HF folder, or PEFT adapter + head; tokenizer
  eval.json       {"validation": {...}, "test": {...}, "train": {...}}
```

The directory is written under a temporary sibling name and renamed into place only when
complete, so a crash never leaves a half-written run where a finished one is expected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab import __version__
from tunelab.config import Config, load_config, save_config
from tunelab.data import is_missing, read_table, require_columns
from tunelab.errors import TunelabError
from tunelab.loop import fit, peak_rss_mb, pick_device, predict_logits, resolve_precision
from tunelab.methods import METHODS
from tunelab.models import count_params, load_tokenizer, quiet_transformers, resolve_model
from tunelab.tasks import TASKS


def say(message: str) -> None:
    print(f"tunelab: {message}", file=sys.stderr, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def environment(config: Config, device: torch.device, files: dict[str, str]) -> dict[str, Any]:
    import peft
    import transformers

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "tunelab": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seed": config.seed,
        "data_sha256": {split: sha256(path) for split, path in files.items()},
        "git_commit": commit,
        "command": sys.argv,
    }


def default_output_dir(config: Config) -> str:
    name = Path(config.model).name if Path(config.model).exists() else config.model.replace("/", "--")
    return str(Path("runs") / f"{name}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def check_merge(
    config: Config, task: Any, model_dir: Path, examples: list[dict[str, Any]], tokenizer: Any
) -> dict[str, Any]:
    """Reload the saved model, merge it into plain weights and compare logits on up to 32
    examples: proof that the saved artifact merges correctly."""
    from tunelab.methods.common import merge_checked

    method = METHODS[config.method]
    model = method.load(config, task, model_dir)
    batch = task.collate(examples[:32], tokenizer.pad_token_id)
    batch.pop("labels", None)
    _, difference = merge_checked(method, model, batch)
    return {"max_abs_diff": difference, "examples": len(examples[:32])}


class Run:
    """A finished run loaded for use: `predict`, `evaluate`."""

    def __init__(self, path: Path, config: Config, task: Any, model: torch.nn.Module, tokenizer: Any):
        self.path, self.config, self.task, self.model, self.tokenizer = path, config, task, model, tokenizer
        self.device = next(model.parameters()).device
        self.dtype = resolve_precision(config.train.precision, self.device)

    @classmethod
    def load(cls, path: str | Path) -> Run:
        """Load a run directory written by `tunelab train`.

        Raises:
            TunelabError: the folder is not a finished run.
        """
        path = Path(path)
        if not (path / "config.yaml").is_file() or not (path / "model").is_dir():
            hint = ""
            if path.parent.is_dir():
                partial = sorted(p.name for p in path.parent.glob(f".{path.name}.partial-*"))
                hint = f" (an unfinished attempt exists: {partial[0]})" if partial else ""
            raise TunelabError(f"{path} is not a finished tunelab run: it needs config.yaml and model/{hint}")
        quiet_transformers()
        config = load_config(path / "config.yaml")
        task = TASKS[config.task](config)
        tokenizer = load_tokenizer(str(path / "model"))
        model = METHODS[config.method].load(config, task, path / "model").to(pick_device()).eval()
        return cls(path, config, task, model, tokenizer)

    def logits(self, examples: list[dict[str, Any]]) -> list[np.ndarray]:
        return predict_logits(
            self.model,
            examples,
            self.task.collate,
            self.tokenizer.pad_token_id,
            self.config.train.eval_batch_size,
            self.device,
            self.dtype,
        )

    def predict(self, texts: str | list[str], pairs: list[str] | None = None) -> list[dict[str, Any]]:
        """The task's prediction for each text: label and probabilities (classification),
        labels (multi-label), value (regression), or entities with offsets (token tasks)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        examples = self.task.encode_inputs(texts, self.tokenizer, pairs)
        return self.task.predictions(self.logits(examples), examples)

    def predict_file(self, path: str | Path) -> list[dict[str, Any]]:
        """Predictions for every row of a file's `data.text_column` (+ text pair column)."""
        d = self.config.data
        table = read_table(path, "auto" if d.format == "conll" else d.format)
        columns = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else [])
        require_columns(
            table, columns, {d.text_column: "data.text_column", d.text_pair_column: "data.text_pair_column"}
        )
        for i, row in enumerate(table.rows):
            for column in columns:
                if is_missing(row.get(column)):
                    raise TunelabError(
                        f"{table.where(i)}: column '{column}' is empty; fill in the text or remove the row"
                    )
        texts = [str(r[d.text_column]) for r in table.rows]
        pairs = [str(r[d.text_pair_column]) for r in table.rows] if d.text_pair_column else None
        return [{"text": t, **p} for t, p in zip(texts, self.predict(texts, pairs))]

    def evaluate(self, path: str | Path) -> dict[str, Any]:
        """Task metrics on a labelled file (same columns as training)."""
        examples = self.task.encode(self.task.read(str(path)), self.tokenizer)
        return self.task.metrics(self.logits(examples), examples)


def train(
    config: Config | str | Path | None = None,
    *,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    **kwargs: Any,
) -> Run:
    """Fine-tune per the config and write the run directory; return the loaded best model.

    `config` is a Config, a YAML path, or None; `overrides` are `key=value` strings and
    kwargs follow `load_config`. Raises TunelabError for bad config or data.
    """
    if not isinstance(config, Config):
        config = load_config(config, overrides, **kwargs)
    elif overrides or kwargs:
        raise TypeError("pass overrides/kwargs with a YAML path, not with a built Config")
    config = dataclasses.replace(config, output_dir=config.output_dir or default_output_dir(config))
    out = Path(config.output_dir)
    if out.exists() and not overwrite:
        raise TunelabError(
            f"{out} already exists; choose another output_dir=... or pass --overwrite "
            f"(overwrite=True in Python) to replace it"
        )
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    quiet_transformers()
    seed_everything(config.seed)

    model_path = resolve_model(config.model)
    tokenizer = load_tokenizer(model_path)
    task = TASKS[config.task](config)
    splits = task.load_splits(tokenizer)
    config.data.labels = list(task.labels) if config.task != "regression" else None
    method = METHODS[config.method]
    lr = config.train.learning_rate or method.DEFAULT_LR
    say(
        f"data: {len(splits.train)} train, {len(splits.validation)} validation"
        + (f", {len(splits.test)} test" if splits.test else "")
        + (f"; labels: {', '.join(task.labels)}" if config.task != "regression" else "")
    )

    seed_everything(config.seed)
    model = task.build_model(model_path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model = method.apply(model, config, task)
    trainable, total = count_params(model)
    say(
        f"model {config.model}, method {config.method}: trainable params: {trainable:,} / {total:,} "
        f"({100 * trainable / total:.2f}%), lr {lr:g}"
    )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_config(config, tmp / "config.yaml")
    device = pick_device()
    write_json(tmp / "env.json", environment(config, device, splits.files))
    with open(tmp / "metrics.jsonl", "w") as metrics_file:

        def log(entry: dict[str, Any]) -> None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

        result = fit(
            model, task, splits.train, splits.validation, config, lr, tokenizer.pad_token_id, log, device
        )
    rss = peak_rss_mb()
    run = Run(tmp, config, task, model, tokenizer)
    report: dict[str, Any] = {}
    if splits.validation:
        decided = task.calibrate(run.logits(splits.validation), splits.validation)
        if decided:
            report["calibration"] = decided
            save_config(config, tmp / "config.yaml")
            say(f"tuned on validation: {decided}")
    for split, examples in (("validation", splits.validation), ("test", splits.test)):
        if examples:
            report[split] = task.metrics(run.logits(examples), examples)
    report["train"] = {
        **result.summary(),
        "peak_rss_mb": round(rss, 1),
        "trainable_params": trainable,
        "total_params": total,
        "learning_rate": lr,
        "train_examples": len(splits.train),
    }
    method.save(model, tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    if method.merge is not None and config.method != "full":
        report["merge"] = check_merge(
            config, task, tmp / "model", splits.validation or splits.train, tokenizer
        )
        say(
            f"merge check: merged and unmerged logits differ by at most {report['merge']['max_abs_diff']:.2e}"
        )
    write_json(tmp / "eval.json", report)

    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    run.path = out
    summary = ", ".join(
        f"{split} {report[split][task.default_metric]:.4f}"
        for split in ("validation", "test")
        if split in report
    )
    say(
        f"done in {result.runtime_s:.1f}s ({result.summary()['samples_per_s']:.1f} samples/s); "
        f"{task.default_metric}: {summary}; run saved to {out}"
    )
    return run


def load(path: str | Path) -> Run:
    """Load a finished run directory for prediction or evaluation."""
    return Run.load(path)
