"""Fine-tuning methods: what trains, how it is saved, loaded and merged.

Each method is one module satisfying the `Method` protocol below; `METHODS` is the one place
that names them. The loop and the commands never test a method's name: they read what the
method declares (`PLAIN_WEIGHTS`, `PEFT_FORMAT`, `CACHEABLE_FROZEN_LAYERS`, `VIRTUAL_TOKENS`,
`merge`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from tunelab.methods import adapter, freeze, full, ia3, lora, prefix, prompt


class Method(Protocol):
    """What every method module provides."""

    DEFAULT_LR: float  # the learning rate when train.learning_rate is not set
    PLAIN_WEIGHTS: bool  # the trained model already is plain weights: `merge` returns it as is
    PEFT_FORMAT: bool  # what trained saves as a PEFT adapter folder (export without --merge)
    CACHEABLE_FROZEN_LAYERS: bool  # the lower layers stay frozen whole (the loop may cache their outputs)
    VIRTUAL_TOKENS: bool  # trains virtual tokens ahead of every row (prefix, prompt)

    def apply(self, model: nn.Module, config: Any, task: Any) -> nn.Module:
        """Mark what trains (adding adapter modules where the method has them); the model to train."""
        ...

    def save(self, model: nn.Module, out_dir: Path) -> None:
        """Write what trained (and the head) to `out_dir` in the ecosystem's format."""
        ...

    def load(self, config: Any, task: Any, model_dir: Path) -> nn.Module:
        """Rebuild the trained model from a folder `save` wrote."""
        ...

    @property
    def merge(self) -> Callable[[nn.Module], nn.Module] | None:
        """Fold what trained into plain transformers weights; None where the maths does not allow it."""
        ...


METHODS: dict[str, Method] = {
    "full": full,
    "freeze": freeze,
    "lora": lora,
    "adapter": adapter,
    "prefix": prefix,
    "prompt": prompt,
    "ia3": ia3,
}


def plain_weights(method: Method) -> bool:
    """Whether the method's trained model already is plain weights (nothing to merge)."""
    return method.PLAIN_WEIGHTS


def mergeable(method: Method) -> bool:
    """Whether the method's trained model can be folded into plain weights."""
    return method.merge is not None
