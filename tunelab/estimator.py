"""`tunelab estimate`: the peak memory and time per epoch of a config on this machine, before
training, for its own method and every other one.

How it works. The config, tokenizer, task and data splits load exactly as `tunelab train`
loads them (so bad input gives the same errors), and the first epoch's real batch plan is
built with the loop's own `length_batches`. Then, per method, a child process
(`python -m tunelab.estimator --probe`, so that its peak RSS is its own) loads the same data, builds the model with `run.build_model` and trains
through `loop.fit` on a few of the plan's steps, spread evenly over its sizes up to the
longest (the memory peak), each run 1 + REPEATS times (4). As in training, `fit` ends with a validation
pass, here on the longest validation rows at `train.eval_batch_size`. Then the child runs,
once each, the plan's steps that bring the matrix shapes the probe did not see (batch shapes,
and under the packed encoder its row counts; at most as many padded tokens as the probe's two
passes): the memory steps.

Time: the first pass is warm-up; each repeated pass fits its own
`time = a + b * padded tokens`, and the pass whose epoch is the median gives the line (a load
that comes and goes moves one pass, not the median; the passes' spread is reported beside it). The memory steps' time over that line is the one-time cost of a new shape (kernel
set-up) in a process already under way, and what the probe's first pass took beyond the line
and that cost is counted once (the warm-up, and the first touch of the memory the largest
batch needs: SmolLM2 SFT estimates had been 12-20% high in three of four benchmark runs
while it was charged to every shape; in one probe the largest step's first run was 1.3 s
over the line, and each of the epoch's 37 shapes was charged 0.25 s). The epoch is the sum
of the line over the plan's steps, plus the per-shape cost for each of its distinct shapes,
plus that once-only time, plus `freeze`'s one-time cache pass (timed on a sample of up to
1024 training rows and scaled by padded tokens). Without memory steps (a plan the probe
covers), the new-shape cost comes from the probe's own first pass.

Memory: the child's peak RSS (`VmHWM`) after the probe's steps plus what the epoch's other shapes
keep. Every distinct matrix shape leaves memory behind in the kernel library's primitive
cache and the allocator, which a real epoch accumulates and the few probe steps do not; the
memory steps measure it (what stays allocated after them, from glibc's `mallinfo2`), scaled
by tokens to the shapes beyond their budget. The time of a whole validation pass is the
probe's pass scaled by token count (approximate).

Why it is written by hand: no library estimates fine-tuning time and memory for a given
model, method, data and CPU, and FLOP or byte counts miss what dominates on a CPU (kernel
speed per shape, the allocator, Python overhead). Timing the real loop for a few steps and
extrapolating keeps the estimate honest, and because what is timed is `fit` itself, speed
changes in the loop show up here without any change to this file.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import dataclasses
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from tunelab import speed
from tunelab.config import Config, MethodName, batch_size, load_config, save_config
from tunelab.console import say as stderr_say
from tunelab.device import autocast, peak_rss_mb, pick_device, precision_name, resolve_precision
from tunelab.errors import ConfigError, TunelabError
from tunelab.loop import fit, length_batches
from tunelab.memory import plan_memory
from tunelab.methods import METHODS
from tunelab.models import count_params
from tunelab.run import build_model, load_inputs, process_settings, run_config
from tunelab.speed import PACK_ROWS, FrozenCache, cache_batches, cache_mb
from tunelab.speed.cache import CACHE_BUDGET_MB
from tunelab.tasks.base import padded_length

WARMUP_STEPS = 2  # run but left out of the fit: first-use allocations and set-up
REPEATS = 3  # timed passes over the probe's steps after the first; the epoch is their median
BUSY_SPREAD = 0.3  # a spread of the repeats' epochs beyond this share of the median: the machine was busy
MEMORY_BUDGET = 2.0  # memory steps: up to this many times the padded tokens of the probe's steps
CACHE_SAMPLE_ROWS = 1024  # freeze: training rows whose cache pass is timed, to scale to all


@dataclass
class Step:
    """One optimizer step of the epoch's plan."""

    rows: list[int]  # training rows, all micro-batches of the step
    tokens: int  # padded tokens the model processes in it
    shapes: list[tuple[int, ...]]  # the shape of each micro-batch
    real: list[int] = field(default_factory=list)  # the real (unpadded) tokens of each micro-batch

    def keys(self, packed: bool) -> set[tuple[int, ...]]:
        """The matrix shapes this step brings, one key per micro-batch: its batch shape, and
        under the packed encoder also its packed row count."""
        if not packed:
            return set(self.shapes)
        return {(*shape, -(-real // PACK_ROWS)) for shape, real in zip(self.shapes, self.real)}


@dataclass
class MethodEstimate:
    """The prediction for one method (or why it was skipped)."""

    method: str
    configured: bool
    steps_per_epoch: int
    trainable_params: int | None = None
    total_params: int | None = None
    epoch_s: float | None = None  # the first epoch, with the one-time warm-up: the repeats' median
    epoch_s_repeats: list[float] = field(default_factory=list)  # the epoch from each repeated pass alone
    epoch_s_low: float | None = None  # the spread: the least and most of `epoch_s_repeats`
    epoch_s_high: float | None = None
    epoch_spread: float | None = None  # (high - low) / median: over BUSY_SPREAD, the machine was busy
    eval_s: float | None = None  # one validation pass (approximate)
    peak_rss_mb: float | None = None
    peak_gpu_mb: float | None = None
    warmup_s: float | None = None  # one-time extra of the first steps, included in epoch_s
    setup_s: float | None = None  # one-time set-up (freeze's layer cache), included in epoch_s
    step_intercept_s: float | None = None  # step time = intercept + per_token * padded tokens
    step_per_token_s: float | None = None
    new_shape_s: float | None = None  # one-time extra for each new matrix shape
    shapes: int = 0  # the matrix shapes of the epoch (batch shapes; packed row counts too)
    timed_steps: int = 0  # probe steps after the warm-up
    memory_steps: int = 0  # further steps run once each, for the memory of the epoch's other shapes
    new_shapes_mb: float = 0.0  # memory those shapes keep (the memory steps', the rest extrapolated)
    probe_s: float | None = None  # wall time of the probe process
    skipped: str | None = None
    memory: dict[str, Any] | None = None  # the memory plan the probe trained with (as env.json records it)


@dataclass
class Estimate:
    """What `estimate` returns; `table()` is the CLI's text, `to_dict()` its `--json`."""

    model: str
    task: str
    method: str
    device: str
    threads: int
    precision: str
    train_rows: int
    validation_rows: int
    batch_size: int
    gradient_accumulation: int
    steps_per_epoch: int
    batch_shapes: int  # distinct batch shapes in the epoch
    longest_step_tokens: int
    probe_steps: int  # of the plan's steps, each run 1 + `repeats` times per method
    warmup_steps: int
    repeats: int = REPEATS  # timed passes over the probe steps after the first
    methods: list[MethodEstimate] = field(default_factory=list)

    @property
    def basis(self) -> str:
        return (f"per method, {self.probe_steps} of the epoch's steps (shortest to longest, "
                f"{self.longest_step_tokens:,} padded tokens) run {1 + self.repeats} times each through the training "
                f"loop on this machine, the first pass as warm-up, then once each the steps that bring the "
                f"epoch's other batch shapes (memory steps, at most as many padded tokens as two passes); "
                f"time per step = a + b x padded tokens, fitted on each of the {self.repeats} repeated passes and "
                f"summed over the epoch's {self.steps_per_epoch} steps (the median of the passes' epochs; their "
                f"spread, least to most, beside it), plus a one-time cost per matrix shape ({self.batch_shapes} batch "
                f"shapes in the epoch, and the packed encoder's row counts) timed on the memory steps, plus what "
                f"the first pass took beyond that (warm-up, first touch of the peak memory)"
                + ("; the frozen-layer cache's one-time pass, timed on a sample of the rows and scaled by tokens"
                   if any(m.setup_s for m in self.methods) else "")
                + "; peak RSS of each method's own process, a validation pass on the longest rows included, "
                "plus the memory the memory steps left allocated, scaled by tokens to the shapes beyond their "
                "budget; eval pass scaled from those rows by tokens (approximate)")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "basis": self.basis}

    def table(self) -> str:
        header = [
            "method",
            "trainable params",
            "time/epoch",
            "spread",
            "eval pass",
            "peak RSS",
            "steps/epoch",
        ]
        gpu = any(m.peak_gpu_mb is not None for m in self.methods)
        if gpu:
            header.insert(6, "peak GPU")
        rows, skipped = [], []
        for m in self.methods:
            name = ("* " if m.configured else "  ") + m.method
            if m.skipped is not None:
                skipped.append(f"{name:<10}  skipped: {m.skipped}")
                continue
            cells = [name, f"{m.trainable_params:,}", duration(m.epoch_s), spread(m), duration(m.eval_s),
                     f"{m.peak_rss_mb:,.0f} MB", str(m.steps_per_epoch)]  # fmt: skip
            if gpu:
                cells.insert(6, f"{m.peak_gpu_mb:,.0f} MB" if m.peak_gpu_mb is not None else "-")
            rows.append(cells)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                 for r in [header, *rows]]  # fmt: skip
        about = (f"{self.model} ({self.task}): {self.train_rows:,} training rows, {self.validation_rows:,} "
                 f"validation rows, batch {self.batch_size}"
                 + (f" x {self.gradient_accumulation} accumulated" if self.gradient_accumulation > 1 else "")
                 + f"; {self.device}, {self.threads} thread{'s' * (self.threads != 1)}, {self.precision}")  # fmt: skip
        plans = [m.memory["line"] for m in self.methods if m.configured and m.memory]
        return "\n".join(
            [about, *plans, "", *lines, *skipped, "", f"* the config's method. Basis: {self.basis}."]
        )


def spread(m: MethodEstimate) -> str:
    """The least and most of a method's per-pass epoch estimates, in the unit of the larger."""
    if m.epoch_s_low is None or m.epoch_s_high is None:
        return "-"
    low, high = duration(m.epoch_s_low), duration(m.epoch_s_high)
    unit = high.split()[-1]
    return f"{low.split()[0]}-{high}" if low.split()[-1] == unit else f"{low}-{high}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds >= 1 else f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


# ------------------------------------------------------------------------------ the plan


def row_tokens(example: dict[str, Any], decoder: bool) -> int:
    return len(example["input_ids"]) + (len(example["labels"]) if decoder else 0)


def batch_shape(examples: list[dict[str, Any]], decoder: bool, multiple: int = 1) -> tuple[int, ...]:
    """(rows, padded length) of a batch, plus the longest target for seq2seq's decoder."""
    shape = (len(examples), padded_length(max(len(e["input_ids"]) for e in examples), multiple))
    return shape + (max(len(e["labels"]) for e in examples),) if decoder else shape


def padded_tokens(shape: tuple[int, ...]) -> int:
    return shape[0] * sum(shape[1:])


def epoch_plan(train: list[dict[str, Any]], config: Config, multiple: int = 1) -> list[Step]:
    """The optimizer steps of the first epoch, batched as `fit` batches them (one process)."""
    lengths = [len(e["input_ids"]) for e in train]
    batches = length_batches(
        lengths, batch_size(config), random.Random(config.seed), config.train.length_bucketing
    )
    accumulation, decoder = config.train.gradient_accumulation, config.task == "seq2seq"
    groups = [batches[s : s + accumulation] for s in range(0, len(batches), accumulation)]
    steps = []
    for group in groups:
        shapes = [batch_shape([train[i] for i in b], decoder, multiple) for b in group]
        real = [sum(len(train[i]["input_ids"]) for i in b) for b in group]
        steps.append(Step([i for b in group for i in b], sum(map(padded_tokens, shapes)), shapes, real))
    return steps


def probe_steps(plan: list[Step], count: int) -> list[int]:
    """The plan's steps (indices) that `count` probe steps run: those at evenly spaced ranks of
    size, from the smallest to the longest (its memory peak), so the timing sees the whole
    range. A plan of `count` steps or fewer is used whole."""
    if len(plan) <= count:
        return list(range(len(plan)))
    by_size = sorted(range(len(plan)), key=lambda s: plan[s].tokens)
    if count == 1:
        return [by_size[-1]]
    return [by_size[round(q * (len(plan) - 1) / (count - 1))] for q in range(count)]


def probe_rows(plan: list[Step], count: int) -> list[int]:
    """The training rows of `probe_steps`."""
    return [i for s in probe_steps(plan, count) for i in plan[s].rows]


def memory_steps(plan: list[Step], probed: list[int], packed: bool, budget: float) -> dict[str, Any]:
    """Steps that bring the matrix shapes the probe's steps do not: in the plan's order, each
    step with a shape not seen before, as long as their padded tokens stay within `budget`.
    Every distinct shape costs the kernel library and the allocator memory that a real epoch
    keeps, so the probe runs these once; the growth of the shapes beyond the budget is
    extrapolated by their tokens. Returns {"rows", "steps", "tokens", "rest_tokens"}."""
    seen = set().union(*(plan[s].keys(packed) for s in probed))
    rows: list[int] = []
    steps = tokens = rest = 0
    for step in plan:
        keys = step.keys(packed)
        if keys <= seen:
            continue
        seen |= keys
        if tokens + step.tokens <= budget:
            rows += step.rows
            steps, tokens = steps + 1, tokens + step.tokens
        else:
            rest += step.tokens
    return {"rows": rows, "steps": steps, "tokens": tokens, "rest_tokens": rest}


def repeat_line(steps: list[list[float]]) -> tuple[float, float]:
    """The step-time line (a, b) of one pass of [padded tokens, seconds, new shapes] steps: fitted
    on the steps that brought no new shape, or on all of them where fewer than two did not."""
    repeated = [m for m in steps if not m[2]]
    if len(repeated) < 2:  # no repeats to separate the new-shape cost from: fit them all
        repeated = steps
    return fit_line([float(x) for x, _, _ in repeated], [t for _, t, _ in repeated])


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of y = a + b x, both kept >= 0; proportional when x barely varies."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx <= n * (0.01 * mx) ** 2:  # the steps are all the same size: no slope to fit
        return 0.0, my / mx if mx else 0.0
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    if b < 0:  # noise swamped the size effect
        return my, 0.0
    if my - b * mx < 0:
        return 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return my - b * mx, b


# ------------------------------------------------------------------------------ loading, probing


def time_cache_pass(model: Any, train: list[dict[str, Any]], task: Any, pad_id: int, config: Config,
                    device: Any) -> float | None:  # fmt: skip
    """freeze's one-time cache pass over all of `train`, predicted from timing the real pass
    (`FrozenCache.build`) on a random sample of up to CACHE_SAMPLE_ROWS rows, after a small
    warm-up pass, and scaling by padded tokens; None where no cache applies. (The probe's own
    pass covers only its few rows, spread over all lengths: too few and too padded to scale.)"""
    dtype, size = resolve_precision(config.train.precision, device), config.train.eval_batch_size
    rows = random.Random(config.seed).sample(range(len(train)), min(len(train), CACHE_SAMPLE_ROWS))
    sample = [train[i] for i in rows]

    def build(examples: list[dict[str, Any]]) -> Any:
        return FrozenCache.build(
            model, examples, task.collate, pad_id, size, device, lambda: autocast(device, dtype)
        )

    def pass_tokens(examples: list[dict[str, Any]]) -> int:
        lengths = [len(e["input_ids"]) for e in examples]
        return sum(padded_length(max(lengths[i] for i in b), task.pad_multiple) * len(b)
                   for b in cache_batches(lengths, size))  # fmt: skip

    warm = build(sample[:8])
    if warm is None:
        return None
    warm.close()
    if cache_mb(sum(len(e["input_ids"]) for e in train), warm.table.shape[1]) > CACHE_BUDGET_MB:
        return None  # too large: the run trains without the cache
    began = time.perf_counter()
    build(sample).close()
    return (time.perf_counter() - began) * pass_tokens(train) / pass_tokens(sample)


def probe(spec: dict[str, Any]) -> dict[str, Any]:
    """In the child process: build the method's model, run the probe steps through `fit`, then
    the memory steps (`memory_steps`), and return each probe step's (padded tokens, seconds, new
    batch shapes), the eval pass time, the peak memory and the memory steps' growth."""
    import tqdm.auto  # noqa: F401  (the loop imports it before its clock starts; so do we)

    config = load_config(spec["config"])
    model_path, tokenizer, task, splits = load_inputs(config)
    if len(splits.train) != spec["train_rows"]:
        raise RuntimeError(
            f"the probe read {len(splits.train)} training rows, the estimate {spec['train_rows']}"
        )
    method = METHODS[config.method]
    model = build_model(config, task, method, model_path, tokenizer)
    trainable, total = count_params(model)
    device = pick_device()
    # the memory plan training would make (checkpointing, micro-batches): the probe trains with it
    plan = plan_memory(model, task, splits.train, config, tokenizer.pad_token_id, device,
                       resolve_precision(config.train.precision, device))  # fmt: skip

    decoder, collate = config.task == "seq2seq", task.collate
    pending: list[tuple[int, ...]] = []  # shapes collated since the last step: the next step's
    seen: set[tuple[int, ...]] = set()
    marks: list[tuple[float, int, int]] = []

    def recording_collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        pending.append(batch_shape(examples, decoder, task.pad_multiple))
        return collate(examples, pad_id)

    def log(entry: dict[str, Any]) -> None:  # called after every step (log_steps=1)
        if "split" not in entry:  # not the validation line
            new = len(set(pending) - seen)
            seen.update(pending)
            marks.append((time.perf_counter(), sum(map(padded_tokens, pending)), new))
            pending.clear()

    def timed(began: float) -> list[list[float]]:
        """The steps logged since `began`, as [padded tokens, seconds, new shapes]."""
        starts = [began] + [t for t, _, _ in marks[:-1]]
        return [[tokens, t - start, new] for (t, tokens, new), start in zip(marks, starts)]

    task.collate = recording_collate
    probe_config = copy.deepcopy(config)
    tc = probe_config.train
    tc.max_steps, tc.log_steps, tc.max_minutes, tc.progress_bar = spec["steps"], 1, None, False
    tc.eval_each_epoch, tc.eval_steps, tc.early_stopping_patience = False, None, None
    lr = config.train.learning_rate or method.DEFAULT_LR
    validation = [splits.validation[i] for i in spec["validation_rows"]]
    cache_s = None
    if method.CACHEABLE_FROZEN_LAYERS and tc.cache_frozen_layers and not task.generative:
        cache_s = time_cache_pass(model, splits.train, task, tokenizer.pad_token_id, config, device)
        # the run builds no cache where it would not fit (or apply) over the whole training set:
        # neither may the probe over its few rows
        tc.cache_frozen_layers = cache_s is not None
    # a full garbage collection now, not inside a timed step: set-up leaves hundreds of thousands
    # of Python objects, and one automatic pass over them takes 0.1-0.3 s (in training, these
    # passes come before the loop starts)
    gc.collect()
    began = time.perf_counter()
    result = fit(model, task, [splits.train[i] for i in spec["rows"]], validation, probe_config, lr,
                 tokenizer.pad_token_id, log, device, micro_batch_tokens=plan.micro_batch_tokens,
                 trim_memory=plan.trim_steps)  # fmt: skip
    steps = timed(began)
    # then one step of each batch shape the epoch has and the probe did not (their memory)
    packed = speed.report_for(model).has(speed.PACKED)
    memory = spec["memory"]["packed" if packed else "plain"]
    before, before_peak, memory_cache_mb = allocated_mb(), peak_rss_mb(), 0.0
    marks.clear()
    pending.clear()  # the validation pass's batches
    if memory["steps"]:
        tc.max_steps = memory["steps"]
        began = time.perf_counter()
        done = fit(model, task, [splits.train[i] for i in memory["rows"]], [], probe_config, lr,
                   tokenizer.pad_token_id, log, device, micro_batch_tokens=plan.micro_batch_tokens,
                 trim_memory=plan.trim_steps)  # fmt: skip
        memory_cache_mb = done.cache_mb
    task.collate = collate
    after = allocated_mb()
    growth = after - before if after is not None and before is not None else peak_rss_mb() - before_peak
    return {
        "steps": steps,
        "eval_s": result.eval_s,
        "setup_s": result.setup_s,
        "cache_s": cache_s,
        "cache_mb": result.cache_mb,
        "packed": packed,
        "memory_steps": memory["steps"],
        "memory_step_times": timed(began) if memory["steps"] else [],
        "memory_tokens": memory["tokens"],
        "memory_rest_tokens": memory["rest_tokens"],
        "memory_growth_mb": growth,
        "probe_peak_rss_mb": before_peak,
        "memory_cache_mb": memory_cache_mb,
        "probe_rows": len(spec["rows"]),
        "pass_steps": spec.get("pass_steps"),
        "train_rows": spec["train_rows"],
        "trainable_params": trainable,
        "total_params": total,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
        "memory": plan.as_dict(),
    }


def allocated_mb() -> float | None:
    """Memory that malloc has handed out and not yet been given back (glibc's `mallinfo2`: heap
    and mmapped blocks, every arena), in MB; None where the C library does not say."""

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                          "fsmblks", "uordblks", "fordblks", "keepcost")]  # fmt: skip

    try:
        mallinfo2 = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def run_probe(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run `probe` in a fresh Python process; its result, {"error": ...} for a TunelabError,
    or {"crash": output} when it failed otherwise."""
    name = spec["method"]
    spec = {**spec, "out": str(folder / f"{name}.result.json")}
    (folder / f"{name}.json").write_text(json.dumps(spec))
    log = folder / f"{name}.log"
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    began = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "tunelab.estimator", "--probe", str(folder / f"{name}.json")],
                              stdout=f, stderr=subprocess.STDOUT, env=env)  # fmt: skip
    out = Path(spec["out"])
    if out.is_file():
        return {**json.loads(out.read_text()), "probe_s": time.perf_counter() - began}
    return {"crash": log.read_text() or f"(no output; exit status {done.returncode})"}


# ------------------------------------------------------------------------------ the estimate


def chosen_methods(methods: str | list[str] | None, configured: str) -> list[str]:
    """The methods to estimate: the configured one first, then the others in the usual order."""
    names = list(METHODS) if methods is None else methods.split(",") if isinstance(methods, str) else methods
    names = [m.strip() for m in names if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        hint = " ('none' trains nothing: there is nothing to estimate)" if "none" in unknown else ""
        raise ConfigError(f"--methods: {'unknown ' + ', '.join(unknown) if unknown else 'none given'}{hint}; "
                          f"choose from {', '.join(METHODS)}")  # fmt: skip
    return [configured] + [m for m in METHODS if m in names and m != configured]


def estimate(
    config: Config | str | Path | None = None,
    *,
    overrides: list[str] | None = None,
    methods: str | list[str] | None = None,
    steps: int = 6,
    say: Callable[[str], None] | None = None,
    **kwargs: Any,
) -> Estimate:
    """Predict peak memory and time per epoch of training `config` on this machine, for its
    method and the others in `methods` (names, or one comma-separated string; default: all;
    the configured one always comes first).

    `config`, `overrides` and kwargs are as for `train`. `steps`: how many of the epoch's
    steps each method runs (1 + REPEATS times each). `say` receives progress lines (default: stderr).
    Raises TunelabError for bad options, config or data (as `train` does) and when the
    configured method cannot train; other methods that cannot are skipped, with the reason.
    """
    say = say or stderr_say
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"--steps must be an integer >= 1, got {steps!r}")
    config = run_config(config, overrides, None, kwargs)
    if config.data.streaming:  # (its train rows are read only as training goes)
        raise ConfigError("tunelab estimate measures an epoch of the whole train file, which data.streaming does "
                          "not read first; estimate with data.streaming=false on a part of the file")  # fmt: skip
    order = chosen_methods(methods, config.method)
    _, _, task, splits = load_inputs(config)
    device = pick_device()
    dtype = resolve_precision(config.train.precision, device)
    plan = epoch_plan(splits.train, config, task.pad_multiple)
    decoder = config.task == "seq2seq"
    validation = sorted(
        range(len(splits.validation)), key=lambda i: -row_tokens(splits.validation[i], decoder)
    )
    validation = validation[: config.train.eval_batch_size]  # the longest rows: the pass's memory peak
    eval_scale = sum(row_tokens(e, decoder) for e in splits.validation) / max(
        1, sum(row_tokens(splits.validation[i], decoder) for i in validation))  # fmt: skip
    probed = probe_steps(plan, steps)
    result = Estimate(model=config.model, task=config.task, method=config.method, device=str(device),
                      threads=config.train.num_threads or torch.get_num_threads(),
                      precision=precision_name(dtype), train_rows=len(splits.train), validation_rows=len(splits.validation),
                      batch_size=batch_size(config), gradient_accumulation=config.train.gradient_accumulation,
                      steps_per_epoch=len(plan), batch_shapes=len({b for s in plan for b in s.shapes}),
                      longest_step_tokens=max(s.tokens for s in plan), probe_steps=len(probed),
                      warmup_steps=min(WARMUP_STEPS, (1 + REPEATS) * len(probed) - 1))  # fmt: skip
    budget = MEMORY_BUDGET * sum(plan[s].tokens for s in probed)
    spec = {"rows": probe_rows(plan, steps), "validation_rows": validation,
            "train_rows": len(splits.train), "steps": (1 + REPEATS) * len(probed), "pass_steps": len(probed),
            "memory": {kind: memory_steps(plan, probed, kind == "packed", budget) for kind in ("packed", "plain")}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tunelab-estimate-") as tmp:
        for k, method in enumerate(order):
            say(f"estimate: {method} ({k + 1}/{len(order)}): {spec['steps']} steps in a fresh process")
            path = Path(tmp) / f"{method}.yaml"
            save_config(dataclasses.replace(copy.deepcopy(config), method=cast(MethodName, method)), path)
            outcome = run_probe({**spec, "method": method, "config": str(path)}, Path(tmp))
            row = MethodEstimate(method, method == config.method, len(plan))
            if "crash" in outcome and row.configured:  # a bug, not a user's mistake: keep the traceback
                raise RuntimeError(f"the estimate's probe of {method} failed:\n{outcome['crash']}")
            if "error" in outcome or "crash" in outcome:
                reason = outcome.get("error") or outcome["crash"].strip().splitlines()[-1]
                if row.configured:
                    raise TunelabError(reason)
                row.skipped = reason
                say(f"estimate: {method} skipped: {reason}")
            else:
                predict(row, outcome, plan, eval_scale)
                if (row.epoch_spread or 0.0) > BUSY_SPREAD:
                    say(f"estimate: {method}'s repeated timings spread {duration(row.epoch_s_low)} to "
                        f"{duration(row.epoch_s_high)}: the machine is busy; estimate again when it is idle")  # fmt: skip
            result.methods.append(row)
    return result


def predict(row: MethodEstimate, outcome: dict[str, Any], plan: list[Step], eval_scale: float) -> None:
    """Fill `row` from a probe's measurements (steps of [padded tokens, seconds, new shapes]):
    the step-time line fitted on repeated shapes, the one-time cost of a new shape, the
    warm-up's extra time; then the epoch, the eval pass and the memory."""
    measured = outcome["steps"]
    warm = min(WARMUP_STEPS, len(measured) - 1)  # keep at least one step to fit
    timed = measured[warm:]
    # one line per repeated pass over the probe's steps, so that a load that came and went shows
    # as a spread; the pass whose epoch is the median gives the line used below
    per_pass = outcome.get("pass_steps") or max(1, len(measured) // 2)
    lines = [repeat_line(measured[k : k + per_pass]) for k in range(per_pass, len(measured), per_pass)]
    if not lines:  # a single pass: fit what there is after the warm-up
        lines = [repeat_line(timed)]
    line_epochs = [sum(la + lb * step.tokens for step in plan) for la, lb in lines]
    a, b = lines[sorted(range(len(lines)), key=line_epochs.__getitem__)[(len(lines) - 1) // 2]]
    repeated = [m for m in timed if not m[2]]
    if len(repeated) < 2:
        repeated = timed
    # the probe's own one-time set-up (freeze's cache of its few rows) ran inside its first step
    probe_setup = outcome.get("setup_s", 0.0)
    later = outcome.get("memory_step_times", [])[1:]  # the first memory step also starts its loop
    if len(later) >= 2:
        # each memory step brings a matrix shape the probe did not run (one, nearly always):
        # its time over the line is what a new shape costs in a process already under way
        new_shape = max(0.0, statistics.fmean(t - a - b * x for x, t, _ in later))
        shapes = len({key for step in plan for key in step.keys(outcome.get("packed", False))})
        # what the probe's first pass took beyond the line and its shapes happens once a run:
        # the warm-up, and the first touch of the memory that the largest batch needs
        first = measured[:per_pass]
        warmup = max(0.0, sum(t - a - b * x for x, t, _ in first) - new_shape * len(first) - probe_setup)
    else:  # no memory steps: the new shapes' cost from the probe's own first pass
        fresh = [m for m in timed if m[2]] if repeated is not timed else []
        new_shape = max(0.0, sum(t - a - b * x for x, t, _ in fresh) / max(1, sum(n for _, _, n in fresh)))
        warmup = max(0.0, sum(t - a - b * x - new_shape * n for x, t, n in measured[:warm]) - probe_setup)
        shapes = len({shape for step in plan for shape in step.shapes})
    row.step_intercept_s, row.step_per_token_s, row.new_shape_s, row.warmup_s = a, b, new_shape, warmup
    row.shapes = shapes
    # set-up that grows with the training rows: the cache pass timed on a sample and scaled
    # (`time_cache_pass`), else the probe's own scaled by rows
    scale = outcome.get("train_rows", 1) / max(1, outcome.get("probe_rows", 1)) - 1
    row.setup_s = outcome["cache_s"] if outcome.get("cache_s") is not None else probe_setup * (scale + 1)
    once = new_shape * shapes + warmup + row.setup_s
    row.epoch_s = sum(a + b * step.tokens for step in plan) + once
    row.epoch_s_repeats = [epoch + once for epoch in line_epochs]
    row.epoch_s_low, row.epoch_s_high = min(row.epoch_s_repeats), max(row.epoch_s_repeats)
    row.epoch_spread = (row.epoch_s_high - row.epoch_s_low) / row.epoch_s if row.epoch_s > 0 else 0.0
    row.timed_steps = len(timed)
    row.eval_s = outcome["eval_s"] * eval_scale
    row.trainable_params, row.total_params = outcome["trainable_params"], outcome["total_params"]
    # the memory that the epoch's other batch shapes keep: what the memory steps left allocated,
    # scaled up by tokens to the shapes beyond their budget; it adds to the probe's peak
    tokens, rest = outcome.get("memory_tokens", 0), outcome.get("memory_rest_tokens", 0)
    row.memory_steps = outcome.get("memory_steps", 0)
    row.new_shapes_mb = (
        max(0.0, outcome.get("memory_growth_mb", 0.0)) * (tokens + rest) / tokens if tokens else 0.0
    )
    # freeze: the whole training set's cache in place of the probe's own (scaled by rows)
    cache, memory_cache = outcome.get("cache_mb", 0.0), outcome.get("memory_cache_mb", 0.0)
    probe_peak = outcome.get("probe_peak_rss_mb", outcome["peak_rss_mb"])
    row.peak_rss_mb = max(
        probe_peak - cache + row.new_shapes_mb, outcome["peak_rss_mb"] - memory_cache
    ) + cache * (scale + 1)
    row.peak_gpu_mb = outcome["peak_gpu_mb"]
    row.memory = outcome.get("memory")
    row.probe_s = outcome["probe_s"]


def main(argv: list[str] | None = None) -> int:
    """`python -m tunelab.estimator --probe SPEC.json`: the child process of `estimate`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "--probe":
        print(
            "usage: python -m tunelab.estimator --probe SPEC.json (run by tunelab estimate)", file=sys.stderr
        )
        return 2
    spec = json.loads(Path(args[1]).read_text())

    try:
        with process_settings(load_config(spec["config"])):  # the threads and determinism training uses
            result = probe(spec)
    except TunelabError as e:
        result = {"error": str(e)}
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
