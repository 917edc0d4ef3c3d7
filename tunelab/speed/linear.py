"""Linear layers that skip work autocast and peft repeat on every call (the same products).

- `FastFrozenLinear` stands in for a frozen `nn.Linear` (every method but `full`): it keeps a
  copy of its weight in the autocast dtype, made once and remade only when the weight
  changes, where autocast casts the float32 weight on every call.
- `FastLoraLinear` stands in for a peft LoRA `Linear` with a frozen `nn.Linear` base: the base
  product plus the low-rank update run as one autograd function (`_LoraProduct`), in the
  autocast dtype, instead of peft's chain of casts and small modules: the same products,
  fewer passes over memory (the update is added to the base product in place, so results
  agree with peft's to rounding, not bit for bit). Where the layer is not in its plain
  one-adapter state (disabled, merged, several adapters, extra arguments) it calls peft's own
  forward. peft's model-wide switches (`disable_adapter`, `set_adapter`, `merge_adapter`) look
  for their LoRA layers by type: call them after `speed.undo`, as `run.finish_run` does
  before saving.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from tunelab.device import release_file_pages
from tunelab.speed.dropout import fast_dropout
from tunelab.speed.report import FROZEN_LINEAR, LORA_LINEAR, SpeedReport
from tunelab.speed.swap import Wrapper, hooked, replace


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


class LowPrecisionCopies:
    """Tensors cast to another dtype once, and cast again only when the tensor changes (its
    storage or its version counter: an optimizer step or a load bumps it). With `keep` off
    (the memory plan's choice where the copies do not fit), cast on every call, as autocast does."""

    def __init__(self) -> None:
        self.copies: dict[int, tuple[tuple[int, int, torch.dtype], torch.Tensor]] = {}
        # what each kept copy was cast from (weakly: a copy never keeps its original alive)
        self.sources: dict[int, weakref.ref[torch.Tensor]] = {}
        self.keep = True

    def held_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for _, t in self.copies.values())

    def copied(self) -> list[torch.Tensor]:
        """The tensors a copy is kept of now, and is current (none while `keep` is off)."""
        out = []
        for slot, (key, _) in self.copies.items():
            source = self.sources.get(slot)
            t = source() if source is not None else None
            if t is not None and key == (t.data_ptr(), t._version, key[2]):
                out.append(t)
        return out

    def get(self, slot: int, tensor: torch.Tensor | None, dtype: torch.dtype) -> Any:
        if tensor is None or tensor.dtype == dtype:
            return tensor
        if not self.keep:
            return tensor.detach().to(dtype)
        key = (tensor.data_ptr(), tensor._version, dtype)
        cached = self.copies.get(slot)
        if cached is None or cached[0] != key:
            cached = self.copies[slot] = (key, tensor.detach().to(dtype))
            self.sources[slot] = weakref.ref(tensor)
        return cached[1]


class FastFrozenLinear(Wrapper):
    """A frozen `nn.Linear` computing with a kept low-precision copy of its weight (see the
    module docstring); the same `weight` and `bias` parameters as the original."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self.casts = LowPrecisionCopies()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if weight.requires_grad or (bias is not None and bias.requires_grad):
            return nn.functional.linear(x, weight, bias)
        dtype = compute_dtype(x)
        return nn.functional.linear(
            x.to(dtype), self.casts.get(0, weight, dtype), self.casts.get(1, bias, dtype)
        )


class _LoraProduct(torch.autograd.Function):
    """x W^T + b + s (drop(x) A^T) B^T with W, b frozen; gradients for x, A and B."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dropped: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None,
                a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:  # fmt: skip
        dtype = weight.dtype
        a16, b16 = a.to(dtype), b.to(dtype)
        flat = x.reshape(-1, x.shape[-1])
        flat_dropped = flat if dropped is None else dropped.reshape(-1, x.shape[-1])
        xa = flat_dropped @ a16.t()
        out = nn.functional.linear(flat, weight, bias)
        out.addmm_(xa, b16.t(), alpha=scaling)
        ctx.save_for_backward(flat_dropped, xa, weight, a16, b16)
        ctx.scaling, ctx.shapes = scaling, (x.shape, a.dtype, b.dtype)
        ctx.dropout_mask = dropped is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        flat_dropped, xa, weight, a16, b16 = ctx.saved_tensors
        shape, a_dtype, b_dtype = ctx.shapes
        g = grad.reshape(-1, grad.shape[-1]).to(weight.dtype)
        gb = g @ b16  # [tokens, rank]
        grad_x = grad_dropped = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ weight
            if not ctx.dropout_mask:
                grad_x.addmm_(gb, a16, alpha=ctx.scaling)
            grad_x = grad_x.view(shape)
        if ctx.dropout_mask and ctx.needs_input_grad[1]:
            grad_dropped = (ctx.scaling * (gb @ a16)).view(shape)
        grad_a = (ctx.scaling * (gb.t() @ flat_dropped)).to(a_dtype)
        grad_b = (ctx.scaling * (g.t() @ xa)).to(b_dtype)
        return grad_x, grad_dropped, None, None, grad_a, grad_b, None


class FastLoraLinear(Wrapper):
    """A peft LoRA `Linear` (frozen `nn.Linear` base) as one fused product (see the module
    docstring); its `base_layer`, `lora_A`, `lora_B`, ... are the original's own modules."""

    def __init__(self, lora: nn.Module) -> None:
        super().__init__(lora)
        self.casts = LowPrecisionCopies()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        lora: Any = self.original  # a peft LoRA Linear
        active = lora.active_adapters
        if (
            args or kwargs or lora.disable_adapters or lora.merged or len(active) != 1
            or active[0] in lora.lora_variant or active[0] not in lora.lora_A
            or lora.base_layer.weight.requires_grad
        ):  # fmt: skip
            return lora(x, *args, **kwargs)
        name = active[0]
        base, dropout = lora.base_layer, lora.lora_dropout[name]
        dtype = compute_dtype(x)
        x = x.to(dtype)
        p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
        dropped = fast_dropout(x, p, self.training) if p > 0 and self.training else None
        weight, bias = self.casts.get(0, base.weight, dtype), self.casts.get(1, base.bias, dtype)
        return _LoraProduct.apply(x, dropped, weight, bias, lora.lora_A[name].weight, lora.lora_B[name].weight,
                                  float(lora.scaling[name]))  # fmt: skip


def lora_misfit(lora: Any) -> str | None:
    """Why a peft LoRA layer cannot run as the fused product (None: it can)."""
    base = lora.base_layer
    if type(base) is not nn.Linear:
        return f"base layer is {type(base).__name__}, not nn.Linear"
    if getattr(lora, "fan_in_fan_out", False):
        return "fan_in_fan_out weights"
    if any(b.bias is not None for b in lora.lora_B.values()):
        return "lora_B has a bias"
    if lora.lora_variant:
        return f"{', '.join(type(v).__name__ for v in lora.lora_variant.values())} variant"
    if hooked(lora, base):
        return "forward hooks on the layer"
    return None


def use_fast_linears(model: nn.Module, report: SpeedReport) -> None:
    """peft LoRA linears -> FastLoraLinear; other frozen nn.Linear layers -> FastFrozenLinear."""
    from peft.tuners.lora import Linear as LoraLinear  # (here: peft takes a while to import)

    loras: list[tuple[str, nn.Module]] = []
    misfits: list[str] = []
    inside_lora: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            inside_lora.add(id(module.base_layer))
            why = lora_misfit(module)
            if why is None:
                loras.append((name, module))
            else:
                misfits.append(f"{name}: {why}")
    frozen = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.Linear) and type(m) is nn.Linear and id(m) not in inside_lora
              and not m.weight.requires_grad and (m.bias is None or not m.bias.requires_grad) and not hooked(m)]  # fmt: skip
    for name, lora in loras:
        replace(model, name, FastLoraLinear(lora))
    for name, linear in frozen:
        replace(model, name, FastFrozenLinear(linear))
    report.add(FROZEN_LINEAR, [name for name, _ in frozen], "no frozen nn.Linear layers")
    report.add(LORA_LINEAR, [name for name, _ in loras], "no peft LoRA linear layers")
    if misfits:  # (the others may still have applied)
        report.skip(LORA_LINEAR, f"{len(misfits)} LoRA layer(s) keep peft's forward, e.g. {misfits[0]}")


def release_copied_weights(model: nn.Module) -> float:
    """`device.release_file_pages` for the frozen weights this module's layers keep low-precision
    copies of: training reads only the copies, so the float32 originals, memory-mapped from the
    model's file, need not stay resident (a merge, an export or a float32 pass maps them again).
    Returns the MB released."""
    stores = [c for m in model.modules() if isinstance(c := getattr(m, "casts", None), LowPrecisionCopies)]
    return release_file_pages([t for c in stores for t in c.copied() if not t.requires_grad])
