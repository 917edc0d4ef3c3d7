"""The training loop: one plain PyTorch loop, read top to bottom in `fit`.

It owns batching (length buckets), the optimizer and schedule, mixed precision, gradient
accumulation and clipping, periodic evaluation, best-model selection, early stopping and
resumable checkpoints. `fit` reads like a recipe: it calls `train_step`, `evaluate`,
`save_checkpoint` and `should_stop`, plain functions over a `Loop` (what every step uses) and a
`FitResult` (the counters, which checkpoints save). Tasks supply the loss and metrics; methods
decide which parameters train; neither is ever named here: they declare what they can do.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from tqdm.auto import tqdm

from tunelab.checkpoint import crash_point, is_sharded, load_checkpoint, save_sharded_checkpoint
from tunelab.checkpoint import save_checkpoint as write_checkpoint
from tunelab.config import Config, batch_size
from tunelab.console import say
from tunelab.device import autocast, pick_device, resolve_precision, to_device, trim
from tunelab.dist import Dist, all_reduce_sum, broadcast_flag, reshard, shard_model
from tunelab.errors import ConfigError, Interrupted
from tunelab.methods import METHODS
from tunelab.metrics import higher_is_better
from tunelab.speed import FrozenCache, cache_mb, release_copied_weights, report_for
from tunelab.tasks.base import Task, padded_length
from tunelab.token_cache import row_lengths


def length_batches(
    lengths: list[int], batch_size: int, rng: random.Random, bucketing: bool
) -> list[list[int]]:
    """Indices grouped into batches. With bucketing: shuffle, sort by length inside windows of
    50 batches, cut into batches, then shuffle the batches, so each batch holds rows of similar
    length (little padding) while the order across batches stays random."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if bucketing:
        window = batch_size * 50
        order = [
            i
            for s in range(0, len(order), window)
            for i in sorted(order[s : s + window], key=lambda j: lengths[j])
        ]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if bucketing:
        rng.shuffle(batches)
    return batches


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on weight matrices only: biases, norms and other 1-d parameters are exempt."""
    decay: list[torch.nn.Parameter] = []
    exempt: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (exempt if p.ndim < 2 or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": exempt, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, config: Config, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, config.train.weight_decay)
    if config.train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def make_schedule(optimizer: torch.optim.Optimizer, kind: str, warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class BatchSource(Protocol):
    """Where `fit` takes its steps from with `data.streaming` (tunelab.stream.StreamSource)."""

    pass_done: bool  # the last `steps()` ended because the pass over the data did

    @property
    def fraction(self) -> float:
        """How far into the current pass, 0 to 1."""
        ...

    def steps(self) -> Iterator[tuple[list[dict[str, Any]], list[list[int]], list[list[int]], list[int]]]:
        """The rest of the pass: (rows, this process's micro-batches into them, the global
        micro-batches into `lengths`, lengths)."""
        ...

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class FitResult:
    """Progress and outcome of `fit`; also the resumable counters saved in checkpoints."""

    steps: int = 0
    epochs: float = 0.0
    runtime_s: float = 0.0
    samples: int = 0
    tokens: int = 0
    padded_tokens: int = 0  # batch rows x longest row: what the model actually processed
    eval_s: float = 0.0  # time spent evaluating inside training (left out of the rates)
    setup_s: float = 0.0  # one-time work before the first step (the frozen-layer cache)
    cache_mb: float = 0.0  # memory the frozen-layer cache holds
    best_metric: float | None = None
    best_step: int | None = None
    stopped_early: bool = False
    epoch_index: int = 0  # epochs begun
    step_in_epoch: int = 0  # optimizer steps done inside the current epoch
    evals_without_gain: int = 0
    last_eval_step: int = -1
    logged: int = 0  # metrics.jsonl lines written so far: a resume keeps exactly these

    def summary(self) -> dict[str, Any]:
        train_s = max(self.runtime_s - self.eval_s, 1e-9)
        return {
            "steps": self.steps,
            "epochs": round(self.epochs, 4),
            "runtime_s": round(self.runtime_s, 3),
            "eval_s": round(self.eval_s, 3),
            "setup_s": round(self.setup_s, 3),
            "cache_mb": self.cache_mb,
            "samples_per_s": round(self.samples / train_s, 3),
            "tokens_per_s": round(self.tokens / train_s, 1),
            "padding_fraction": round(1 - self.tokens / max(self.padded_tokens, 1), 4),
            "best_step": self.best_step,
            "best_metric": self.best_metric,
            "stopped_early": self.stopped_early,
        }


@dataclass
class Loop:
    """What every step of one `fit` call works with, built once by `prepare`."""

    model: torch.nn.Module  # the model itself: evaluation and checkpoints see it
    forward: torch.nn.Module  # what training steps call: the model, or its DDP wrapper
    task: Task
    config: Config
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    dtype: torch.dtype | None
    dist: Dist
    fsdp: bool
    pad_id: int
    metric: str
    higher_is_better: bool
    log: Callable[[dict[str, Any]], None]
    checkpoint_dir: Path | None
    rng: random.Random  # the data order
    total_steps: int
    steps_per_epoch: int
    global_batch: int
    micro_batch: int  # the most rows one process runs at once (`train.batch_size`)
    trainable: list[torch.nn.Parameter] = field(default_factory=list)
    cache: FrozenCache | None = None
    setup_s: float = 0.0  # building the cache: training time, though before the first step
    best_state: dict[str, torch.Tensor] | None = None
    epoch_rng_state: Any = None  # the data-order RNG as it was when the current epoch began
    progress: Any = None
    micro_tokens: int | None = None  # the memory plan's token budget per micro-batch (None: whole batches)
    trim_memory: bool = False  # the memory plan's: freed memory handed back to the system after each step
    stream: BatchSource | None = None  # data.streaming: where the steps come from


@dataclass
class Window:
    """Training loss and throughput since the last log line."""

    loss: Any = 0.0  # a tensor while summing: read only when logged (no per-step sync)
    units: float = 0.0
    samples: int = 0
    began: float = field(default_factory=time.perf_counter)


def fit(
    model: torch.nn.Module,
    task: Task,
    train: list[dict[str, Any]],
    validation: list[dict[str, Any]],
    config: Config,
    lr: float,
    pad_id: int,
    log: Callable[[dict[str, Any]], None],
    device: torch.device | None = None,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    dist: Dist | None = None,
    micro_batch_tokens: int | None = None,
    stream: BatchSource | None = None,
    trim_memory: bool = False,
) -> FitResult:
    """Train `model` in place on `train`; keep the weights that scored best on `validation`.

    `log` receives one dict per logging or evaluation step (the metrics.jsonl lines).
    With `checkpoint_dir`, resumable checkpoints are written every `train.checkpoint_steps`
    steps, at each epoch end and on SIGTERM/SIGINT (then `Interrupted` is raised);
    `resume_from` continues exactly from one. Under torchrun (`dist`), each process trains on
    its share of every global batch and only rank 0 evaluates. With `micro_batch_tokens` (the
    memory plan's), each batch runs as micro-batches of at most that many padded tokens, and
    with `trim_memory` (also the plan's) the memory the C allocator keeps after each step's
    frees goes back to the system, so one step's batch shapes do not add to the next's. With
    `stream` (`data.streaming`), the steps come from it instead of from `train`, a pass over the
    file is an epoch, and checkpoints record its position.
    """
    tc = config.train
    resumed = resumed_batch(resume_from, config, dist) if resume_from is not None else None
    loop = prepare(model, task, train, config, lr, pad_id, log, device, checkpoint_dir, dist, resumed)
    loop.micro_tokens, loop.trim_memory = micro_batch_tokens, trim_memory
    loop.stream = stream
    state = restore(loop, resume_from) if resume_from is not None else FitResult()

    def counted(entry: dict[str, Any]) -> None:
        state.logged += 1
        log(entry)

    loop.log = counted
    if loop.cache is not None:
        state.setup_s = round(state.setup_s + loop.setup_s, 3)
        state.cache_mb = round(cache_mb(*loop.cache.table.shape), 1)
    lengths = row_lengths(train)  # the Arrow length column where the rows are cached: no row is read
    loop.progress = _progress(loop.total_steps, tc.progress_bar and loop.dist.is_main, initial=state.steps)
    window = Window()
    model.train()
    start = time.perf_counter() - state.runtime_s - loop.setup_s
    stop = state.steps >= loop.total_steps
    released = False
    with _StopSignal() as signals:
        while not stop:
            loop.epoch_rng_state = loop.rng.getstate()
            if stream is None:
                batches = length_batches(lengths, loop.global_batch, loop.rng, tc.length_bucketing)
                groups = [batches[s : s + tc.gradient_accumulation]
                          for s in range(0, len(batches), tc.gradient_accumulation)]  # fmt: skip
            # (rows, this process's micro-batches, the global ones the counters read, their lengths)
            steps = stream.steps() if stream else ((train, g, g, lengths) for g in groups[state.step_in_epoch:])  # fmt: skip
            for rows, group, counts, step_lengths in steps:
                units, loss = train_step(loop, rows, group)
                if not released:  # the weight copies exist now: their float32 originals may go
                    release_copied_weights(model)
                    released = True
                count_step(state, window, counts, step_lengths, units, loss, task.pad_multiple)
                loop.progress.update(1)
                crash_point("train-step")  # test hook: a process dying mid-training
                epoch = state.epoch_index + (stream.fraction if stream else
                                             min(1.0, state.step_in_epoch / loop.steps_per_epoch))  # fmt: skip
                if state.steps % tc.log_steps == 0 or state.steps == loop.total_steps:
                    log_window(loop, state, window, epoch)
                evaluated = False
                if tc.eval_steps and state.steps % tc.eval_steps == 0 and state.steps < loop.total_steps:
                    evaluated = evaluate(loop, state, validation, epoch)
                state.runtime_s = time.perf_counter() - start
                if (
                    tc.checkpoint_steps
                    and state.steps % tc.checkpoint_steps == 0
                    and state.steps < loop.total_steps
                ):
                    save_checkpoint(loop, state)
                if broadcast_flag(signals.received is not None, loop.dist):
                    saved = save_checkpoint(loop, state)
                    loop.progress.close()
                    raise Interrupted(f"stopped at step {state.steps}"
                                      + (f"; checkpoint saved in {saved}" if saved else ""))  # fmt: skip
                stop = should_stop(loop, state, patience_spent=evaluated)
                if stop:
                    break
            if stream.pass_done if stream else state.step_in_epoch == len(groups):  # the epoch is done
                state.epoch_index, state.step_in_epoch = state.epoch_index + 1, 0
            state.epochs = state.epoch_index + stream.fraction if stream else min(
                state.steps / loop.steps_per_epoch, state.epoch_index + (state.step_in_epoch > 0)
            )  # fmt: skip
            finished_epoch = state.step_in_epoch == 0
            # every run ends on an evaluation, and so does every epoch when eval_each_epoch is on
            if (tc.eval_each_epoch and finished_epoch or stop) and state.last_eval_step != state.steps:
                stop = evaluate(loop, state, validation, state.epochs) or stop
            state.stopped_early = stop and state.steps < loop.total_steps
            state.runtime_s = time.perf_counter() - start
            if finished_epoch and not stop:
                save_checkpoint(loop, state)
    loop.progress.close()
    if loop.cache is not None:
        loop.cache.close()
    state.runtime_s = time.perf_counter() - start
    if loop.best_state is not None:
        keep_best(loop)
    return state


def prepare(model: torch.nn.Module, task: Task, train: list[dict[str, Any]], config: Config, lr: float,
            pad_id: int, log: Callable[[dict[str, Any]], None], device: torch.device | None,
            checkpoint_dir: Path | None, dist: Dist | None, global_batch: int | None = None) -> Loop:  # fmt: skip
    """Everything `fit` needs before its first step: device and precision, the step counts,
    optimizer and schedule, FSDP or DDP, and the frozen-layer cache where it applies."""
    tc = config.train
    dist = dist or Dist()
    device = device or pick_device()
    dtype = resolve_precision(tc.precision, device)
    if tc.precision == "auto" and dist.active:  # rank 0's timing decides, so every process computes alike
        dtype = torch.bfloat16 if broadcast_flag(dtype is not None, dist) else None
    metric = task.default_metric if tc.metric_for_best == "auto" else tc.metric_for_best
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    # a global batch is batch_size x world size examples; each process takes its share
    # (a resumed run keeps its checkpoint's global batch, whatever the world size now)
    global_batch = global_batch or batch_size(config) * dist.world
    steps_per_epoch = math.ceil(math.ceil(len(train) / global_batch) / tc.gradient_accumulation)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    if not getattr(model, "is_loaded_in_4bit", False):  # a 4-bit base (QLoRA) was loaded onto its GPU
        model.to(device)
    fsdp = dist.active and tc.distributed == "fsdp"
    if fsdp:
        shard_model(model)
    optimizer = make_optimizer(model, config, lr)
    schedule = make_schedule(optimizer, tc.schedule, math.ceil(tc.warmup_ratio * total_steps), total_steps)
    loop = Loop(
        model=model, forward=model, task=task, config=config, optimizer=optimizer, schedule=schedule,
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), device=device, dtype=dtype,
        dist=dist, fsdp=fsdp, pad_id=pad_id, metric=metric, higher_is_better=higher_is_better(metric), log=log,
        checkpoint_dir=checkpoint_dir, rng=rng, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        global_batch=global_batch, micro_batch=batch_size(config), trainable=[p for p in model.parameters() if p.requires_grad],
    )  # fmt: skip
    # the cache is part of the CPU speed layer: on a GPU the model's own code runs
    off_cpu = None if device.type == "cpu" else "not training on a CPU"
    refusal = frozen_cache_refusal(config, task, fsdp) or off_cpu
    if refusal:
        report_for(model).note_cache(False, refusal)
    else:
        began = time.perf_counter()  # counted as training time
        loop.cache = FrozenCache.build(model, train, task.collate, pad_id, tc.eval_batch_size, device,
                                       lambda: autocast(device, dtype))  # fmt: skip
        loop.setup_s = time.perf_counter() - began
    if dist.active and not fsdp:
        loop.forward = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return loop


def frozen_cache_refusal(config: Config, task: Task, fsdp: bool) -> str | None:
    """Why the frozen lower layers' outputs are not computed once instead of every step, or
    None where they may be: the setting is on, the method declares that its frozen layers can
    be cached, and the task reads one forward pass (not generation); not under FSDP, whose
    shards hold the layers. (The cache itself may still decline; it says why in the report.)"""
    if not config.train.cache_frozen_layers:
        return "off (train.cache_frozen_layers=false)"
    if not METHODS[config.method].CACHEABLE_FROZEN_LAYERS:
        return f"method {config.method} trains or changes the lower layers"
    if task.generative:
        return "generation runs the whole model"
    if task.fresh_inputs:
        return f"the {task.name} task draws new inputs every epoch (masking)"
    if fsdp:
        return "FSDP shards hold the layers"
    if config.data.streaming:
        return "data.streaming reads the rows as it trains"
    return None


def restore(loop: Loop, checkpoint: Path) -> FitResult:
    """Load a checkpoint into the model, optimizer, schedule, scaler and data-order RNG, and
    return its counters."""
    state, loop.best_state = load_checkpoint(checkpoint, loop.model, loop.optimizer, loop.schedule, loop.scaler,
                                             loop.rng, loop.fsdp)  # fmt: skip
    world = state.get("world", 1)
    if world != loop.dist.world and loop.dist.is_main:
        per_process = math.ceil(loop.global_batch / loop.dist.world)
        say(f"resharding {checkpoint.name}: saved by {world} process(es), resumed on {loop.dist.world}; the "
            f"global batch stays {loop.global_batch} ({per_process} per process, in micro-batches of at most "
            f"{loop.micro_batch}), so the data order is the same; float rounding, and dropout masks, differ")  # fmt: skip
    if loop.stream is not None:
        loop.stream.load_state_dict(state["stream"])
    return FitResult(**state["result"])


def resumed_batch(checkpoint: Path, config: Config, dist: Dist | None) -> int:
    """The global batch a run resumed from `checkpoint` keeps (the data order and the step count
    depend on it). A sharded (FSDP) checkpoint resumes on any number of processes; any other
    only on the number that wrote it."""
    state = json.loads((checkpoint / "state.json").read_text())
    world, now = state.get("world", 1), (dist or Dist()).world
    if world != now and not is_sharded(checkpoint):
        raise ConfigError(f"{checkpoint} was saved by {world} process(es) without FSDP; resume it with the "
                          f"same number (only train.distributed=fsdp checkpoints reshard)")  # fmt: skip
    return int(state.get("global_batch") or batch_size(config) * world)


def train_step(loop: Loop, train: list[dict[str, Any]], group: list[list[int]]) -> tuple[float, torch.Tensor]:
    """One optimizer step over `group` (the global batches of one accumulated step); returns
    the loss units of the whole global step and this process's summed loss."""
    # Normalise by the examples (or tokens) of the whole accumulated global step, so that
    # accumulation 4 x batch 1, or 2 processes x batch 8, give the same update as one batch of 16.
    # a share larger than train.batch_size (a run resumed on fewer processes than it began
    # with) runs as several micro-batches: the sums, and so the update, are the same
    size = loop.micro_batch
    # (a stream's micro-batches hold this process's own rows already)
    shares = [idx if loop.stream else share(idx, loop.dist) for idx in group]
    mine = [part for idx in shares for s in range(0, len(idx), size) if (part := idx[s : s + size])]
    if loop.micro_tokens:  # the memory plan's token budget: smaller micro-batches, the same sums
        budget, multiple = loop.micro_tokens, loop.task.pad_multiple
        mine = [part for idx in mine for part in token_batches(idx, train, budget, multiple)]
    collated = [loop.task.collate([train[i] for i in idx], loop.pad_id) for idx in mine]
    units = all_reduce_sum([float(sum(loop.task.units(b) for b in collated))], loop.dist)[0]
    total: Any = 0.0
    for n, batch in enumerate(collated):
        # DDP syncs gradients on the last micro-batch only
        sync = n == len(collated) - 1 or not loop.dist.active or loop.fsdp
        frozen = loop.cache.batch(mine[n], batch["input_ids"].shape[1]) if loop.cache else nullcontext()
        ddp = cast(torch.nn.parallel.DistributedDataParallel, loop.forward)  # when not syncing, DDP wraps it
        with nullcontext() if sync else ddp.no_sync(), autocast(loop.device, loop.dtype), frozen:
            loss_sum = loop.task.loss(loop.forward, to_device(batch, loop.device))
        # DDP averages gradients over processes: scale back up to a global sum
        loop.scaler.scale(loss_sum * loop.dist.world / units).backward()
        total = total + loss_sum.detach()
    if loop.config.train.max_grad_norm is not None:
        loop.scaler.unscale_(loop.optimizer)
        torch.nn.utils.clip_grad_norm_(loop.trainable, loop.config.train.max_grad_norm)
    loop.scaler.step(loop.optimizer)
    loop.scaler.update()
    loop.schedule.step()
    loop.optimizer.zero_grad(set_to_none=True)
    if loop.trim_memory:  # hand back what the allocator kept of this step's freed tensors
        trim()
    return units, total


def token_batches(
    indices: list[int], train: list[dict[str, Any]], budget: int, multiple: int
) -> list[list[int]]:
    """`indices` cut into micro-batches whose rows x padded length stays within `budget` tokens
    (a row longer than the budget runs alone), longest rows first, so that each holds rows of
    similar length."""
    parts: list[list[int]] = []
    for i in sorted(indices, key=lambda i: -len(train[i]["input_ids"])):
        # sorted longest first: a part's padded length is that of its first row
        longest = padded_length(len(train[parts[-1][0]]["input_ids"]), multiple) if parts else 0
        if parts and (len(parts[-1]) + 1) * longest <= budget:
            parts[-1].append(i)
        else:
            parts.append([i])
    return parts


def count_step(state: FitResult, window: Window, group: list[list[int]], lengths: list[int], units: float,
               loss: torch.Tensor, pad_multiple: int) -> None:  # fmt: skip
    """Add one optimizer step to the counters and to the logging window."""
    state.steps += 1
    state.step_in_epoch += 1
    samples = sum(len(idx) for idx in group)
    state.samples += samples
    state.tokens += sum(lengths[i] for idx in group for i in idx)
    state.padded_tokens += sum(padded_length(max(lengths[i] for i in idx), pad_multiple) * len(idx)
                               for idx in group if idx)  # fmt: skip
    window.loss, window.units, window.samples = (
        window.loss + loss,
        window.units + units,
        window.samples + samples,
    )


def log_window(loop: Loop, state: FitResult, window: Window, epoch: float) -> None:
    """Log the training loss and throughput since the last log line, and start a new window."""
    loss = all_reduce_sum([float(window.loss)], loop.dist)[0]
    now = time.perf_counter()
    entry = {
        "step": state.steps,
        "epoch": round(epoch, 4),
        "loss": loss / max(window.units, 1),
        "lr": loop.schedule.get_last_lr()[0],
        "samples_per_s": round(window.samples / max(now - window.began, 1e-9), 2),
    }
    if loop.dist.is_main:
        loop.log(entry)
    loop.progress.set_description(f"loss {entry['loss']:.4f}, {entry['samples_per_s']:.0f} samples/s",
                                  refresh=False)  # fmt: skip
    window.loss, window.units, window.samples, window.began = 0.0, 0.0, 0, now


def evaluate(loop: Loop, state: FitResult, validation: list[dict[str, Any]], epoch: float) -> bool:
    """Validation metrics at this point (scored on rank 0; under FSDP every process takes part
    in the forward passes); keeps the best weights; returns True when patience has run out."""
    began = time.perf_counter()
    state.last_eval_step = state.steps
    stop = better = False
    tc, task = loop.config.train, loop.task
    if validation and (loop.dist.is_main or loop.fsdp):
        outputs = task.outputs(
            loop.model, validation, loop.pad_id, tc.eval_batch_size, loop.device, loop.dtype
        )
        reshard(loop.model)  # the best weights below, and the checkpoints, keep shards, not whole tensors
    if validation and loop.dist.is_main:
        scores = task.metrics(outputs, validation)
        if loop.metric not in scores:  # (the config checks the names it can; this is the backstop)
            raise ConfigError(
                f"train.metric_for_best: '{loop.metric}' is not a {task.name} metric; "
                f"choose one of: {', '.join(k for k, v in scores.items() if isinstance(v, float))}"
            )
        flat = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
        loop.log({"step": state.steps, "epoch": round(epoch, 4), "split": "validation", **flat})
        value = scores[loop.metric]
        best = state.best_metric
        better = best is None or (value > best if loop.higher_is_better else value < best)
        if better:
            state.best_metric, state.best_step, state.evals_without_gain = value, state.steps, 0
        else:
            state.evals_without_gain += 1
        loop.progress.set_postfix_str(
            f"{loop.metric}={value:.4f} best={state.best_metric:.4f}", refresh=False
        )
        patience = tc.early_stopping_patience
        stop = patience is not None and state.evals_without_gain >= patience
    if broadcast_flag(better, loop.dist):
        loop.best_state = _trainable_state(loop.model)  # every process: under FSDP each keeps its shard
    stop = broadcast_flag(stop, loop.dist)
    state.eval_s += time.perf_counter() - began
    return stop


def save_checkpoint(loop: Loop, state: FitResult) -> Path | None:
    """A resumable checkpoint; its folder (on rank 0). Under `train.distributed=fsdp` (with any
    number of processes) every process writes its own shards, with nothing gathered; otherwise
    rank 0 writes the whole trainable weights."""
    if loop.checkpoint_dir is None:
        return None
    sharded = loop.config.train.distributed == "fsdp"
    stream = loop.stream.state_dict() if loop.stream is not None else None  # every process: it gathers
    if not (sharded or loop.dist.is_main):
        return None
    saved = {
        "result": dataclasses.asdict(state),
        "world": loop.dist.world,
        "distributed": loop.config.train.distributed,
        "global_batch": loop.global_batch,
        **({"stream": stream} if stream is not None else {}),
    }
    keep = loop.config.train.keep_checkpoints
    # the data-order RNG is saved as it was at the start of the epoch: resuming replays that
    # epoch's batch order and skips the steps already done
    current = loop.rng.getstate()
    loop.rng.setstate(loop.epoch_rng_state if state.step_in_epoch else current)
    try:
        if sharded:
            return save_sharded_checkpoint(loop.checkpoint_dir, loop.model, loop.optimizer, loop.schedule,
                                           loop.scaler, saved, loop.rng, loop.best_state, keep, loop.dist)  # fmt: skip
        weights: dict[str, torch.Tensor] = {n: p for n, p in loop.model.named_parameters() if p.requires_grad}
        return write_checkpoint(loop.checkpoint_dir, weights, loop.optimizer.state_dict(), loop.schedule,
                                loop.scaler, saved, loop.rng, loop.best_state, keep)  # fmt: skip
    finally:
        loop.rng.setstate(current)


def should_stop(loop: Loop, state: FitResult, patience_spent: bool) -> bool:
    """Whether training ends after this step: the step budget is spent, the evaluation just
    made ran out of patience, or the time budget (`train.max_minutes`) is spent."""
    minutes = loop.config.train.max_minutes
    # every process takes part in the broadcast, so each reaches the same answer
    out_of_time = minutes is not None and broadcast_flag(state.runtime_s >= 60 * minutes, loop.dist)
    return patience_spent or out_of_time or state.steps >= loop.total_steps


def keep_best(loop: Loop) -> None:
    """Put the best weights seen at an evaluation back into the model."""
    with torch.no_grad():
        params = dict(loop.model.named_parameters())
        for name, value in (loop.best_state or {}).items():
            params[name].copy_(value)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (main thread only);
    the previous handlers are back when training ends."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def share(indices: list[int], dist: Dist) -> list[int]:
    """This process's contiguous, near-equal share of a global batch."""
    if not dist.active:
        return indices
    size, extra = divmod(len(indices), dist.world)
    start = dist.rank * size + min(dist.rank, extra)
    return indices[start : start + size + (dist.rank < extra)]


def _progress(total: int, enabled: bool, initial: int = 0) -> Any:
    # In a log file (not a terminal) redraw rarely instead of writing a line per refresh.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, leave=True,
                mininterval=interval)  # fmt: skip
