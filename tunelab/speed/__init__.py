"""tunelab's speed layer: faster modules swapped into the model before training on a CPU
(`train.fast_kernels`), the way PEFT swaps layers, with a report of what applied.

| speed-up | stands in for | computes | module |
| --- | --- | --- | --- |
| fast dropout | `nn.Dropout` | the same drop rate (to 1/32768) from a cheaper random draw | `dropout` |
| CPU attention | the attention implementation | eager attention, the same function | `attention` |
| frozen linear | frozen `nn.Linear` | the same products, weight cast once | `linear` |
| fused LoRA linear | peft LoRA `Linear` | the same products in one autograd function | `linear` |
| packed encoder | a BERT-family encoder | the same function without padding rows | `encoder` |
| first-token last layer | (inside the packed encoder) | the same logits, last layer at position 0 | `encoder` |
| frozen-layer cache | embeddings + frozen blocks | frozen layers without dropout, once | `cache` |

"The same" is exact up to float rounding (sums in another order); the dropout is a
different random draw of the same distribution, and the frozen-layer cache (`freeze` only,
`train.cache_frozen_layers`) is a different computation: no dropout in the frozen layers.

Every speed-up is a module that takes another's place (`swap.Wrapper`): the parameter
names, `state_dict` keys and tensors stay the original's, nothing is written into the
model's config (attention is switched with transformers' public `set_attn_implementation`),
and `undo` puts every original module back. `apply` returns a `SpeedReport` (also found
with `report_for(model)`): which speed-up replaced which modules, and why the others did
not apply.

Why hand-written: no library offers these for Hugging Face models on CPU (kernel libraries
such as Liger, Unsloth or xFormers target GPUs, and `torch.compile` costs far more in
compiling and recompiling per batch shape than a short CPU run wins back:
benchmarks/compile_vs_eager.py). Each is tested against the model's own code.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tunelab.speed.attention import IMPLEMENTATION, cpu_attention, restore_attention, use_cpu_attention
from tunelab.speed.cache import (
    CACHE_BUDGET_MB,
    CachedBlock,
    CachedEntry,
    FrozenCache,
    cache_batches,
    cache_mb,
    row_starts,
)
from tunelab.speed.dropout import FastDropout, dropout_add, fast_dropout, keep_mask, use_fast_dropout
from tunelab.speed.encoder import PACK_ROWS, FastEncoder, use_fast_encoder
from tunelab.speed.linear import FastFrozenLinear, FastLoraLinear, release_copied_weights, use_fast_linears
from tunelab.speed.report import (
    ATTENTION,
    CACHE,
    DROPOUT,
    FIRST_TOKEN,
    FROZEN_LINEAR,
    LORA_LINEAR,
    PACKED,
    SpeedReport,
    register,
    report_for,
)
from tunelab.speed.swap import StandIn, Wrapper, base_of, put_all_back

__all__ = [
    "ATTENTION", "CACHE", "CACHE_BUDGET_MB", "DROPOUT", "FIRST_TOKEN", "FROZEN_LINEAR", "IMPLEMENTATION",
    "LORA_LINEAR", "PACKED", "PACK_ROWS", "CachedBlock", "CachedEntry", "FastDropout", "FastEncoder",
    "FastFrozenLinear", "FastLoraLinear", "FrozenCache", "SpeedReport", "StandIn", "Wrapper", "apply",
    "cache_batches", "cache_mb", "cpu_attention", "dropout_add", "fast_dropout", "keep_mask",
    "release_copied_weights", "report_for", "row_starts", "undo",
]  # fmt: skip


def apply(model: nn.Module, task: Any, cpu: bool, enabled: bool = True) -> SpeedReport:
    """Swap in every speed-up that applies to this model and task (`cpu`: training on a CPU)
    and return the report; with `enabled` False (`train.fast_kernels` off), none, and a
    report that says so."""
    report = SpeedReport(enabled=enabled)
    register(model, report)
    if not enabled:
        return report
    if not cpu:  # written and measured for CPUs only; a GPU runs the model's own (fused) kernels
        for speedup in (DROPOUT, FROZEN_LINEAR, LORA_LINEAR, ATTENTION, PACKED, FIRST_TOKEN):
            report.skip(speedup, "not training on a CPU (the speed layer is CPU-only)")
        return report
    base = base_of(model)  # (peft's own modules outside it have no frozen linear or dropout to swap)
    use_fast_dropout(base, report)
    use_fast_linears(base, report)
    misfit: str | None = None  # why the CPU training path's speed-ups do not apply
    if getattr(task, "generative", False):
        misfit = "generative task (generation keeps its own path)"
    if misfit is None:
        use_cpu_attention(base, report)
    else:
        report.skip(ATTENTION, misfit)
    use_fast_encoder(base, task, misfit, report)
    return report


def undo(model: nn.Module) -> None:
    """Put back every module the speed layer swapped (its frozen-layer cache's too) and the
    model's own attention implementation."""
    put_all_back(model)
    restore_attention(base_of(model), report_for(model))
