"""The training loop: one plain PyTorch loop, read top to bottom in `fit`.

It owns batching (length buckets), the optimizer and schedule, mixed precision, gradient
accumulation and clipping, periodic evaluation, best-model selection and early stopping.
Tasks supply the loss and metrics; methods decide which parameters train.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.checkpoint import load_checkpoint, save_checkpoint
from tunelab.config import Config, batch_size
from tunelab.dist import Dist, all_reduce_sum, broadcast_flag, full_state, gather_tensors, shard_model
from tunelab.errors import ConfigError, Interrupted
from tunelab.speed import FrozenCache, cache_mb
from tunelab.tasks.base import padded_length


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# `auto` takes bf16 on a CPU only where its matrix products run at least this much faster than float32
BF16_MIN_SPEEDUP = 1.2


@functools.cache
def cpu_bf16_speedup(size: int = 768, repeats: int = 5) -> float:
    """How many times faster a bf16 matrix product (size x size x size) runs than a float32 one
    on this CPU, best of `repeats` each; measured once per process (about 0.06 s here).

    Having the bf16 instructions does not make bf16 faster: on one 2-core machine here bf16
    products ran 2.2x faster than float32 (AMD, AVX-512 bf16), on another 0.55x (Intel without
    AMX, where oneDNN's bf16 kernels lose to float32 MKL), and whole training steps followed."""

    generator = torch.Generator().manual_seed(0)  # its own: the global random stream is left as it was

    def best(dtype: torch.dtype) -> float:
        a, b = (torch.randn(size, size, generator=generator).to(dtype) for _ in range(2))
        torch.mm(a, b)  # the kernel's first call sets it up
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - began)
        return min(times)

    return best(torch.float32) / best(torch.bfloat16)


def bf16_supported(device: torch.device) -> bool:
    """Whether the device has bf16 kernels at all (whether they are faster is another matter)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision`, or None for plain fp32. `auto` is bf16 on a GPU that
    supports it, and on a CPU whose bf16 matrix products are measurably faster than float32."""
    if precision == "fp32":
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        return torch.float16
    supported = bf16_supported(device)
    if precision == "bf16":
        if not supported:
            raise ConfigError(
                f"train.precision: this {device.type.upper()} has no fast bf16; use fp32 or auto"
            )
        return torch.bfloat16
    fast = supported and (device.type != "cpu" or cpu_bf16_speedup() >= BF16_MIN_SPEEDUP)
    return torch.bfloat16 if fast else None


def precision_name(dtype: torch.dtype | None) -> str:
    """The short name of an autocast dtype from `resolve_precision`, as `train.precision` spells it."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.inference_mode()
def predict_logits(
    model: torch.nn.Module,
    examples: list[dict[str, Any]],
    collate: Callable,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> list[np.ndarray]:
    """Model outputs for each example, in their order: a vector per example for sequence
    tasks, a (tokens, labels) array for token tasks. Batches are length-sorted to cut padding."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    out: list[np.ndarray] = [np.zeros(0)] * len(examples)
    for s in range(0, len(order), batch_size):
        chunk = order[s : s + batch_size]
        batch = collate([examples[i] for i in chunk], pad_id)
        batch.pop("labels", None)
        with autocast(device, dtype):
            logits = model(**to_device(batch, device)).logits.float().cpu().numpy()
        # soft-prompt methods prepend virtual tokens: the real ones follow them
        offset = logits.shape[1] - batch["input_ids"].shape[1] if logits.ndim == 3 else 0
        for row, i in enumerate(chunk):
            n = len(examples[i]["input_ids"])
            out[i] = logits[row, offset : offset + n] if logits.ndim == 3 else logits[row]
    model.train(was_training)
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay on weight matrices only: biases, norms and other 1-d parameters are exempt."""
    decay, exempt = [], []
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


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: the kernel's high-water mark for its own
    address space (`VmHWM`). Not `ru_maxrss` where that exists: Linux carries `ru_maxrss` over
    from the parent through fork and exec, so a run started by a process that had once held
    1.2 GB reported a peak of at least 1.2 GB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KB elsewhere


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


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class _StopSignal:
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (main thread only)."""

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


def fit(
    model: torch.nn.Module,
    task: Any,
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
) -> FitResult:
    """Train `model` in place on `train`; keep the weights that scored best on `validation`.

    `log` receives one dict per logging or evaluation step (the metrics.jsonl lines).
    With `checkpoint_dir`, resumable checkpoints are written every `train.checkpoint_steps`
    steps, at each epoch end and on SIGTERM/SIGINT (then `Interrupted` is raised);
    `resume_from` continues exactly from one. Under torchrun (`dist`), each process trains on
    its share of every global batch and only rank 0 evaluates.
    """
    tc = config.train
    dist = dist or Dist()
    device = device or pick_device()
    dtype = resolve_precision(tc.precision, device)
    if tc.precision == "auto" and dist.active:  # rank 0's timing decides, so every process computes alike
        dtype = torch.bfloat16 if broadcast_flag(dtype is not None, dist) else None
    metric = task.default_metric if tc.metric_for_best == "auto" else tc.metric_for_best
    lower_is_better = metric.endswith("loss") or metric in ("mse", "mae", "perplexity")
    rng = random.Random(config.seed)
    torch.manual_seed(config.seed)
    lengths = [len(e["input_ids"]) for e in train]

    # a global batch is batch_size x world size examples; each process takes its share
    global_batch = batch_size(config) * dist.world
    steps_per_epoch = math.ceil(math.ceil(len(train) / global_batch) / tc.gradient_accumulation)
    total_steps = tc.max_steps or max(1, math.ceil(tc.epochs * steps_per_epoch))
    model.to(device)
    fsdp = dist.active and tc.distributed == "fsdp"
    if fsdp:
        shard_model(model)
    optimizer = make_optimizer(model, config, lr)
    schedule = make_schedule(optimizer, tc.schedule, math.ceil(tc.warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    trainable = [p for p in model.parameters() if p.requires_grad]
    evaluated = model  # evaluation and checkpoints see the model itself, not the DDP wrapper
    # the frozen layers' outputs are computed once (counted as training time)
    cache_began, cache = time.perf_counter(), None
    if tc.fast_kernels and config.method == "freeze" and not task.generative and not fsdp:
        cache = FrozenCache.build(model, train, task.collate, pad_id, tc.eval_batch_size, device,
                                  lambda: autocast(device, dtype))  # fmt: skip
    cache_s = time.perf_counter() - cache_began
    if dist.active and not fsdp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    result = FitResult()
    best_state: dict[str, torch.Tensor] | None = None
    epoch_rng_state = rng.getstate()
    if resume_from is not None:
        state, best_state = load_checkpoint(resume_from, evaluated, optimizer, schedule, scaler, rng, fsdp)
        if state.get("world", 1) != dist.world:
            raise ConfigError(f"{resume_from} was saved by {state.get('world', 1)} process(es); resume it with "
                              f"the same number (the global batch, and so the data order, depend on it)")  # fmt: skip
        result = FitResult(**state["result"])
        epoch_rng_state = rng.getstate()
    running_loss, running_units, window_samples, window_start = 0.0, 0.0, 0, time.perf_counter()
    progress = _progress(total_steps, tc.progress_bar and dist.is_main, initial=result.steps)

    def evaluate(epoch: float) -> bool:
        """Validation metrics at this point (scored on rank 0; under FSDP every process takes
        part in the forward passes); returns True when training should stop."""
        nonlocal best_state
        began = time.perf_counter()
        result.last_eval_step = result.steps
        stop = better = False
        if validation and (dist.is_main or fsdp):
            logits = task.outputs(evaluated, validation, pad_id, tc.eval_batch_size, device, dtype)
        if validation and dist.is_main:
            scores = task.metrics(logits, validation)
            if metric not in scores:
                raise ConfigError(
                    f"train.metric_for_best: '{metric}' is not a {task.name} metric; "
                    f"choose one of: {', '.join(k for k, v in scores.items() if isinstance(v, float))}"
                )
            flat = {k: v for k, v in scores.items() if isinstance(v, (int, float))}
            log({"step": result.steps, "epoch": round(epoch, 4), "split": "validation", **flat})
            value = scores[metric]
            better = result.best_metric is None or (
                value < result.best_metric if lower_is_better else value > result.best_metric
            )
            if better:
                result.best_metric, result.best_step, result.evals_without_gain = value, result.steps, 0
            else:
                result.evals_without_gain += 1
            progress.set_postfix_str(f"{metric}={value:.4f} best={result.best_metric:.4f}", refresh=False)
            patience = tc.early_stopping_patience
            stop = patience is not None and result.evals_without_gain >= patience
        if broadcast_flag(better, dist):
            best_state = _trainable_state(evaluated)  # every process: under FSDP each keeps its shard
        stop = broadcast_flag(stop, dist)
        result.eval_s += time.perf_counter() - began
        return stop

    def checkpoint() -> Path | None:
        if checkpoint_dir is None:
            return None
        if fsdp:  # gather the shards: every process takes part
            model_state, optimizer_state = full_state(evaluated, optimizer)
            names = {n for n, p in evaluated.named_parameters() if p.requires_grad}
            weights = {n: t for n, t in model_state.items() if n in names}
            best = gather_tensors(best_state) if best_state is not None else None
        else:
            weights = {n: p for n, p in evaluated.named_parameters() if p.requires_grad}
            optimizer_state, best = optimizer.state_dict(), best_state
        if not dist.is_main:
            return None
        state = {"result": dataclasses.asdict(result), "world": dist.world, "distributed": tc.distributed}
        # the data-order RNG is saved as it was at the start of the epoch: resuming replays
        # that epoch's batch order and skips the steps already done
        current = rng.getstate()
        rng.setstate(epoch_rng_state if result.step_in_epoch else current)
        try:
            return save_checkpoint(checkpoint_dir, weights, optimizer_state, schedule, scaler, state, rng,
                                   best, tc.keep_checkpoints)  # fmt: skip
        finally:
            rng.setstate(current)

    if cache is not None:
        result.setup_s = round(result.setup_s + cache_s, 3)
        result.cache_mb = round(cache_mb(*cache.table.shape), 1)
    model.train()
    start = time.perf_counter() - result.runtime_s - cache_s
    stop = result.steps >= total_steps
    with _StopSignal() as signals:
        while not stop:
            epoch_rng_state = rng.getstate()
            batches = length_batches(lengths, global_batch, rng, tc.length_bucketing)
            groups = [
                batches[s : s + tc.gradient_accumulation]
                for s in range(0, len(batches), tc.gradient_accumulation)
            ]
            for group in groups[result.step_in_epoch :]:
                # Normalise by the examples (or tokens) of the whole accumulated global step,
                # so that accumulation 4 x batch 1, or 2 processes x batch 8, give the same
                # update as one batch of 16.
                mine = [share(idx, dist) for idx in group]
                mine = [idx for idx in mine if idx]
                collated = [task.collate([train[i] for i in idx], pad_id) for idx in mine]
                units = all_reduce_sum([float(sum(task.units(b) for b in collated))], dist)[0]
                for n, batch in enumerate(collated):
                    sync = n == len(collated) - 1 or not dist.active or fsdp
                    frozen = cache.batch(mine[n], batch["input_ids"].shape[1]) if cache else nullcontext()
                    with nullcontext() if sync else model.no_sync(), autocast(device, dtype), frozen:
                        loss_sum = task.loss(model, to_device(batch, device))
                    # DDP averages gradients over processes: scale back up to a global sum
                    scaler.scale(loss_sum * dist.world / units).backward()
                    running_loss += loss_sum.detach()  # a tensor: read only when logged (no per-step sync)
                if tc.max_grad_norm is not None:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, tc.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)

                result.steps += 1
                result.step_in_epoch += 1
                running_units += units
                n_samples = sum(len(idx) for idx in group)
                result.samples += n_samples
                window_samples += n_samples
                result.tokens += sum(lengths[i] for idx in group for i in idx)
                result.padded_tokens += sum(padded_length(max(lengths[i] for i in idx), task.pad_multiple) * len(idx)
                                            for idx in group if idx)  # fmt: skip
                progress.update(1)
                epoch_pos = result.epoch_index + min(1.0, result.step_in_epoch / steps_per_epoch)
                if result.steps % tc.log_steps == 0 or result.steps == total_steps:
                    running_loss = all_reduce_sum([float(running_loss)], dist)[0]
                    now = time.perf_counter()
                    entry = {
                        "step": result.steps,
                        "epoch": round(epoch_pos, 4),
                        "loss": running_loss / max(running_units, 1),
                        "lr": schedule.get_last_lr()[0],
                        "samples_per_s": round(window_samples / max(now - window_start, 1e-9), 2),
                    }
                    if dist.is_main:
                        log(entry)
                    progress.set_description(
                        f"loss {entry['loss']:.4f}, {entry['samples_per_s']:.0f} samples/s", refresh=False
                    )
                    running_loss, running_units, window_samples, window_start = 0.0, 0.0, 0, now
                if tc.eval_steps and result.steps % tc.eval_steps == 0 and result.steps < total_steps:
                    stop = evaluate(epoch_pos)
                result.runtime_s = time.perf_counter() - start
                if (
                    tc.checkpoint_steps
                    and result.steps % tc.checkpoint_steps == 0
                    and result.steps < total_steps
                ):
                    checkpoint()
                if broadcast_flag(signals.received is not None, dist):
                    saved = checkpoint()
                    progress.close()
                    raise Interrupted(f"stopped at step {result.steps}"
                                      + (f"; checkpoint saved in {saved}" if saved else ""))  # fmt: skip
                if tc.max_minutes is not None and broadcast_flag(
                    result.runtime_s >= 60 * tc.max_minutes, dist
                ):
                    stop = True  # the time budget is spent: evaluate and keep the best
                if stop or result.steps >= total_steps:
                    stop = True
                    break
            else:
                result.epoch_index += 1
                result.step_in_epoch = 0
            result.epochs = min(
                result.steps / steps_per_epoch, result.epoch_index + (result.step_in_epoch > 0)
            )
            finished_epoch = result.step_in_epoch == 0
            if (tc.eval_each_epoch and finished_epoch or stop) and result.last_eval_step != result.steps:
                stop = evaluate(result.epochs) or stop
            result.stopped_early = stop and result.steps < total_steps
            result.runtime_s = time.perf_counter() - start
            if finished_epoch and not stop:
                checkpoint()
    progress.close()
    if cache is not None:
        cache.close()
    result.runtime_s = time.perf_counter() - start
    if best_state is not None:
        with torch.no_grad():
            params = dict(evaluated.named_parameters())
            for name, value in best_state.items():
                params[name].copy_(value)
    return result


def share(indices: list[int], dist: Dist) -> list[int]:
    """This process's contiguous, near-equal share of a global batch."""
    if not dist.active:
        return indices
    size, extra = divmod(len(indices), dist.world)
    start = dist.rank * size + min(dist.rank, extra)
    return indices[start : start + size + (dist.rank < extra)]


def _progress(total: int, enabled: bool, initial: int = 0) -> Any:
    import sys

    from tqdm.auto import tqdm

    # In a log file (not a terminal) redraw rarely instead of writing a line per refresh.
    interval = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, leave=True,
                mininterval=interval)  # fmt: skip
