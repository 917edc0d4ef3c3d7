"""The memory plan: `train.memory_limit_mb` as a setting that training fits.

Before a generative task (causal-lm, seq2seq, preference) trains on a CPU, `plan_memory`
predicts the run's peak RSS and picks gradient checkpointing (where
`train.gradient_checkpointing` is `auto`) and token-budget micro-batches: each batch is cut
into micro-batches whose rows x padded length stays within a token budget, and their gradients
accumulate, so the optimizer step and the loss are those of the whole batch. It takes the first
of these that fits the limit: whole batches; micro-batches of at least a quarter of the batch;
checkpointing (on LoRA SFT it ran about 17% slower than such micro-batches,
benchmarks/README.md); checkpointing and micro-batches; last, with checkpointing, the speed
layer's bf16 weight copies cast again on every use instead of kept (as autocast does: slower). A limit below the leanest of them is refused before training. (On a GPU no plan is made yet: the limit is the host's
memory, and the activations live on the device.)

The prediction, for a micro-batch of T tokens (rows x padded length):

    peak = now + state + OVERHEAD_MB + ACTIVATION_FACTOR x (saved_constant + saved_per_token x T)

- now: the process's resident memory when the plan is made (libraries, weights, data, the
  speed layer's weight copies), after the float32 weights behind those copies have gone back
  to the page cache (`speed.release_copied_weights`) and glibc has handed back what it kept
  of freed memory;
- state: the trainable parameters' gradients and optimizer moments (3 x their bytes for
  AdamW, 2 x for SGD);
- saved: what autograd keeps for the backward pass, measured by training-mode forward passes
  (no backward) over the longest example and the two longest, under
  `torch.autograd.graph.saved_tensors_hooks` (each storage counted once, parameters left
  out, and so are the speed layer's kept weight copies); a line through the two gives the
  bytes per token and a constant part (autocast's casts of other weights). With checkpointing, the same with it on, plus what it keeps out of the
  hooks' sight: each checkpointed layer's inputs (counted by forward pre-hooks), and one
  layer's activations while the backward pass recomputes it;
- ACTIVATION_FACTOR and OVERHEAD_MB: how much of the saved tensors is alive at the peak, and
  what the process adds besides (the gradients flowing back, memory the allocator and the
  kernel library keep, the validation pass), calibrated on whole epochs of SmolLM2-135M LoRA
  SFT (benchmarks/README.md, "Memory plan").

Why hand-written: no library plans CPU fine-tuning memory; Hugging Face's Trainer leaves
checkpointing and the batch size to the user, and accelerate's `find_executable_batch_size`
retries after an out-of-memory error, which on a CPU is the kernel killing the process.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tunelab.config import Config, batch_size
from tunelab.device import autocast, proc_mb, to_device, trim
from tunelab.errors import ConfigError
from tunelab.speed import release_copied_weights
from tunelab.tasks.base import Task, padded_length
from tunelab.token_cache import row_lengths

LIMIT_SHARE = 0.7  # `auto`: this share of the memory the machine has available, besides the process's own
# peak over the saved tensors, and what the process adds besides them (kernel library, allocator, the
# validation pass): a line above every point of the calibration (benchmarks/README.md, "Memory plan")
ACTIVATION_FACTOR = 0.9
OVERHEAD_MB = 820.0
# Without a trim after each step, glibc kept up to 15% more (SFT benchmark: 2,511 MB against 2,183,
# at 379 real tokens/s against 319): a run predicted within this share of its limit trims
TRIM_ROOM = 1.2


@dataclass
class Footprint:
    """What the prediction is made of (MB; per token: MB per token of a micro-batch)."""

    now_mb: float
    state_mb: float
    saved_mb: float  # the constant part of the saved tensors, whole model
    saved_per_token_mb: float
    checkpointed_mb: float | None = None  # the same with gradient checkpointing (None: not measured)
    checkpointed_per_token_mb: float | None = None
    copies_mb: float = 0.0  # the speed layer's low-precision weight copies (bf16 autocast), part of now_mb
    layers: int = 1  # the layers checkpointing recomputes one at a time
    released_mb: float = 0.0  # float32 weights left to the page cache (`release_copied_weights`)

    def peak(self, tokens: int, checkpointing: bool, copies: bool = True) -> float:
        """The predicted peak RSS (MB) of training on micro-batches of `tokens` tokens; without
        `copies`, the weight copies are not kept: with checkpointing, one layer's at a time."""
        const, per_token = (
            (self.checkpointed_mb, self.checkpointed_per_token_mb)
            if checkpointing
            else (self.saved_mb, self.saved_per_token_mb)
        )
        assert const is not None and per_token is not None  # measured before it is asked
        now = self.now_mb if copies else self.now_mb - self.copies_mb + self.copies_mb / self.layers
        return now + self.state_mb + OVERHEAD_MB + ACTIVATION_FACTOR * (const + per_token * tokens)

    def budget(self, limit_mb: float, checkpointing: bool, copies: bool = True) -> int:
        """The most tokens a micro-batch may hold for the peak to stay within `limit_mb`."""
        per_token = self.checkpointed_per_token_mb if checkpointing else self.saved_per_token_mb
        room = limit_mb - self.peak(0, checkpointing, copies)
        if room < 0:
            return 0
        return 2**62 if not per_token else int(room / (ACTIVATION_FACTOR * per_token))


@dataclass
class MemoryPlan:
    """What the plan chose and why; `line()` is the console line, `as_dict()` env.json's `memory`."""

    limit_mb: float | None  # None: no plan
    limit_from: str  # where the limit came from, or why there is no plan
    gradient_checkpointing: bool
    micro_batch_tokens: int | None  # None: whole batches
    longest_batch_tokens: int = 0  # the largest batch: rows x padded length of the longest example
    predicted_mb: float | None = None  # the predicted peak of the choice
    whole_batches_mb: float | None = None  # the predicted peak without checkpointing or micro-batches
    footprint: Footprint | None = None
    weight_copies: bool = True  # the speed layer keeps its low-precision weight copies
    trim_steps: bool = False  # freed memory handed back to the system after every step (`TRIM_ROOM`)

    def line(self) -> str:
        if self.limit_mb is None:
            checkpointing = "on" if self.gradient_checkpointing else "off"
            return (
                f"memory: no plan ({self.limit_from}); gradient checkpointing {checkpointing}, whole batches"
            )
        chose = ["gradient checkpointing " + ("on" if self.gradient_checkpointing else "off")]
        if not self.weight_copies:
            chose.append("no kept bf16 weight copies")
        if self.micro_batch_tokens:
            chose.append(f"micro-batches of at most {self.micro_batch_tokens:,} tokens "
                         f"(the largest batch has {self.longest_batch_tokens:,})")  # fmt: skip
        else:
            chose.append(f"whole batches (the largest has {self.longest_batch_tokens:,} tokens)")
        if self.trim_steps:
            chose.append("freed memory handed back after each step")
        whole = (f"; whole batches without checkpointing: {self.whole_batches_mb:,.0f} MB"
                 if self.whole_batches_mb is not None and (self.micro_batch_tokens or self.gradient_checkpointing)
                 else "")  # fmt: skip
        return (f"memory: limit {self.limit_mb:,.0f} MB ({self.limit_from}): {', '.join(chose)}; "
                f"predicted peak {self.predicted_mb:,.0f} MB{whole}")  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["line"] = self.line()
        out["model"] = {"activation_factor": ACTIVATION_FACTOR, "overhead_mb": OVERHEAD_MB}
        return out


# ------------------------------------------------------------------------------ the machine


def rss_mb() -> float:
    """This process's resident memory now (`VmRSS`), MB; 0 where /proc does not say."""
    return proc_mb("/proc/self/status", "VmRSS") or 0.0


def available_mb() -> float | None:
    """Memory the machine can give without swapping (`MemAvailable`), MB; None where unknown."""
    available = proc_mb("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (ValueError, OSError, AttributeError):
        return None


def resolve_limit(setting: float | str | bool, now_mb: float) -> tuple[float | None, str]:
    """(the limit in MB or None for no plan, where it came from)."""
    if setting in ("off", 0) or setting is False:  # (YAML reads a bare `off` as false)
        return None, "train.memory_limit_mb=off"
    if setting != "auto":
        return float(setting), "train.memory_limit_mb"
    free = available_mb()
    if free is None:
        return None, "auto, and this machine does not say how much memory is available"
    # processes of one machine (torchrun) share what is available
    share = LIMIT_SHARE / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return (
        now_mb + share * free,
        f"auto: this process's {now_mb:,.0f} MB + {share:.0%} of {free:,.0f} MB available",
    )


# ------------------------------------------------------------------------------ checkpointing


def hf_model(model: torch.nn.Module) -> Any:
    """The transformers model inside `model` (itself, or under a PEFT or tunelab wrapper)."""
    for module in model.modules():
        if hasattr(module, "supports_gradient_checkpointing") and hasattr(
            module, "_set_gradient_checkpointing"
        ):
            return module
    return None


def supports_checkpointing(model: torch.nn.Module) -> bool:
    inner = hf_model(model)
    return inner is not None and bool(getattr(inner, "supports_gradient_checkpointing", False))


def set_checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Turn transformers' gradient checkpointing on or off (non-reentrant: gradients reach
    adapters even when the embeddings are frozen); works before or after a method wraps it."""
    inner = hf_model(model)
    if inner is None:
        return
    set_up = [m for m in inner.modules() if hasattr(m, "_gradient_checkpointing_func")]
    if set_up or not on:  # switched on once before (or never): flip the layers' own flags
        for module in set_up:
            module.gradient_checkpointing = on
        return
    if hasattr(inner, "activation_checkpointing_enable"):  # the name since transformers 5.x
        inner.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        inner.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def checkpointing_on(model: torch.nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


# ------------------------------------------------------------------------------ measuring


def saved_mb(model: torch.nn.Module, task: Task, examples: list[dict[str, Any]], pad_id: int,
             device: torch.device, dtype: torch.dtype | None) -> float:  # fmt: skip
    """MB that autograd keeps for the backward pass of one training-mode forward pass over
    `examples` (nothing is trained): the tensors saved for backward, each storage once and the
    model's own parameters and buffers left out, plus the inputs of checkpointed layers."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def count(t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            seen.setdefault(storage.data_ptr(), storage.nbytes())

    def pack(t: torch.Tensor) -> torch.Tensor:
        count(t)
        return t

    def inputs(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if module.training and getattr(module, "gradient_checkpointing", False):
            for value in (*args, *kwargs.values()):
                if isinstance(value, torch.Tensor):
                    count(value)

    hooks = [m.register_forward_pre_hook(inputs, with_kwargs=True)
             for m in model.modules() if getattr(m, "gradient_checkpointing", False)]  # fmt: skip
    was_training = model.training
    model.train()
    try:
        batch = to_device(task.collate(examples, pad_id), device)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, dtype):
            loss = task.loss(model, batch)
        del loss
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    # the speed layer's weight copies, made during the pass, stay: they are counted in the process's memory
    kept = {t.untyped_storage().data_ptr() for c in weight_copies(model) for _, t in c.copies.values()}
    return sum(n for ptr, n in seen.items() if ptr not in kept) / 2**20


def recompute_share(model: torch.nn.Module) -> int:
    """How many layers checkpointing recomputes one at a time (1 / this: one layer's share)."""
    return max(1, sum(1 for m in model.modules() if hasattr(m, "_gradient_checkpointing_func")))


def footprint(model: torch.nn.Module, task: Task, train: list[dict[str, Any]], config: Config, pad_id: int,
              device: torch.device, dtype: torch.dtype | None, checkpointing: bool) -> Footprint:  # fmt: skip
    """Measure the saved tensors at two sizes (the longest example, the two longest), without
    checkpointing and, with `checkpointing`, with it."""
    multiple = task.pad_multiple
    order = sorted(range(len(train)), key=lambda i: -len(train[i]["input_ids"]))[:2]
    longest = padded_length(len(train[order[0]]["input_ids"]), multiple)
    sizes = [(order[:k], k * longest) for k in (1, 2) if k <= len(order)]
    was_on = checkpointing_on(model)

    def line(on: bool) -> tuple[float, float]:
        set_checkpointing(model, on)
        points = [(tokens, saved_mb(model, task, [train[i] for i in rows], pad_id, device, dtype))
                  for rows, tokens in sizes]  # fmt: skip
        if len(points) == 1:
            return 0.0, points[0][1] / points[0][0]
        (t1, m1), (t2, m2) = points
        per_token = max(0.0, (m2 - m1) / (t2 - t1))
        return max(0.0, m1 - per_token * t1), per_token

    const, per_token = line(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    moments = 1 if config.train.optimizer == "sgd" else 2
    state = sum(p.numel() * p.element_size() for p in trainable) * (1 + moments) / 2**20
    found = Footprint(now_mb=0.0, state_mb=state, saved_mb=const, saved_per_token_mb=per_token)
    if checkpointing:
        try:
            c_const, c_per_token = line(True)
        except RuntimeError:  # e.g. prefix tuning: its virtual tokens' mask breaks the recompute
            c_const = c_per_token = math.nan
        if not math.isnan(c_const):
            layers = recompute_share(model)
            found.checkpointed_mb = c_const + max(0.0, const - c_const) / layers
            found.checkpointed_per_token_mb = c_per_token + max(0.0, per_token - c_per_token) / layers
    set_checkpointing(model, was_on)
    found.copies_mb = sum(c.held_bytes() for c in weight_copies(model)) / 2**20
    found.layers = recompute_share(model)
    # after the passes, what they leave stays (a reference model, cast weights); the float32 weights
    # that training reads only as copies go back to the page cache, and the freed memory that the
    # allocator keeps is handed back first, or it would count twice
    found.released_mb = release_copied_weights(model)
    trim()
    found.now_mb = rss_mb()
    return found


def weight_copies(model: torch.nn.Module) -> list[Any]:
    """The speed layer's stores of low-precision weight copies (`speed.linear.LowPrecisionCopies`)."""
    return [m.casts for m in model.modules() if hasattr(getattr(m, "casts", None), "held_bytes")]


def keep_weight_copies(model: torch.nn.Module, keep: bool) -> None:
    for copies in weight_copies(model):
        copies.keep = keep
        if not keep:
            copies.copies.clear()
            copies.sources.clear()


# ------------------------------------------------------------------------------ the plan


def longest_batch(task: Task, train: list[dict[str, Any]], config: Config) -> tuple[int, int]:
    """(tokens of the largest batch: a batch of the longest examples, tokens of one longest example)."""
    longest = padded_length(max(row_lengths(train)), task.pad_multiple)  # cached rows: their length column
    return min(batch_size(config), len(train)) * longest, longest


def plan_memory(model: torch.nn.Module, task: Task, train: list[dict[str, Any]], config: Config, pad_id: int,
                device: torch.device, dtype: torch.dtype | None) -> MemoryPlan:  # fmt: skip
    """Decide gradient checkpointing and the micro-batch budget for training `model` (built,
    with its method applied; checkpointing is switched on here when chosen) on `train` within
    `train.memory_limit_mb`. Raises ConfigError when a limit the user set cannot be met."""
    tc = config.train
    explicit = tc.gradient_checkpointing if isinstance(tc.gradient_checkpointing, bool) else None
    current = checkpointing_on(model)
    tokens, row = longest_batch(task, train, config)
    if not task.generative:
        why = f"the {task.name} task trains as configured"
        return MemoryPlan(None, why, current, None, tokens)
    if device.type != "cpu":
        return MemoryPlan(None, f"plans cover CPU training, not {device.type}", current, None, tokens)
    limit, source = resolve_limit(tc.memory_limit_mb, rss_mb())
    if limit is None:
        return MemoryPlan(None, source, current, None, tokens)
    can_checkpoint = supports_checkpointing(model) and explicit is not False
    found = footprint(model, task, train, config, pad_id, device, dtype, can_checkpoint)
    can_checkpoint = can_checkpoint and found.checkpointed_mb is not None  # the probe ran with it
    plan = MemoryPlan(limit, source, current, None, tokens, footprint=found)
    plan.whole_batches_mb = found.peak(tokens, False) if explicit is not True else None
    options = [on for on in ((False, True) if explicit is None else (explicit,)) if not on or can_checkpoint]
    # Cheapest first. Micro-batches of a quarter of the batch or more cost little (on LoRA SFT they
    # ran faster than whole batches; checkpointing ran about 17% slower than them: benchmarks/README.md,
    # "Memory plan"); not keeping the weight copies costs two casts of the frozen weights per
    # micro-batch (with checkpointing only: without it, autograd keeps the casts anyway); micro-batches
    # down to one example, many small products, come last. (checkpointing, least tokens, copies kept)
    quarter = max(row, tokens // 4)
    order = [(False, tokens, True), (False, quarter, True), (True, tokens, True), (True, quarter, True),
             (True, tokens, False), (True, quarter, False), (True, row, True), (True, row, False), (False, row, True)]  # fmt: skip
    lean = True in options
    for checkpointing, least, copies in order:
        if checkpointing not in options or (not copies and not found.copies_mb):
            continue
        budget = found.budget(limit, checkpointing, copies)
        budget = tokens if budget >= tokens else (budget // row) * row  # whole rows of the longest length
        if budget >= least:
            plan.gradient_checkpointing, plan.weight_copies = checkpointing, copies
            plan.micro_batch_tokens = budget if budget < tokens else None
            plan.predicted_mb = found.peak(budget, checkpointing, copies)
            break
    else:
        leanest = found.peak(row, lean, not (lean and found.copies_mb))
        what = (
            "gradient checkpointing and " if lean else ""
        ) + f"one example of {row:,} tokens per micro-batch"
        if tc.memory_limit_mb == "auto":  # the machine's own figure: train as lean as possible and say so
            plan.gradient_checkpointing, plan.micro_batch_tokens, plan.predicted_mb = lean, row, leanest
            plan.weight_copies = not (lean and found.copies_mb)
            plan.limit_from += f"; even {what} is predicted to need {leanest:,.0f} MB"
        else:
            raise ConfigError(
                f"train.memory_limit_mb: {limit:,.0f} MB is too little for this run: even {what} is predicted to "
                f"peak at {leanest:,.0f} MB (the process and its optimizer state alone: "
                f"{found.now_mb + found.state_mb:,.0f} MB); raise it to {math.ceil(leanest / 100) * 100:,}, or "
                f"shorten data.max_length, or set train.memory_limit_mb=off"
            )
    # the prediction assumes freed memory goes back after every step; that costs time (pages
    # faulted in again), so it is done only where the limit leaves less room than glibc keeps
    plan.trim_steps = plan.predicted_mb is not None and plan.predicted_mb * TRIM_ROOM > limit
    set_checkpointing(model, plan.gradient_checkpointing)
    keep_weight_copies(model, plan.weight_copies)
    return plan
