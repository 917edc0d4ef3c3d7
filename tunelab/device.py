"""Where and in what precision a run computes, and how much memory it took.

`pick_device` and `resolve_precision` decide the device and the autocast dtype for a config;
`autocast` enters it; `peak_rss_mb` reads the process's memory high-water mark. Used by the
loop, evaluation, estimate, compare and serve alike, so they sit below all of them.
"""

from __future__ import annotations

import functools
import resource
import sys
import time
from contextlib import nullcontext
from typing import Any

import torch

from tunelab.errors import ConfigError


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


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


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


def precision_used(precision: str, device: torch.device) -> dict[str, Any]:
    """What `train.precision` came to on this device, and for `auto` on a CPU the timing behind it."""
    dtype = resolve_precision(precision, device)
    used: dict[str, Any] = {"setting": precision, "used": precision_name(dtype)}
    if precision == "auto" and device.type == "cpu" and bf16_supported(device):
        used["cpu_bf16_speedup"] = round(cpu_bf16_speedup(), 2)
    return used
