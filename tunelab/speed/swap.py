"""Module swapping, the way PEFT swaps layers: a wrapper module takes another module's place
in the model (`setattr` on its parent) and `undo` puts the original back.

A `Wrapper` registers the original's own parameters, buffers and child modules under the
same names (the same objects, not copies), so the model's parameter names, `state_dict`
keys and values, and any optimizer built before the swap are unchanged. The original is kept
outside the module tree, to call where a speed-up does not apply and to put back on `undo`.
Reading an attribute the wrapper lacks reads the original's (model code reads its layers'
attributes: T5 checks `self.wo.weight.dtype`, peft's LoRA layer has `weight`, `merge`, ...),
as PEFT's own wrappers forward attribute reads to the model they wrap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn


class StandIn:
    """A module that stands in for another (its `original`) at that module's place."""

    _original: tuple[nn.Module]  # in a tuple: an attribute, not a registered child module

    @property
    def original(self) -> nn.Module:
        return self._original[0]


class Wrapper(StandIn, nn.Module):
    """Base of the speed layer's wrappers: holds `original`'s parameters, buffers and
    children as its own (see the module docstring) and keeps its train/eval mode in step."""

    def __init__(self, original: nn.Module) -> None:
        super().__init__()
        # (the dicts themselves: a parameter, buffer or child may be None, as a Linear's bias)
        for name, parameter in original._parameters.items():
            self.register_parameter(name, parameter)
        for name, buffer in original._buffers.items():
            self.register_buffer(name, buffer, persistent=name not in original._non_persistent_buffers_set)
        for name, child in original._modules.items():
            self.add_module(name, child)
        self._original = (original,)
        self.training = original.training

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # this module's parameters, buffers and children
        except AttributeError:
            if name == "_original" or "_original" not in self.__dict__:  # (being built or copied)
                raise
            return getattr(self._original[0], name)

    def train(self, mode: bool = True) -> Wrapper:
        super().train(mode)
        self.original.training = mode  # its children are this module's own: already set
        return self

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Wrapper:
        super()._apply(fn, recurse)
        self.hand_back()  # a device move gives buffers (and some conversions parameters) new tensors
        return self

    def hand_back(self) -> None:
        """Give the original the parameters, buffers and children this module holds now, where
        they have been replaced since the swap (a conversion, `load_state_dict(assign=True)`)."""
        original = self.original
        for kind in ("_parameters", "_buffers", "_modules"):
            mine, theirs = getattr(self, kind), getattr(original, kind)
            for name, value in mine.items():
                if theirs.get(name) is not value:
                    setattr(original, name, value)


def base_of(model: Any) -> Any:
    """The transformers model inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def replace(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at `name` (dotted, relative to `root`) in place of what is there."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def put_back(root: nn.Module, name: str, stand_in: StandIn) -> None:
    """Put `stand_in`'s original back at `name`, if `stand_in` is still there."""
    parent, _, child = name.rpartition(".")
    try:
        holder = root.get_submodule(parent) if parent else root
    except AttributeError:
        return
    if getattr(holder, child, None) is stand_in:
        if isinstance(stand_in, Wrapper):
            stand_in.hand_back()
        setattr(holder, child, stand_in.original)


def name_of(root: nn.Module, target: nn.Module) -> str | None:
    """The dotted name of `target` inside `root`, or None."""
    return next((name for name, module in root.named_modules() if module is target), None)


def put_all_back(root: nn.Module) -> int:
    """Put every stand-in inside `root` back to its original; returns how many."""
    found = [(name, module) for name, module in root.named_modules() if isinstance(module, StandIn)]
    for name, module in found:
        put_back(root, name, module)
    return len(found)


def hooked(*modules: Any) -> bool:
    """Whether any of `modules` has forward hooks (a wrapper that computes their forward
    itself would skip them)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
