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
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab import __version__, speed
from tunelab.checkpoint import crash_point, discard, latest_checkpoint
from tunelab.config import Config, load_config, save_config, to_dict
from tunelab.console import say
from tunelab.data import is_missing, read_table, refuse_blank_rows, require_columns
from tunelab.datacheck import check_data
from tunelab.device import peak_rss_mb, pick_device, precision_used, resolve_precision
from tunelab.dist import (
    Dist,
    broadcast_object,
    device_for,
    full_state,
    init_distributed,
    restart_caveat,
    restart_count,
    shutdown,
    torchrun_job,
)
from tunelab.errors import ConfigError, Interrupted, TunelabError
from tunelab.loop import fit
from tunelab.memory import plan_memory, set_checkpointing
from tunelab.methods import METHODS, plain_weights
from tunelab.methods.common import merge_checked
from tunelab.models import (
    count_params,
    has_weights,
    load_tokenizer,
    position_limit,
    quiet_transformers,
    resolve_model,
    resolves_plain,
)
from tunelab.outputs import check_replaceable, check_writable, is_run, mark_run, move_into_place, write_error
from tunelab.stream import StreamSource, stream_splits
from tunelab.tasks import TASKS
from tunelab.tasks.generative import write_samples
from tunelab.token_cache import file_digest
from tunelab.trackers import Trackers

CHECK_ROWS = 100_000  # rows per file the data check at the start of `train` reads (all: `data check`)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def environment(
    config: Config, device: torch.device, files: dict[str, str], speed_report: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run's env.json: versions, device, threads, precision, seed, data hashes, git commit,
    command, and what the speed layer did (`speed`)."""
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
        "precision": precision_used(config.train.precision, device),
        "seed": config.seed,
        "data_sha256": {split: file_digest(path) for split, path in files.items()},
        "git_commit": commit,
        "command": sys.argv,
        "pid": os.getpid(),  # the training process: `tunelab studio` tells a live run by it, and stops it
        "torchrun_job": torchrun_job(),  # a restarted job knows its own unfinished run by it (`start_point`)
        "speed": speed_report,
    }


def default_output_dir(config: Config) -> str:
    name = Path(config.model).name if Path(config.model).exists() else config.model.replace("/", "--")
    return str(Path("runs") / f"{name}-{config.method}-{time.strftime('%Y%m%d-%H%M%S')}")


def write_json(path: Path, value: Any) -> None:
    """Write whole or not at all: a crash mid-write leaves the previous file (or none)."""
    part = path.with_name(f".{path.name}.partial")
    part.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    os.replace(part, path)


def check_merge(
    config: Config, task: Any, model_dir: Path, examples: list[dict[str, Any]], tokenizer: Any
) -> dict[str, Any]:
    """Reload the saved model, merge it into plain weights and compare logits on up to 32
    examples: proof that the saved artifact merges correctly."""
    method = METHODS[config.method]
    model = method.load(config, task, model_dir)
    device = next(model.parameters()).device  # the CPU, or the GPU a 4-bit base (QLoRA) is loaded onto
    batch = {k: v.to(device) for k, v in task.probe_batch(examples[:32], tokenizer.pad_token_id).items()}
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
            if partial_dir(path).exists():
                hint = f" (an unfinished attempt exists: {partial_dir(path)}; tunelab train --resume {path})"
            raise TunelabError(f"{path} is not a finished tunelab run: it needs config.yaml and model/{hint}")
        if not has_weights(path / "model"):
            raise TunelabError(f"{path / 'model'} holds no weights (no model or adapter_model .safetensors): the "
                               f"run is incomplete; train it again: tunelab train {path / 'config.yaml'} --overwrite")  # fmt: skip
        config = load_config(path / "config.yaml")
        task = TASKS[config.task](config)
        tokenizer = load_tokenizer(str(path / "model"))
        with quiet_transformers():
            model = METHODS[config.method].load(config, task, path / "model").to(pick_device()).eval()
        return cls(path, config, task, model, tokenizer)

    def logits(self, examples: list[dict[str, Any]]) -> list[np.ndarray]:
        return self.task.outputs(self.model, examples, self.tokenizer.pad_token_id,
                                 self.config.train.eval_batch_size, self.device, self.dtype)  # fmt: skip

    def predict(self, texts: str | list[str], pairs: list[str] | None = None) -> list[dict[str, Any]]:
        """The task's prediction for each text: label and probabilities (classification),
        labels (multi-label), value (regression), entities with offsets (token tasks), or the
        generated answer (causal-lm: the text is the user's message; seq2seq: the source)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        examples = self.task.encode_inputs(texts, self.tokenizer, pairs)
        if self.task.generative:
            return self.task.predictions(self.generate([e["prompt_text"] for e in examples]), examples)
        return self.task.predictions(self.logits(examples), examples)

    def generate(self, prompts: list[str], streamer: Any = None, max_new_tokens: int | None = None,
                 options: Any = None, stop: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
        """Generated text for rendered prompts, per the run's `generation` settings (or
        `options`, a GenerationConfig); generation ends at any of the `stop` strings."""
        return self.task.generate_texts(self.model, self.tokenizer, prompts, self.device, self.dtype,
                                        max_new_tokens, streamer=streamer, options=options, stop=stop)  # fmt: skip

    def chat(self, history: list[dict[str, str]], message: str, streamer: Any = None) -> str:
        """The model's answer to `message` after the conversation `history` (which it does not change)."""
        if not self.task.generative:
            raise TunelabError(f"{self.path} is a {self.config.task} run; chat needs a causal-lm run")
        return self.generate([self.task.prompt_for(message, self.tokenizer, history)], streamer)[0]

    def predict_file(self, path: str | Path) -> list[dict[str, Any]]:
        """Predictions for every row of a file's `data.text_column` (+ text pair column); for
        generative runs, an answer for each row's prompt (same layout as training, answer optional)."""
        if self.task.generative or hasattr(self.task, "file_inputs"):
            refuse_blank_rows(path)  # an answer per row, in order
        if self.task.generative:
            prompts = self.task.file_prompts(self.task.read(str(path), need_labels=False), self.tokenizer)
            answers = self.generate([p for _, p in prompts])
            return [{"prompt": shown, "generation": a} for (shown, _), a in zip(prompts, answers)]
        if hasattr(self.task, "file_inputs"):  # inputs other than the text column (question + context)
            shown, texts, pairs = self.task.file_inputs(str(path))
            return [{**s, **p} for s, p in zip(shown, self.predict(texts, pairs))]
        d = self.config.data
        # blank rows stay (one output per input row, so the output lines up with the file)
        table = read_table(path, "auto" if d.format == "conll" else d.format, keep_blank=True)
        columns = [d.text_column] + ([d.text_pair_column] if d.text_pair_column else [])
        require_columns(table, columns, dict(zip(columns, ("data.text_column", "data.text_pair_column"))),
                        self.task.column_flags)  # fmt: skip
        results: list[dict[str, Any]] = [
            {"text": "" if is_missing(r.get(d.text_column)) else str(r[d.text_column]),
             "skipped": f"empty input ({table.lines[i]})"}
            for i, r in enumerate(table.rows)
        ]  # fmt: skip
        keep = [i for i, r in enumerate(table.rows) if not any(is_missing(r.get(c)) for c in columns)]
        if keep:
            texts = [str(table.rows[i][d.text_column]) for i in keep]
            pairs = [str(table.rows[i][d.text_pair_column]) for i in keep] if d.text_pair_column else None
            for i, prediction in zip(keep, self.predict(texts, pairs)):
                results[i] = {"text": results[i]["text"], **prediction}
        return results

    def evaluate(self, path: str | Path, baseline: bool | None = None) -> dict[str, Any]:
        """Task metrics on a labelled file (same columns as training). Generative runs add
        generation metrics, write the sample table beside the run (`samples-<file>.md/jsonl`),
        and with `baseline` (default: generation.compare_base) score the un-tuned model under
        the key "baseline"."""
        examples = self.task.encode(self.task.read(str(path)), self.tokenizer)
        if not self.task.generative:
            return self.task.metrics(self.logits(examples), examples)
        compare = self.config.generation.compare_base if baseline is None else baseline
        metrics = generative_report(
            self, {"data": examples}, compare, self.path, f"samples-{Path(path).stem}"
        )
        return {**metrics["data"], **({"baseline": metrics["baseline"]["data"]} if compare else {})}


def partial_dir(out: Path) -> Path:
    """Where a run lives until it is complete: a hidden sibling of its final folder."""
    return out.parent / f".{out.name}.partial"


def _same_settings(a: Config, b: Config) -> bool:
    """Whether two configs describe the same training (ignoring how it is displayed/resumed)."""
    strip = {"progress_bar", "resume", "num_threads"}
    da, db = to_dict(a), to_dict(b)
    for d in (da, db):
        d["train"] = {k: v for k, v in d["train"].items() if k not in strip}
        d["data"]["labels"] = None
    return da == db


def resume_point(config: Config, out: Path, resume: bool, overwrite: bool) -> tuple[Config, Path | None]:
    """Decide between a fresh start and resuming an unfinished run; returns the config to use
    (a resumed run keeps its saved one) and the checkpoint to resume from, if any.

    Raises TunelabError when a finished or unfinished run is in the way and nothing was said."""
    partial = partial_dir(out)
    for place in (out, partial):  # before any loading: a file in the way, a read-only place, /proc
        if place is partial or not out.is_dir():  # (an existing folder: where its sibling goes)
            check_writable(place, f"output_dir {out}")
    if overwrite:  # only a tunelab run is ever replaced, and only once the new one has finished
        check_replaceable(out)
        check_replaceable(partial)
        shutil.rmtree(partial, ignore_errors=True)
        return config, None
    if out.exists() or out.is_symlink():
        kind = "a tunelab run" if is_run(out) else "not a tunelab run, so --overwrite will not replace it"
        raise TunelabError(f"{out} already exists ({kind}); choose another output_dir=... or pass --overwrite "
                           f"(overwrite=True in Python) to replace a run")  # fmt: skip
    latest = latest_checkpoint(partial / "checkpoints")
    if not partial.exists():
        if resume and config.train.resume != "auto":
            raise TunelabError(f"nothing to resume: no unfinished run at {out} (none was started, or it was "
                               f"stopped before writing anything); start it with: tunelab train CONFIG")  # fmt: skip
        return config, None
    if not (resume or config.train.resume == "auto") or latest is None:
        where = f" (latest checkpoint: {latest.name})" if latest else " (no checkpoint yet)"
        hint = f"resume it with: tunelab train --resume {out}; or " if latest else ""
        raise TunelabError(f"an unfinished run is in the way at {partial}{where}; {hint}"
                           f"pass --overwrite to start over")  # fmt: skip
    saved = load_config(partial / "config.yaml")
    if not resume and not _same_settings(saved, config):
        raise TunelabError(f"train.resume=auto: the unfinished run at {partial} was started with other "
                           f"settings ({partial / 'config.yaml'}); pass --overwrite to start over")  # fmt: skip
    saved.train.progress_bar = config.train.progress_bar
    return saved, latest


def continues_job(folder: Path) -> bool:
    """Whether this process belongs to the torchrun job that started the run at `folder` (its
    env.json records the job's rendezvous id): torchrun restarted the processes after one died
    (`--max-restarts`), or the job was launched again under its own `--rdzv-id` (a requeued
    job). A job without an id of its own (static rendezvous: "none") is known only after a restart."""
    job = torchrun_job()
    if not job or not (folder / "env.json").is_file():
        return False
    try:
        recorded = json.loads((folder / "env.json").read_text()).get("torchrun_job")
    except ValueError:  # cut short: env.json is written whole, so only a foreign file
        return False
    return recorded == job and (job != "none" or restart_count() > 0)


def start_point(config: Config, out: Path, resume: bool, overwrite: bool) -> tuple[Config, Path | None, bool]:
    """Where training starts: (the config to use, the checkpoint to resume from or None, whether
    the run is already finished at `out`). A torchrun job that started the unfinished run itself
    (`continues_job`: restarted after a process died) continues it, from its latest checkpoint
    as --resume would, or from the start when it had none yet, whatever the command says about
    resuming or overwriting; everything else is `resume_point`'s to decide.

    Raises TunelabError as `resume_point` does, and when the job's run was started with other settings."""
    partial = partial_dir(out)
    if continues_job(partial):
        latest = latest_checkpoint(partial / "checkpoints")
        saved = load_config(partial / "config.yaml")  # written before env.json
        if not _same_settings(saved, config):
            raise TunelabError(f"the unfinished run at {partial} was started by this torchrun job with other "
                               f"settings ({partial / 'config.yaml'}); use another output_dir or --rdzv-id")  # fmt: skip
        saved.train.progress_bar = config.train.progress_bar
        say(f"torchrun job {torchrun_job()} (restart {restart_count()}): continuing its unfinished run "
            + (f"from {latest.name}" if latest else "from the start (it had no checkpoint yet)"))  # fmt: skip
        return (saved, latest, False) if latest else (config, None, False)
    if continues_job(out) and not partial.exists():
        say(f"torchrun job {torchrun_job()} (restart {restart_count()}): its run had finished: {out}")
        return config, None, True
    return (*resume_point(config, out, resume, overwrite), False)


def agreed_start(config: Config, out: Path, resume: bool, overwrite: bool,
                 dist: Dist) -> tuple[Config, Path | None, bool]:  # fmt: skip
    """`start_point` as rank 0 sees it, on every process: processes that saw another output_dir
    (another node without a shared filesystem, or a moment later) would otherwise start from
    other steps. Rank 0's refusal is every process's."""
    decided: tuple[Config, Path | None, bool] | TunelabError
    try:
        decided = start_point(config, out, resume, overwrite) if dist.is_main else (config, None, False)
    except TunelabError as e:
        if not dist.active:
            raise
        decided = e
    decided = broadcast_object(decided, dist)
    if isinstance(decided, TunelabError):
        raise decided
    checkpoint = decided[1]
    if checkpoint is not None and not checkpoint.is_dir():
        raise TunelabError(f"process {dist.rank} cannot read the checkpoint {checkpoint} that rank 0 resumes "
                           f"from: output_dir must be on a filesystem every node shares, at the same path")  # fmt: skip
    return decided


def recover_finished(config: Config, out: Path, resume: bool, overwrite: bool) -> Run | None:
    """A run stopped after its last file (eval.json) was written but before its folder was
    renamed into place is complete: with --resume (or train.resume=auto and the same settings)
    move it there instead of training again. None when there is no such run.

    Raises TunelabError when there is one and resuming was not asked for."""
    partial = partial_dir(out)
    if overwrite or out.exists() or out.is_symlink() or not (partial / "eval.json").is_file():
        return None
    if not (resume or config.train.resume == "auto"):
        raise TunelabError(f"{partial} holds a finished run that was stopped before it was moved into place; "
                           f"finish it with: tunelab train --resume {out}; or pass --overwrite to start over")  # fmt: skip
    if not resume and not _same_settings(load_config(partial / "config.yaml"), config):
        return None  # resume_point says why it will not resume
    discard(partial / "checkpoints")
    partial.rename(out)
    say(f"the run had finished before it was stopped; moved {partial} into place: {out}")
    return Run.load(out)


def run_config(config: Config | str | Path | None, overrides: list[str] | None, resume: str | Path | None,
               kwargs: dict[str, Any]) -> Config:  # fmt: skip
    """The config a `train` call means, with output_dir filled in; a resumed run's own config."""
    if resume is not None:
        saved = partial_dir(Path(resume)) / "config.yaml"
        config = load_config(saved) if saved.exists() else load_config(overrides=[f"output_dir={resume}"])
        config.output_dir = str(resume)
    elif not isinstance(config, Config):
        config = load_config(config, overrides, **kwargs)
    elif overrides or kwargs:
        raise TypeError("pass overrides/kwargs with a YAML path, not with a built Config")
    return dataclasses.replace(config, output_dir=config.output_dir or default_output_dir(config))


@contextmanager
def process_settings(config: Config) -> Iterator[None]:
    """The process-wide settings of a run (torch's thread count, deterministic algorithms,
    quiet transformers) for the `with` block; put back as they were when it ends, so calling
    `tunelab.train` leaves the caller's process as it found it."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        if config.train.num_threads:
            torch.set_num_threads(config.train.num_threads)
        if config.train.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        with quiet_transformers():
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def load_inputs(config: Config) -> tuple[str, Any, Any, Any]:
    """(model path, tokenizer, task, splits) of a run, seeded, with the labels filled into
    `config.data.labels`. Call it inside `process_settings(config)`."""
    seed_everything(config.seed)
    encoder_from_run(config.model)
    model_path = resolve_model(config.model)
    check_positions(config, model_path)
    tokenizer = load_tokenizer(model_path)
    task = TASKS[config.task](config)
    # data.streaming: only validation and test are read here; StreamSource reads the train file as it trains
    splits = stream_splits(task, tokenizer) if config.data.streaming else task.load_splits(tokenizer)
    config.data.labels = list(task.labels) if task.labels and config.task != "regression" else None
    return model_path, tokenizer, task, splits


def check_positions(config: Config, model_path: str) -> None:
    """Raise before training when data.max_length (or data.block_size) asks for more tokens than
    the model has positions: otherwise the first long batch fails mid-training."""
    limit = position_limit(model_path)
    for key, value in (
        ("data.max_length", config.data.max_length),
        ("data.block_size", config.data.block_size),
    ):
        if limit is not None and value is not None and value > limit:
            raise ConfigError(f"{key}={value} is longer than the model {config.model} allows ({limit} positions, "
                              f"from its config.json); set {key}={limit} or less")  # fmt: skip


def encoder_from_run(model: str) -> None:
    """When `model:` names a finished run whose weights are not plain (adapters, or only the
    trained layers), fold them once into a plain model folder `<run>/encoder` (written under a
    temporary name), which `resolve_model` then reads. The config keeps the run's path, so it
    records where the weights came from; a new task head replaces the run's own (an MLM head
    is dropped by `from_pretrained`)."""
    path = Path(model).expanduser()
    if not (path / "config.yaml").is_file() or not (path / "model").is_dir() or resolves_plain(path):
        return
    source = Run.load(path)
    method = METHODS[source.config.method]
    if method.merge is None:
        raise ConfigError(f"model: the run {path} was trained with method={source.config.method}, which "
                          f"cannot be merged into plain weights; start from a full, freeze, lora or ia3 run")  # fmt: skip
    say(f"model: folding {path}'s {source.config.method} weights into {path / 'encoder'} (once)")
    plain: Any = method.merge(source.model.to("cpu").float())  # a transformers model
    tmp = path / f".encoder.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    source.tokenizer.save_pretrained(tmp)
    tmp.rename(path / "encoder")


def build_model(config: Config, task: Any, method: Any, model_path: str, tokenizer: Any) -> torch.nn.Module:
    """The model a run trains: the pretrained model with its task head, set up for training
    (gradient checkpointing), with the method applied and tunelab's speed-ups swapped in
    (`train.fast_kernels`; `speed.report_for(model)` says which; undone by `speed.undo` before
    saving). Seeded, so every call
    builds the same."""
    seed_everything(config.seed)
    model = task.build_model(model_path)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if config.train.gradient_checkpointing is True:  # (`auto`: the memory plan decides, after this)
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(
                f"train.gradient_checkpointing: {type(model).__name__} does not support it; turn it off"
            )
        set_checkpointing(model, True)
    model = method.apply(model, config, task)
    speed.apply(model, task, cpu=not torch.cuda.is_available(), enabled=config.train.fast_kernels)
    return model


def train(
    config: Config | str | Path | None = None,
    *,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    resume: str | Path | None = None,
    **kwargs: Any,
) -> Run:
    """Fine-tune per the config and write the run directory; return the loaded best model.

    `config` is a Config, a YAML path, or None; `overrides` are `key=value` strings and
    kwargs follow `load_config`. `resume` names an unfinished run to continue from its latest
    checkpoint (its saved config is used). Raises TunelabError for bad config or data, and
    `Interrupted` when stopped by a signal (after saving a checkpoint).
    """
    config = run_config(config, overrides, resume, kwargs)
    with process_settings(config):
        return train_in_process(config, resume is not None, overwrite)


def train_in_process(config: Config, resume: bool, overwrite: bool) -> Run:
    """`train` once the config is resolved, inside `process_settings`."""
    assert config.output_dir is not None  # run_config fills it in
    out = Path(config.output_dir)
    dist = init_distributed()
    # a job restarted by torchrun finishes its own run as --resume would
    finished = None if dist.active else recover_finished(config, out, resume or continues_job(partial_dir(out)),
                                                         overwrite)  # fmt: skip
    if finished is not None:
        return finished
    config, checkpoint, done = agreed_start(config, out, resume, overwrite, dist)
    if done:
        shutdown(dist)
        return Run.load(out)
    caveat = restart_caveat()
    if caveat and dist.is_main:
        say(f"warning: {caveat}")
    model_path, tokenizer, task, splits = load_inputs(config)
    method = METHODS[config.method]
    lr = config.train.learning_rate or method.DEFAULT_LR
    speak = say if dist.is_main else (lambda message: None)
    stream = StreamSource(config, task, tokenizer, dist) if config.data.streaming else None
    speak((f"data: streaming {config.data.train}" if stream else f"data: {len(splits.train)} train")
          + f", {len(splits.validation)} validation" + (f", {len(splits.test)} test" if splits.test else "")
          + (f"; labels: {', '.join(task.labels)}" if config.data.labels else ""))  # fmt: skip
    if config.data.check and dist.is_main and stream is None:  # (the check reads the whole train file)
        for line in check_data(config, tokenizer, task, splits, max_rows=CHECK_ROWS).short_lines():
            say(line)

    model = build_model(config, task, method, model_path, tokenizer)
    trainable, total = count_params(model)
    speak(f"model {config.model}, method {config.method}: trainable params: {trainable:,} / {total:,} "
          f"({100 * trainable / total:.2f}%), lr {lr:g}"
          + (f"; {dist.world} processes" if dist.active else "")
          + (f"; resuming from {checkpoint.name}" if checkpoint else ""))  # fmt: skip
    speak(speed.report_for(model).line())

    tmp = partial_dir(out)
    device = device_for(dist) if dist.active else pick_device()
    # gradient checkpointing and micro-batches that fit train.memory_limit_mb (generative tasks)
    # (with data.streaming, whose train rows are not read yet, validation's rows stand in for them)
    plan = plan_memory(model, task, splits.train or splits.validation, config, tokenizer.pad_token_id, device,
                       resolve_precision(config.train.precision, device))  # fmt: skip
    speak(plan.line())
    if dist.is_main:
        tmp.mkdir(parents=True, exist_ok=True)
        (tmp / "eval.json").unlink(missing_ok=True)  # present only once the run is complete
        mark_run(tmp)
        save_config(config, tmp / "config.yaml")
        env = environment(config, device, splits.files, speed.report_for(model).as_dict())
        write_json(tmp / "env.json", {**env, "memory": plan.as_dict()})
    counters = json.loads((checkpoint / "state.json").read_text())["result"] if checkpoint else {}
    done, logged = counters.get("steps", 0), counters.get("logged")
    trackers = Trackers(config, tmp, done, enabled=dist.is_main)  # train.report_to, on rank 0
    try:
        with (
            write_errors(tmp, out),
            metrics_log(tmp / "metrics.jsonl", done, dist.is_main, trackers, logged) as log,
        ):
            result = fit(model, task, splits.train, splits.validation, config, lr, tokenizer.pad_token_id, log,
                         device, checkpoint_dir=tmp / "checkpoints", resume_from=checkpoint, dist=dist,
                         micro_batch_tokens=plan.micro_batch_tokens, stream=stream,
                         trim_memory=plan.trim_steps)  # fmt: skip
    except Interrupted as e:
        trackers.finish(tmp, None, "KILLED")
        shutdown(dist)
        raise Interrupted(f"{e}; resume with: tunelab train --resume {out}") from None
    except BaseException:
        trackers.finish(tmp, None, "FAILED")  # an MLflow run is not left RUNNING by a crash
        raise
    if dist.active and config.train.distributed == "fsdp":
        whole, _ = full_state(model)  # every process takes part in the gather
        if dist.is_main:
            seed_everything(config.seed)
            model = method.apply(task.build_model(model_path), config, task)
            model.load_state_dict(whole)
    if not dist.is_main:
        shutdown(dist)
        return Run(out, config, task, model, tokenizer)
    with write_errors(tmp, out):
        run = finish_run(config, task, method, model, tokenizer, splits, result, lr, tmp, out)
    trackers.finish(out, json.loads((out / "eval.json").read_text()))
    shutdown(dist)
    return run


@contextmanager
def write_errors(tmp: Path, out: Path) -> Iterator[None]:
    """A full disk, or a folder that turned read-only, while the run is written: one line instead
    of a traceback, and no hidden folder left that blocks a re-run without saying so. The
    unfinished run is kept when it has a checkpoint to resume from, else removed."""
    try:
        yield
    except Exception as e:  # an OSError, or safetensors' SafetensorError (which is not one)
        error = None if isinstance(e, TunelabError) else write_error(e, tmp)
        if error is None:
            raise
        if latest_checkpoint(tmp / "checkpoints") is not None:
            raise TunelabError(f"{error}; the unfinished run {tmp} keeps its checkpoints: resume with "
                               f"`tunelab train --resume {out}`, or delete {tmp} to start over") from None  # fmt: skip
        shutil.rmtree(tmp, ignore_errors=True)
        raise TunelabError(f"{error}; the unfinished run {tmp} was removed") from None


@contextmanager
def metrics_log(path: Path, keep_until: int, enabled: bool, trackers: Trackers | None = None,
                keep_lines: int | None = None) -> Iterator[Callable[[dict[str, Any]], None]]:  # fmt: skip
    """A writer of metrics.jsonl lines, each also sent to the `trackers`. On resume, only the
    lines the checkpoint had seen written are kept (`keep_lines`, its count): the rest will be
    written again. (A step can log after its checkpoint, e.g. the epoch-end evaluation, so the
    step number alone cannot tell.) Checkpoints of older versions carry no count: then lines
    after the checkpoint's step (`keep_until`) are dropped. A last line cut short by a crash is
    always dropped (it comes after the checkpoint)."""
    if not enabled:
        yield lambda entry: None
        return
    kept: list[str] = []
    for line in path.read_text().splitlines() if keep_until and path.exists() else []:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            break
        if (len(kept) < keep_lines) if keep_lines is not None else (step <= keep_until):
            kept.append(line)
    part = path.with_name(f".{path.name}.partial")  # the kept lines replace the file in one step
    part.write_text("".join(line + "\n" for line in kept))
    crash_point("metrics-rewrite")
    os.replace(part, path)
    with open(path, "a") as f:

        def log(entry: dict[str, Any]) -> None:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            if trackers is not None:
                trackers.log(entry)

        try:
            yield log
        finally:
            if trackers is not None:
                trackers.pause()  # files closed before the run folder is renamed


def finish_run(config: Config, task: Any, method: Any, model: torch.nn.Module, tokenizer: Any, splits: Any,
               result: Any, lr: float, tmp: Path, out: Path) -> Run:  # fmt: skip
    """Evaluate the best model, save it and the report, and move the run into place."""
    rss = peak_rss_mb()
    # on a GPU also its high-water mark of allocated tensors (this process's: rank 0's under torchrun)
    cuda = torch.cuda.is_available()
    gpu = {"peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)} if cuda else {}
    trainable, total = count_params(model)
    run = Run(tmp, config, task, model, tokenizer)
    report: dict[str, Any] = {}
    if task.generative:  # loss, perplexity, generations and the un-tuned baseline in one pass
        rows = {n: r for n, r in (("validation", splits.validation), ("test", splits.test)) if r}
        scored = "test" if splits.test else "validation"
        report.update(generative_report(run, rows, config.generation.compare_base, tmp, "samples", {scored}))
    else:
        outputs = {name: run.logits(examples) for name, examples in
                   (("validation", splits.validation), ("test", splits.test)) if examples}  # fmt: skip
        if "validation" in outputs:
            decided = task.calibrate(outputs["validation"], splits.validation)
            if decided:
                report["calibration"] = decided
                save_config(config, tmp / "config.yaml")
                say(f"tuned on validation: {decided}")
        for name, logits in outputs.items():
            report[name] = task.metrics(logits, getattr(splits, name))
        if task.scores_baseline and outputs:
            say("scoring the un-tuned model on the same rows")
            base = task.base_model().to(run.device).eval()
            report["baseline"] = {
                name: task.metrics(task.outputs(base, getattr(splits, name), tokenizer.pad_token_id,
                                                config.train.eval_batch_size, run.device, run.dtype),
                                   getattr(splits, name))
                for name in outputs
            }  # fmt: skip
            del base
    report["train"] = {**result.summary(), "peak_rss_mb": round(rss, 1), "trainable_params": trainable,
                       "total_params": total, "learning_rate": lr, "train_examples": None if config.data.streaming else len(splits.train),
                       **gpu}  # fmt: skip
    env = json.loads((tmp / "env.json").read_text())  # with the cache's outcome and the encoder's paths
    write_json(tmp / "env.json", {**env, "speed": speed.report_for(model).as_dict()})
    speed.undo(model)
    discard(tmp / "model")  # an earlier attempt's, cut short by a crash
    method.save(model, tmp / "model")
    crash_point("final-save")
    tokenizer.save_pretrained(tmp / "model")
    if method.merge is not None and not plain_weights(method):
        report["merge"] = check_merge(
            config, task, tmp / "model", splits.validation or splits.train, tokenizer
        )
        say(
            f"merge check: merged and unmerged logits differ by at most {report['merge']['max_abs_diff']:.2e}"
        )
    write_json(tmp / "eval.json", report)  # written last: it marks the run complete (`recover_finished`)
    crash_point("final-checkpoints")
    discard(tmp / "checkpoints")  # a finished run needs no resume state
    crash_point("final-rename")
    move_into_place(tmp, out)  # a previous run at `out` is removed only now
    run.path = out
    summary = ", ".join(f"{split} {report[split][task.default_metric]:.4f}"
                        for split in ("validation", "test") if split in report)  # fmt: skip
    say(f"done in {result.runtime_s:.1f}s ({result.summary()['samples_per_s']:.1f} samples/s); "
        f"{task.default_metric}: {summary}; run saved to {out}")  # fmt: skip
    return run


def generative_report(run: Run, splits: dict[str, list[dict[str, Any]]], baseline: bool, folder: Path | None,
                      stem: str, generate: set[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Loss and perplexity of the run's model on each split, and generation metrics on the
    splits named in `generate` (default: all); with `baseline`, the same for the un-tuned
    model under "baseline". The sample table of prompt / reference / generation (+ the
    un-tuned model's) goes to `folder/stem` (`stem-<split>` when several splits generate)."""
    task, tokenizer = run.task, run.tokenizer
    generate = set(splits) if generate is None else generate
    models = [("tuned", run.model)]
    if baseline:
        say("scoring the un-tuned model on the same rows")
        models.append(("baseline", task.base_model().to(run.device).eval()))
    out: dict[str, Any] = {"baseline": {}} if baseline else {}
    texts: dict[str, dict[str, list[str]]] = {}
    for kind, model in models:
        for name, examples in splits.items():
            rows = task.scored_rows(examples) if name in generate else []
            if rows:
                say(f"{kind} model: generating answers for {len(rows)} {name} rows")
            metrics, generations = task.evaluate_model(
                model, tokenizer, examples, run.device, run.dtype, bool(rows)
            )
            (out["baseline"] if kind == "baseline" else out)[name] = metrics
            if generations:
                texts.setdefault(name, {})[kind] = generations
    if folder is not None:
        for name, generated in texts.items():
            suffix = f"-{name}" if len(texts) > 1 else ""
            write_samples(folder / f"{stem}{suffix}", task.scored_rows(splits[name]), generated["tuned"],
                          generated.get("baseline"))  # fmt: skip
    return out


def load(path: str | Path) -> Run:
    """Load a finished run directory for prediction or evaluation."""
    return Run.load(path)
