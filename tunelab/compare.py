"""`tunelab compare`: every method on the user's data under one budget, and a report that says
which to use.

Each method (and seed, and learning rate with `--lr-sweep`) trains as an ordinary run
directory under `compare-<name>/` beside the config's `output_dir` (`runs/compare-<name>/`
without one; `--out` chooses), in its own process so that its peak memory is its
own; a finished run is kept and skipped when the compare is started again, so an
interrupted compare resumes. `none` is the no-training floor: TF-IDF + logistic regression
(scikit-learn) for an encoder's classification, zero/few-shot prompting that scores each
label's likelihood for a decoder's classification, TF-IDF + ridge for regression, and the
un-tuned model itself for causal-lm and seq2seq.

The report (`report.md`, and `report.html` with its plots embedded) gives per method the
task metric (mean ± std over seeds), training time, samples/s, peak memory, trainable
parameters and artifact size; plots of quality against trainable parameters and against
training time, and the training-loss curves; the Pareto front (better quality or less training
time than every other method); and a recommendation derived from those numbers.
"""

from __future__ import annotations

import base64
import io
import json
import math
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_type_hints

from tunelab.config import GENERATIVE_TASKS, Config, PreferenceConfig, load_config, save_config
from tunelab.device import autocast, peak_rss_mb, pick_device, resolve_precision
from tunelab.errors import ConfigError, TunelabError
from tunelab.methods import METHODS
from tunelab.metrics import higher_is_better
from tunelab.models import load_tokenizer, resolve_model
from tunelab.outputs import COMPARE_MARKER, check_writable, mark_run
from tunelab.tasks import TASKS
from tunelab.tasks.classification import ClassificationTask
from tunelab.tasks.generative import GenerativeTask

METHOD_ORDER = ["none", *METHODS]  # "none": the model as it comes, the floor
LR_SWEEP = (1 / 3, 1.0, 3.0)  # factors of each method's default learning rate


@dataclass
class Row:
    """One method's results, aggregated over seeds (at its best learning rate)."""

    method: str
    scores: list[float] = field(default_factory=list)
    validation: list[float] = field(default_factory=list)
    train_s: list[float] = field(default_factory=list)
    samples_per_s: list[float] = field(default_factory=list)
    peak_rss_mb: list[float] = field(default_factory=list)
    trainable: int = 0
    artifact_mb: float = 0.0
    learning_rate: float | None = None
    runs: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    @property
    def score(self) -> float:
        return statistics.fmean(self.scores) if self.scores else math.nan

    @property
    def spread(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else 0.0

    @property
    def time(self) -> float:
        return statistics.fmean(self.train_s) if self.train_s else 0.0

    @property
    def memory(self) -> float:
        return max(self.peak_rss_mb) if self.peak_rss_mb else 0.0


def parse_budget(text: str | None) -> float | None:
    """`10m`, `90s`, `1.5h` or a bare number of minutes -> minutes."""
    if text is None:
        return None
    units = {"s": 1 / 60, "m": 1.0, "h": 60.0}
    value, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "m")
    try:
        minutes = float(value) * units[unit]
    except ValueError:
        raise ConfigError(f"--budget: {text!r} is not a time; write e.g. 10m, 90s or 1.5h") from None
    if minutes <= 0:
        raise ConfigError("--budget must be > 0")
    return minutes


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20 if path.exists() else 0.0


def metric_of(config: Config) -> tuple[str, bool]:
    """(the task's headline metric, whether higher is better)."""
    metric = TASKS[config.task](config).default_metric
    return metric, higher_is_better(metric)


def compare(config_path: str | None, overrides: list[str], methods: list[str], seeds: int = 1,
            epochs: float | None = None, budget: str | None = None, lr_sweep: bool = False,
            max_memory: float | None = None, max_time: float | None = None, out: str | None = None,
            losses: list[str] | None = None, say: Any = print) -> dict[str, Any]:  # fmt: skip
    """Run every method (for task=preference with `losses`, every method with every loss: a row
    `lora+dpo` each) and write the report; returns the results (also in results.json)."""
    unknown = [m for m in methods if m not in METHOD_ORDER]
    if unknown:
        raise ConfigError(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(METHOD_ORDER)}")
    if seeds < 1:
        raise ConfigError("--seeds must be >= 1")
    config = load_config(config_path, overrides)
    if losses:
        if config.task != "preference":
            raise ConfigError(f"--losses: only for task=preference (this config's task is {config.task})")
        known = get_args(get_type_hints(PreferenceConfig)["loss"])
        wrong = [loss for loss in losses if loss not in known]
        if wrong:
            raise ConfigError(f"--losses: unknown {', '.join(wrong)}; choose from {', '.join(known)}")
    folder = compare_folder(config, config_path, out)
    folder.mkdir(parents=True, exist_ok=True)
    mark_run(folder, COMPARE_MARKER)
    (folder / "logs").mkdir(exist_ok=True)
    save_config(config, folder / "config.yaml")
    minutes = parse_budget(budget)
    settings = [f"train.epochs={epochs}"] if epochs is not None else []
    if minutes is not None:
        settings.append(f"train.max_minutes={minutes}")
    metric, higher = metric_of(config)
    rows = []
    variants = [(method, loss) for method in sorted(methods, key=METHOD_ORDER.index)
                for loss in ([None] if method == "none" or not losses else losses)]  # fmt: skip
    for method, loss in variants:
        row = Row(method if loss is None else f"{method}+{loss}")
        rates = [None] if method == "none" or not lr_sweep else [f * _default_lr(method) for f in LR_SWEEP]
        trials: dict[float | None, list[dict[str, Any]]] = {}
        extra = [] if loss is None else [f"preference.loss={loss}"]
        for lr in rates:
            for seed in range(config.seed, config.seed + seeds):
                name = method if loss is None else f"{method}-{loss}"
                run = folder / (f"{name}-seed{seed}" + (f"-lr{lr:.3g}" if lr is not None else ""))
                result = _ensure_run(
                    config_path, overrides + settings + extra, config, method, seed, lr, run, folder, say
                )
                trials.setdefault(lr, []).append(result)
        best_lr = _best_rate(trials, metric, higher)
        row.learning_rate = best_lr
        for result in trials[best_lr]:
            _fill(row, result, metric)
        rows.append(row)
    report = _report(folder, config, rows, metric, higher, max_memory, max_time, seeds, epochs, minutes)
    say(f"tunelab: compare report written to {folder / 'report.html'} (and report.md)")
    say(report["recommendation"])
    return report


def compare_folder(config: Config, config_path: str | None, out: str | None) -> Path:
    """Where a compare writes: `--out`; else `compare-<name>` beside the config's `output_dir`
    (its own run keeps that name); else `runs/compare-<config file name>`. Checked before any
    work: a folder that exists must be a compare's (started again, it resumes).

    Raises:
        TunelabError: the folder cannot be written, or holds something other than a compare.
    """
    if out:
        folder, what = Path(out), f"--out {out}"
    elif config.output_dir:
        run = Path(config.output_dir)
        folder, what = run.parent / f"compare-{run.name}", f"output_dir {run}"
    else:
        folder, what = Path("runs") / f"compare-{Path(config_path or 'compare').stem}", "compare"
    check_writable(folder, what)
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    earlier = (folder / "logs").is_dir() and (folder / "config.yaml").is_file()  # written before the marker
    if names and not (folder / COMPARE_MARKER).is_file() and not earlier:
        shown = ", ".join(names[:8]) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
        raise TunelabError(f"{what}: {folder} exists and is not a tunelab compare folder (it holds {shown}); "
                           f"choose another --out")  # fmt: skip
    return folder


def _default_lr(method: str) -> float:
    return METHODS[method].DEFAULT_LR


def _ensure_run(config_path: str | None, overrides: list[str], config: Config, method: str, seed: int,
                lr: float | None, run: Path, folder: Path, say: Any) -> dict[str, Any]:  # fmt: skip
    """The results of one run, trained now unless a finished one is there already."""
    if (run / "eval.json").is_file():
        say(f"tunelab: compare: {run.name} is done already; kept")
        return {"dir": run, "eval": json.loads((run / "eval.json").read_text())}
    say(f"tunelab: compare: {run.name} ...")
    log = folder / "logs" / f"{run.name}.log"
    began = time.perf_counter()
    try:
        if method == "none":
            report = no_training_baseline(load_config(config_path, [*overrides, f"seed={seed}"]))
            run.mkdir(parents=True, exist_ok=True)
            mark_run(run)
            report["train"]["scoring_s"] = round(time.perf_counter() - began, 3)  # no training time
            (run / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
            return {"dir": run, "eval": report}
        command = [sys.executable, "-m", "tunelab", "train", *([config_path] if config_path else []), *overrides,
                   f"method={method}", f"seed={seed}", f"output_dir={run}", "train.progress_bar=false", "--overwrite"]  # fmt: skip
        if lr is not None:
            command.append(f"train.learning_rate={lr}")
        with open(log, "w") as f:
            done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
        if done.returncode != 0:
            last = [line for line in log.read_text().splitlines() if line.strip()][-1:] or ["(no output)"]
            raise TunelabError(f"exit status {done.returncode}: {last[0]} (log: {log})")
    except TunelabError as e:
        say(f"tunelab: compare: {run.name} failed: {e}")
        return {"dir": run, "error": str(e)}
    return {"dir": run, "eval": json.loads((run / "eval.json").read_text())}


def _split_scores(report: dict[str, Any], metric: str) -> tuple[float, float]:
    test = report.get("test") or report.get("validation") or {}
    validation = report.get("validation") or test
    return float(test.get(metric, math.nan)), float(validation.get(metric, math.nan))


def _best_rate(trials: dict[float | None, list[dict[str, Any]]], metric: str, higher: bool) -> float | None:
    """The learning rate whose runs scored best on validation (mean over seeds)."""

    def mean_validation(results: list[dict[str, Any]]) -> float:
        values = [_split_scores(r["eval"], metric)[1] for r in results if "eval" in r]
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return -math.inf
        return statistics.fmean(values) if higher else -statistics.fmean(values)

    return max(trials, key=lambda lr: mean_validation(trials[lr]))


def _fill(row: Row, result: dict[str, Any], metric: str) -> None:
    row.runs.append(result["dir"].name)
    if "error" in result:
        row.failed.append(result["error"])
        return
    report = result["eval"]
    test, validation = _split_scores(report, metric)
    row.scores.append(test)
    row.validation.append(validation)
    train = report.get("train", {})
    row.train_s.append(float(train.get("runtime_s", 0.0)))
    row.samples_per_s.append(float(train.get("samples_per_s", 0.0)))
    row.peak_rss_mb.append(float(train.get("peak_rss_mb", 0.0)))
    row.trainable = int(train.get("trainable_params", 0))
    row.artifact_mb = _dir_mb(result["dir"] / "model")


# ------------------------------------------------------------------------------ baselines


def no_training_baseline(config: Config) -> dict[str, Any]:
    """Scores of the no-training floor on the same validation/test rows training uses."""
    if config.task in GENERATIVE_TASKS:
        scores, kind = _untuned_generative(config), "the un-tuned model"
    elif config.task in ("token-classification", "question-answering"):
        raise TunelabError(f"no no-training baseline for {config.task}; leave 'none' out of --methods")
    elif TASKS[config.task](config).scores_baseline:  # masked-lm: the un-tuned model itself
        scores, kind = _untuned(config), "the un-tuned model"
    elif _is_decoder(resolve_model(config.model)) and config.task == "classification":
        scores, kind = _prompted_classifier(config), "few-shot prompting (label likelihood)"
    else:
        scores, kind = (
            _tfidf(config),
            "TF-IDF + " + ("ridge" if config.task == "regression" else "logistic regression"),
        )
    rss = peak_rss_mb()
    return {**scores, "baseline": kind, "train": {"runtime_s": 0.0,
                                                  "trainable_params": 0, "peak_rss_mb": round(rss, 1),
                                                  "samples_per_s": 0.0}}  # fmt: skip


def _is_decoder(path: str) -> bool:
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(path)
    return any("CausalLM" in a for a in hf.architectures or []) and not getattr(
        hf, "is_encoder_decoder", False
    )


def _tfidf(config: Config) -> dict[str, Any]:
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression, Ridge
    except ImportError:
        raise TunelabError(
            "the 'none' baseline for encoders needs scikit-learn: pip install 'tunelab[compare]'"
        ) from None
    import numpy as np

    task = TASKS[config.task](config)
    assert isinstance(task, ClassificationTask)  # classification, or regression (a subclass of it)
    train, validation, test = task.load_tables()
    assert task.labels is not None  # load_tables fixes the label set
    d = config.data

    def texts(table: Any) -> list[str]:
        return [" ".join(str(r[c]) for c in [d.text_column] + ([d.text_pair_column] if d.text_pair_column else []))
                for r in table.rows]  # fmt: skip

    vectorizer = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    x = vectorizer.fit_transform(texts(train))
    y = np.array(task.label_ids(train))
    if config.task == "regression":
        model = Ridge(alpha=1.0).fit(x, y)
    elif task.multi_label:
        raise TunelabError("the 'none' baseline does not cover multi-label classification yet; leave it out")
    else:
        model = LogisticRegression(max_iter=2000, C=10.0).fit(x, y)
    out = {}
    for name, table in (("validation", validation), ("test", test)):
        if table is None:
            continue
        features = vectorizer.transform(texts(table))
        if config.task == "regression":
            outputs = [np.array([v]) for v in model.predict(features)]
        else:  # log-probabilities in label order (classes the model never saw score -inf)
            probs = np.full((features.shape[0], len(task.labels)), 1e-12)
            probs[:, model.classes_] = model.predict_proba(features)
            outputs = list(np.log(probs))
        examples = [{"labels": v} for v in task.label_ids(table)]
        out[name] = task.metrics(outputs, examples)
    return out


def _prompted_classifier(config: Config, shots_per_label: int = 1) -> dict[str, Any]:
    """Few-shot prompting of a decoder: one training example per label in the prompt, then each
    label's summed log-likelihood as its score."""
    import numpy as np
    import torch

    task = ClassificationTask(config)
    train, validation, test = task.load_tables()
    assert task.labels is not None  # load_tables fixes the label set
    path = resolve_model(config.model)
    tokenizer = load_tokenizer(path)
    from transformers import AutoModelForCausalLM

    device = pick_device()
    dtype = resolve_precision(config.train.precision, device)
    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(path)
    model = model.to(device).eval()
    d, labels = config.data, task.labels
    shots, seen = [], {name: 0 for name in labels}
    for i, names in enumerate(task._all_labels(train)):
        if seen[names[0]] < shots_per_label:
            shots.append((str(train.rows[i][d.text_column]), names[0]))
            seen[names[0]] += 1
    header = f"Classify each text as one of: {', '.join(labels)}.\n\n" + "".join(
        f"Text: {t}\nLabel: {label}\n\n" for t, label in shots)  # fmt: skip
    label_ids = [tokenizer(" " + name, add_special_tokens=False)["input_ids"] for name in labels]

    @torch.inference_mode()
    def score(text: str) -> np.ndarray:
        prompt = tokenizer(header + f"Text: {text}\nLabel:", add_special_tokens=False)["input_ids"][-480:]
        rows = [prompt + ids for ids in label_ids]
        longest = max(map(len, rows))
        batch = torch.full((len(rows), longest), tokenizer.pad_token_id)
        for r, ids in enumerate(rows):
            batch[r, : len(ids)] = torch.tensor(ids)
        with autocast(device, dtype):
            logp = torch.log_softmax(model(input_ids=batch.to(device), use_cache=False).logits.float(), -1)
        return np.array([sum(float(logp[r, len(prompt) + k - 1, t]) for k, t in enumerate(ids))
                         for r, ids in enumerate(label_ids)])  # fmt: skip

    out = {}
    for name, table in (("validation", validation), ("test", test)):
        if table is not None:
            outputs = [score(str(r[d.text_column])) for r in table.rows]
            out[name] = task.metrics(outputs, [{"labels": v} for v in task.label_ids(table)])
    return out


def _untuned_generative(config: Config) -> dict[str, Any]:
    task = TASKS[config.task](config)
    assert isinstance(task, GenerativeTask)  # causal-lm or seq2seq
    tokenizer = load_tokenizer(resolve_model(config.model))
    splits = task.load_splits(tokenizer)
    device = pick_device()
    dtype = resolve_precision(config.train.precision, device)
    model = task.base_model().to(device).eval()
    out = {}
    for name, rows in (("validation", splits.validation), ("test", splits.test)):
        if rows:
            out[name], _ = task.evaluate_model(model, tokenizer, rows, device, dtype, generate=name == "test"
                                               or splits.test is None)  # fmt: skip
    return out


def _untuned(config: Config) -> dict[str, Any]:
    """The un-tuned model's metrics on validation/test, for tasks that score it (masked-lm)."""
    task = TASKS[config.task](config)
    tokenizer = load_tokenizer(resolve_model(config.model))
    splits = task.load_splits(tokenizer)
    device = pick_device()
    dtype = resolve_precision(config.train.precision, device)
    model = task.base_model().to(device).eval()
    return {name: task.metrics(task.outputs(model, rows, tokenizer.pad_token_id, config.train.eval_batch_size,
                                            device, dtype), rows)
            for name, rows in (("validation", splits.validation), ("test", splits.test)) if rows}  # fmt: skip


# ------------------------------------------------------------------------------ report


def pareto(rows: list[Row], higher: bool) -> set[str]:
    """Methods that no other method beats on quality and training time at once."""
    done = [r for r in rows if r.scores]
    front = set()
    for r in done:
        dominated = any(
            (o.score >= r.score if higher else o.score <= r.score) and o.time <= r.time
            and ((o.score > r.score if higher else o.score < r.score) or o.time < r.time)
            for o in done if o is not r
        )  # fmt: skip
        if not dominated:
            front.add(r.method)
    return front


def recommend(rows: list[Row], metric: str, higher: bool, max_memory: float | None,
              max_time: float | None) -> str:  # fmt: skip
    """A few sentences derived from the table (never fixed text about a method)."""
    done = [r for r in rows if r.scores and r.method != "none"]
    if not done:
        return "No method finished; see the logs folder."
    key = (lambda r: r.score) if higher else (lambda r: -r.score)
    best = max(done, key=key)
    lines = [f"Best {metric}: {best.method} ({best.score:.4f}), trained in {best.time:.0f} s with "
             f"{best.trainable:,} trainable parameters."]  # fmt: skip
    tolerance = 0.01 if higher else 0.02 * abs(best.score)
    close = [r for r in done if abs(r.score - best.score) <= tolerance and r is not best]
    if close:
        cheap = min(close, key=lambda r: (r.time, r.trainable))
        if cheap.time < best.time or cheap.trainable < best.trainable:
            lines.append(f"{cheap.method} comes within {abs(cheap.score - best.score):.4f} of it "
                         f"({cheap.score:.4f}) in {cheap.time:.0f} s with {cheap.trainable:,} trainable parameters.")  # fmt: skip
    if max_memory is not None or max_time is not None:
        fits = [r for r in done if (max_memory is None or r.memory <= max_memory)
                and (max_time is None or r.time <= max_time * 60)]  # fmt: skip
        limits = " and ".join(x for x in (f"{max_memory:g} MB of memory" if max_memory is not None else "",
                                          f"{max_time:g} min of training" if max_time is not None else "") if x)  # fmt: skip
        if fits:
            pick = max(fits, key=key)
            lines.append(
                f"Within {limits}: {pick.method} ({pick.score:.4f}, {pick.memory:.0f} MB, {pick.time:.0f} s)."
            )
        else:
            lines.append(f"No method fits within {limits}.")
    floor = next((r for r in rows if r.method == "none" and r.scores), None)
    if floor is not None:
        gain = (best.score - floor.score) if higher else (floor.score - best.score)
        lines.append(f"Without training (none) the {metric} is {floor.score:.4f}; fine-tuning with {best.method} "
                     f"{'gains' if gain >= 0 else 'loses'} {abs(gain):.4f}.")  # fmt: skip
    return " ".join(lines)


def _curves(folder: Path, rows: list[Row]) -> dict[str, list[tuple[float, float]]]:
    """Training loss against epoch for each method's first run (metrics.jsonl)."""
    curves = {}
    for row in rows:
        log = folder / row.runs[0] / "metrics.jsonl" if row.runs else None
        if log is None or not log.is_file():
            continue
        points = [(e["epoch"], e["loss"]) for e in map(json.loads, log.read_text().splitlines())
                  if "split" not in e and "loss" in e]  # fmt: skip
        if points:
            curves[row.method] = points
    return curves


def _plots(rows: list[Row], curves: dict[str, Any], metric: str, front: set[str]) -> dict[str, str]:
    """PNG plots as base64 strings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.scores]
    images = {}

    def save(fig: Any) -> str:
        buffer = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        return base64.b64encode(buffer.getvalue()).decode()

    for key, x_of, label, log_x in (
        ("params", lambda r: max(r.trainable, 1), "trainable parameters", True),
        ("time", lambda r: max(r.time, 0.1), "training time (s)", True),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in done:
            ax.errorbar(x_of(r), r.score, yerr=r.spread or None, fmt="o", color="C3" if r.method in front else "C0",
                        capsize=3)  # fmt: skip
            ax.annotate(r.method, (x_of(r), r.score), textcoords="offset points", xytext=(5, 5))
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(label + (" (log scale)" if log_x else ""))
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} against {label} (red: Pareto front)")
        ax.grid(alpha=0.3)
        images[key] = save(fig)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, points in curves.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.set_title("learning curves (training loss)")
        ax.legend()
        ax.grid(alpha=0.3)
        images["curves"] = save(fig)
    return images


def _report(folder: Path, config: Config, rows: list[Row], metric: str, higher: bool, max_memory: float | None,
            max_time: float | None, seeds: int, epochs: float | None, minutes: float | None) -> dict[str, Any]:  # fmt: skip
    front = pareto(rows, higher)
    text = recommend(rows, metric, higher, max_memory, max_time)
    budget = (f"{epochs:g} epoch(s)" if epochs is not None else f"{config.train.epochs:g} epoch(s)") + (
        f", at most {minutes:g} min each" if minutes is not None else "")  # fmt: skip
    split = "test" if config.data.test else "validation"
    header = ["method", f"{split} {metric}", "train time (s)", "samples/s", "peak memory (MB)",
              "trainable params", "artifact (MB)", "learning rate", "Pareto"]  # fmt: skip
    table = []
    for r in rows:
        if not r.scores:
            table.append([r.method, "failed: " + (r.failed[0] if r.failed else "no result")] + [""] * 7)
            continue
        score = f"{r.score:.4f}" + (f" ± {r.spread:.4f}" if len(r.scores) > 1 else "")
        table.append([r.method, score, f"{r.time:.1f}", f"{statistics.fmean(r.samples_per_s):.1f}",
                      f"{r.memory:.0f}", f"{r.trainable:,}", f"{r.artifact_mb:.1f}",
                      f"{r.learning_rate:.3g}" if r.learning_rate else ("default" if r.method != "none" else "-"),
                      "yes" if r.method in front else ""])  # fmt: skip
    about = (f"model {config.model}, task {config.task}, data {config.data.train}; {budget}; "
             f"{seeds} seed(s) from {config.seed}; metric on the {split} split")  # fmt: skip
    md = [f"# tunelab compare: {folder.name}", "", about, "", "**Recommendation.** " + text, "",
          "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]  # fmt: skip
    md += ["| " + " | ".join(row) + " |" for row in table]
    curves = _curves(folder, rows)
    images = _plots(rows, curves, metric, front)
    md += [
        "",
        "Plots: report.html (quality against trainable parameters and against training time; training loss).",
    ]
    (folder / "report.md").write_text("\n".join(md) + "\n")
    _write_html(folder / "report.html", folder.name, about, text, header, table, images)
    results = {"metric": metric, "higher_is_better": higher, "pareto": sorted(front), "recommendation": text,
               "rows": [{"method": r.method, "score": None if math.isnan(r.score) else r.score, "std": r.spread,
                         "scores": r.scores, "train_s": r.time, "peak_rss_mb": r.memory,
                         "trainable_params": r.trainable, "artifact_mb": round(r.artifact_mb, 2),
                         "learning_rate": r.learning_rate, "runs": r.runs, "failed": r.failed} for r in rows]}  # fmt: skip
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def _write_html(path: Path, title: str, about: str, text: str, header: list[str], table: list[list[str]],
                images: dict[str, str]) -> None:  # fmt: skip
    import html

    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table)
    figures = "".join(f'<figure><img id="plot-{k}" alt="{k}" src="data:image/png;base64,{v}"></figure>'
                      for k, v in images.items())  # fmt: skip
    path.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>tunelab compare: {html.escape(title)}</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; max-width: 64rem; margin: 2rem auto; padding: 0 1rem; color: #222; }}
table {{ border-collapse: collapse; width: 100%; margin: 1rem 0; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.3rem 0.5rem; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
.rec {{ background: #f3f6fb; border-left: 4px solid #4a7bd0; padding: 0.6rem 1rem; }}
figure {{ display: inline-block; margin: 0.5rem; }} img {{ max-width: 30rem; }}
</style></head><body>
<h1>tunelab compare: {html.escape(title)}</h1>
<p class="muted">{html.escape(about)}</p>
<p class="rec" id="recommendation"><b>Recommendation.</b> {html.escape(text)}</p>
<table id="results"><thead><tr>{"".join(f"<th>{html.escape(h)}</th>" for h in header)}</tr></thead>
<tbody>{cells}</tbody></table>
{figures}
</body></html>
""")
