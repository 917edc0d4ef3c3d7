"""What the speed layer did to a model: which speed-up replaced which modules, why each of the
others did not apply, and whether the frozen-layer cache was built.

`line()` is printed when training starts; `as_dict()` goes into the run's env.json ("speed").
`report_for(model)` finds the report of a model `apply` has seen (the loop adds the cache's
decision to it with `note_cache`).
"""

from __future__ import annotations

import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from torch import nn

DROPOUT = "fast dropout"
FROZEN_LINEAR = "frozen linear"
LORA_LINEAR = "fused LoRA linear"
ATTENTION = "CPU attention"
FIRST_TOKEN = "first-token last layer"
PACKED = "packed encoder"
CACHE = "frozen-layer cache"
NAMES_SHOWN = 3  # module names env.json lists per speed-up (the count says how many in all)


@dataclass
class SpeedReport:
    """The outcome of `speed.apply` on one model (see the module docstring)."""

    enabled: bool = True  # train.fast_kernels
    applied: dict[str, list[str]] = field(default_factory=dict)  # speed-up -> module names
    skipped: dict[str, str] = field(default_factory=dict)  # speed-up -> why it did not apply
    cache: dict[str, Any] = field(default_factory=lambda: {"built": False, "reason": "not attempted"})
    attention_before: str | None = None  # the attention implementation `undo` puts back
    paths: Counter[str] = field(default_factory=Counter)  # encoder calls by path (the packed encoder's)

    def add(self, speedup: str, names: list[str], why_none: str) -> None:
        """Record `speedup` as applied to `names`, or skipped for `why_none` when there are none."""
        if names:
            self.applied[speedup] = names
        else:
            self.skipped[speedup] = why_none

    def skip(self, speedup: str, reason: str) -> None:
        self.skipped[speedup] = reason

    def has(self, speedup: str) -> bool:
        return speedup in self.applied

    def note_cache(self, built: bool, reason: str) -> None:
        """The frozen-layer cache's outcome: built (and over what), or why not."""
        self.cache = {"built": built, "reason": reason}

    def line(self) -> str:
        """One line for the start of training."""
        if not self.enabled:
            return "speed-ups: off (train.fast_kernels=false)"
        done = [f"{name} ({self._where(name)})" for name in self.applied]
        line = "speed-ups: " + (", ".join(done) if done else "none")
        if self.skipped:
            line += "; not applied: " + "; ".join(f"{name}: {why}" for name, why in self.skipped.items())
        return line

    def _where(self, speedup: str) -> str:
        names = self.applied[speedup]
        return names[0] if len(names) == 1 else f"{len(names)} modules, e.g. {names[0]}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "fast_kernels": self.enabled,
            "applied": {
                name: {"count": len(names), "modules": names[:NAMES_SHOWN]}
                for name, names in self.applied.items()
            },  # fmt: skip
            "skipped": dict(self.skipped),
            CACHE: dict(self.cache),
            "encoder_calls": dict(self.paths),
        }


_REPORTS: weakref.WeakKeyDictionary[nn.Module, SpeedReport] = weakref.WeakKeyDictionary()


def report_for(model: nn.Module) -> SpeedReport:
    """The report of `model` (the one `apply` made; a new empty one if it has none yet)."""
    report = _REPORTS.get(model)
    if report is None:
        report = _REPORTS[model] = SpeedReport()
    return report


def register(model: nn.Module, report: SpeedReport) -> None:
    _REPORTS[model] = report
