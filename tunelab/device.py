"""Where and in what precision a run computes, and how much memory it took.

`pick_device` and `resolve_precision` decide the device and the autocast dtype for a config;
`autocast` enters it; `peak_rss_mb` reads the process's memory high-water mark. Used by the
loop, evaluation, estimate, compare and serve alike, so they sit below all of them.

`train.precision=auto` on a CPU is decided by the CPU's features where they settle it (no bf16
kernels: fp32; AMX: bf16) and otherwise by a calibration: how much faster bf16 matrix products
run than float32 ones on this machine, measured once (the median of interleaved repetitions)
and cached per CPU model and torch version in a small JSON file (`calibration_path`). Timing at
every start-up, as tunelab once did, swung from 1.1x to 21x on a busy machine, so the same config
and seed trained in different precisions. `TUNELAB_RECALIBRATE=1` measures again.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.errors import ConfigError

try:  # POSIX: processes calibrating at once take turns, so a machine is measured once
    import fcntl
except ImportError:  # Windows: without the lock two first runs may each measure (both are kept valid)
    fcntl = None  # type: ignore[assignment]


# The kernel library keeps what it built for each matrix-product shape (oneDNN's primitive cache and
# ideep's, 1,024 entries each by default): about 10 MB of the process's memory for each new batch
# shape that bf16 training meets, so an epoch of varied lengths held hundreds of MB. 128 entries
# hold the shapes of the steps in flight, with no loss of real tokens/s measured (benchmarks/README.md,
# "Memory plan"). Read at the kernel library's first use; a value set in the environment wins.
KERNEL_CACHE_ENTRIES = "128"
for _name in ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY"):
    os.environ.setdefault(_name, KERNEL_CACHE_ENTRIES)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# `auto` takes bf16 on a CPU only where its matrix products run at least this much faster than float32
BF16_MIN_SPEEDUP = 1.2
CACHE_DIR_ENV = "TUNELAB_CACHE_DIR"  # where the calibration is cached (default: the user's cache folder)
RECALIBRATE_ENV = "TUNELAB_RECALIBRATE"  # "1": measure again and replace the cached calibration
CALIBRATION_FILE = "cpu-precision.json"
CALIBRATION_ROUNDS = 9  # interleaved float32/bf16 pairs; their median ratio is the calibration


def cpu_features() -> dict[str, Any]:
    """What the CPU says about itself: its model, the instruction set torch dispatches to
    (`torch.backends.cpu.get_cpu_capability()`), the bf16 flags of `/proc/cpuinfo` (Linux), and
    whether oneDNN has bf16 kernels for it."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    return {
        "model": model,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "bf16_kernels": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }


def measure_bf16_speedup(size: int = 768, rounds: int = CALIBRATION_ROUNDS) -> dict[str, Any]:
    """How many times faster a bf16 matrix product (size x size x size) runs than a float32 one
    on this CPU: the median over `rounds` of the ratio of float32's time to bf16's (each the best
    of three products), the two timed back to back (in alternating order) so that a load that comes and
    goes touches both alike. Returns {"bf16_speedup", "rounds", "low", "high"}.

    Having the bf16 instructions does not make bf16 faster: on one 2-core machine here bf16
    products ran 2.2x faster than float32 (AMD, AVX-512 bf16), on another 0.55x (Intel without
    AMX, where oneDNN's bf16 kernels lose to float32 MKL), and whole training steps followed."""
    generator = torch.Generator().manual_seed(0)  # its own: the global random stream is left as it was
    a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
    pairs = {torch.float32: (a, b), torch.bfloat16: (a.to(torch.bfloat16), b.to(torch.bfloat16))}

    def timed(dtype: torch.dtype) -> float:  # the best of three: a preempted product is not the CPU's speed
        times = []
        for _ in range(3):
            began = time.perf_counter()
            torch.mm(*pairs[dtype])
            times.append(time.perf_counter() - began)
        return min(times)

    for dtype in pairs:  # each kernel's first call sets it up
        torch.mm(*pairs[dtype])
    ratios = []
    for r in range(rounds):
        if r % 2:
            bf16, fp32 = timed(torch.bfloat16), timed(torch.float32)
        else:
            fp32, bf16 = timed(torch.float32), timed(torch.bfloat16)
        ratios.append(fp32 / max(bf16, 1e-9))
    return {
        "bf16_speedup": round(statistics.median(ratios), 3),
        "rounds": rounds,
        "low": round(min(ratios), 3),
        "high": round(max(ratios), 3),
    }


def cache_dir() -> Path:
    """tunelab's per-user cache folder: $TUNELAB_CACHE_DIR, else $XDG_CACHE_HOME/tunelab, else
    ~/.cache/tunelab."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "tunelab"


def calibration_path() -> Path:
    """The file that caches this machine's bf16 calibration (one entry per CPU model and torch version)."""
    return cache_dir() / CALIBRATION_FILE


def calibration_key(features: dict[str, Any]) -> str:
    return f"{features['model']} | {features['capability']} | torch {torch.__version__}"


def read_calibrations(path: Path) -> dict[str, Any]:
    """The cached entries; an unreadable or malformed file (tunelab's own) counts as empty."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (POSIX), so that processes starting together measure once."""
    if fcntl is None:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def usable(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("bf16_speedup"), (int, float))
        and entry["bf16_speedup"] > 0
    )


def write_atomically(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(name)
        raise


@functools.cache
def cpu_calibration() -> dict[str, Any]:
    """This machine's bf16 calibration (`measure_bf16_speedup`), measured once per CPU model and
    torch version and cached in `calibration_path()`; read from there after that (and once per
    process). With TUNELAB_RECALIBRATE=1 it is measured again and the cache replaced. Where the
    cache cannot be written, the measurement is used for this process only (and says so).

    Returns the entry, plus "file" and "source" ("cache", "measured" or "measured, not cached")."""
    features, path = cpu_features(), calibration_path()
    key = calibration_key(features)
    again = os.environ.get(RECALIBRATE_ENV, "") not in ("", "0")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path.with_name(path.name + ".lock")):
            entries = read_calibrations(path)
            if usable(entries.get(key)) and not again:
                return {**entries[key], "file": str(path), "source": "cache"}
            entry = {**measure_bf16_speedup(), "cpu": features["model"], "torch": torch.__version__,
                     "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}  # fmt: skip
            entries[key] = entry
            write_atomically(path, json.dumps(entries, indent=2))
            return {**entry, "file": str(path), "source": "measured"}
    except OSError as e:
        entry = measure_bf16_speedup()
        return {**entry, "file": str(path), "source": f"measured, not cached ({e.strerror or e})"}


def cpu_bf16_speedup() -> float:
    """The calibrated bf16-over-float32 speed-up of this CPU's matrix products (`cpu_calibration`)."""
    return float(cpu_calibration()["bf16_speedup"])


def bf16_supported(device: torch.device) -> bool:
    """Whether the device has bf16 kernels at all (whether they are faster is another matter)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def auto_on_cpu() -> tuple[bool, str]:
    """Whether `auto` takes bf16 on this CPU, and what decided: its features where they settle it
    (no bf16 kernels; AMX tiles, whose bf16 products are several times float32's), else the
    cached calibration (`cpu_calibration`)."""
    if not bf16_supported(torch.device("cpu")):
        return False, "cpu features: no bf16 kernels"
    if cpu_features()["amx_bf16"]:
        return True, "cpu features: AMX bf16"
    return cpu_bf16_speedup() >= BF16_MIN_SPEEDUP, f"calibration: bf16 at least {BF16_MIN_SPEEDUP}x float32"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision`, or None for plain fp32. `auto` is bf16 on a GPU that
    supports it, and on a CPU where `auto_on_cpu` says bf16 is faster."""
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
    fast = supported if device.type != "cpu" else auto_on_cpu()[0]
    return torch.bfloat16 if fast else None


def precision_name(dtype: torch.dtype | None) -> str:
    """The short name of an autocast dtype from `resolve_precision`, as `train.precision` spells it."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def proc_mb(path: str, key: str) -> float | None:
    """A `key: N kB` line of a Linux /proc file (status, meminfo) in MB; None where there is none."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: the kernel's high-water mark for its own
    address space (`VmHWM`). Not `ru_maxrss` where that exists: Linux carries `ru_maxrss` over
    from the parent through fork and exec, so a run started by a process that had once held
    1.2 GB reported a peak of at least 1.2 GB."""
    hwm = proc_mb("/proc/self/status", "VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KB elsewhere


def precision_used(precision: str, device: torch.device) -> dict[str, Any]:
    """What `train.precision` came to on this device; for `auto` on a CPU also what decided it
    (`decided_by`), the CPU's features and, where the calibration decided, its cached entry."""
    dtype = resolve_precision(precision, device)
    used: dict[str, Any] = {"setting": precision, "used": precision_name(dtype)}
    if precision == "auto" and device.type == "cpu":
        _, used["decided_by"] = auto_on_cpu()
        used["cpu"] = cpu_features()
        if used["decided_by"].startswith("calibration"):
            calibration = cpu_calibration()
            used["cpu_bf16_speedup"] = round(float(calibration["bf16_speedup"]), 2)
            used["calibration"] = {k: v for k, v in calibration.items() if k != "bf16_speedup"}
    return used


MADV_DONTNEED = 4  # Linux's value


def release_file_pages(tensors: list[torch.Tensor]) -> float:
    """Unmap the pages of `tensors` that are their file's own (a model's weights memory-mapped
    from its safetensors file, never written since): the kernel keeps them in its page cache,
    where the memory can be reclaimed, and a later read maps them again from there (the same
    bytes, no disk read while the cache holds them). A page is released only where every page of
    the tensor is either a file's page or not resident (`/proc/self/pagemap`); a tensor with a
    page of anonymous memory (written in place, or not from a file at all) is left alone: unmapping
    it would lose what it holds. Only whole pages inside a tensor are released. Returns the MB
    released; 0 where the system has no such files (not Linux) or the tensors live elsewhere
    (a GPU). Hand-written: no library exposes `madvise` on tensors."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    try:
        pagemap = open("/proc/self/pagemap", "rb")  # noqa: SIM115 (closed below)
        madvise = libc().madvise
    except (OSError, AttributeError):
        return 0.0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    seen: set[int] = set()
    with pagemap:
        for t in tensors:
            if t.device.type != "cpu" or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            start = -(-t.data_ptr() // page) * page
            end = (t.data_ptr() + t.numel() * t.element_size()) // page * page
            if end <= start:
                continue
            pagemap.seek(start // page * 8)
            entries = np.frombuffer(pagemap.read((end - start) // page * 8), dtype=np.uint64)
            present, swapped = entries >> np.uint64(63), (entries >> np.uint64(62)) & np.uint64(1)
            file_page = (entries >> np.uint64(61)) & np.uint64(1)
            if (
                len(entries) * 8 != (end - start) // page * 8
                or swapped.any()
                or (present & ~file_page & 1).any()
            ):
                continue
            if madvise(start, end - start, MADV_DONTNEED) == 0:
                released += int(present.sum()) * page
    return released / 2**20


@functools.cache
def libc() -> Any:
    """The C library (raises OSError where there is none to load)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def trim() -> None:
    """Hand the memory that glibc's allocator keeps after frees back to the system
    (`malloc_trim`); nothing where the C library has no such call."""
    try:
        libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass
