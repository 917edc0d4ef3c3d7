"""`FastDropout`: dropout with a cheap CPU mask (same drop rate to 1/32768, same expectation;
not the same random numbers as `nn.Dropout`, so not bit-for-bit the model's own dropout).

PyTorch's CPU dropout draws one Mersenne-Twister number per element (`bernoulli_`), about
1 ms for a 416 x 384 activation here, 12-15% of a MiniLM step. This one draws 63 random bits
per four elements from the same seeded generator and keeps an element when its 15 bits clear
the threshold: the drop rate is p rounded to 1/32768, and the kept values are scaled by the
exact inverse keep rate, so expectations match. The mask is kept as int16 ones and zeros (a
comparison written in place; a boolean mask costs a slower pass), and the backward pass is
one product with it. `dropout_add` fuses a residual dropout with its sum (one `addcmul`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunelab.speed.report import DROPOUT, SpeedReport
from tunelab.speed.swap import StandIn, replace


def keep_mask(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A dropout mask for `x` (int16 ones and zeros, drop rate p rounded to 1/32768) and the
    inverse keep rate to scale the kept values by."""
    n = x.numel()
    # 63 random bits per four elements: each element tests 15 of them against the threshold
    bits = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_()
    threshold = round(p * 32768)
    keep = bits.view(torch.int16)[:n].view(x.shape).bitwise_and(32767).ge_(threshold)
    return keep, 32768 / (32768 - threshold)


class _Masked(torch.autograd.Function):
    """x * keep * scale, plus `residual` when given (a dropout and the residual sum in one
    pass); keeps only the (int16) mask for the backward pass."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float, residual: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        if residual is None:
            return torch.mul(x, keep).mul_(scale)
        return torch.addcmul(residual, x, keep, value=scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (keep,) = ctx.saved_tensors
        return torch.mul(grad, keep).mul_(ctx.scale), None, None, grad if ctx.needs_input_grad[3] else None


def fast_dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Inverted dropout with the cheap mask; exact pass-through when not training or p is 0."""
    if not training or p <= 0.0:
        return x
    if p >= 1.0:
        return torch.zeros_like(x)
    keep, scale = keep_mask(x, p)
    return _Masked.apply(x, keep, scale, None)


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """residual + dropout(x), the dropout as `fast_dropout`'s."""
    if not training or p <= 0.0:
        return x + residual
    if p >= 1.0:
        return residual + x * 0
    keep, scale = keep_mask(x, p)
    return _Masked.apply(x, keep, scale, residual)


class FastDropout(StandIn, nn.Dropout):
    """nn.Dropout with the cheap CPU mask; on other devices it is plain nn.Dropout. Stands in
    for the `nn.Dropout` it was made from (`FastDropout.of`), which `undo` puts back."""

    @classmethod
    def of(cls, dropout: nn.Dropout) -> FastDropout:
        fast = cls(dropout.p, dropout.inplace)
        fast._original = (dropout,)
        fast.training = dropout.training
        return fast

    def train(self, mode: bool = True) -> FastDropout:
        super().train(mode)
        if hasattr(self, "_original"):
            self.original.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        return fast_dropout(x, self.p, self.training)


def use_fast_dropout(model: nn.Module, report: SpeedReport) -> None:
    """Swap every nn.Dropout with p > 0 for a FastDropout of the same p."""
    found = [(name, m) for name, m in model.named_modules()
             if isinstance(m, nn.Dropout) and type(m) is nn.Dropout and m.p > 0]  # fmt: skip
    for name, dropout in found:
        replace(model, name, FastDropout.of(dropout))
    report.add(DROPOUT, [name for name, _ in found], "no nn.Dropout with p > 0")
