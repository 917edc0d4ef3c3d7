"""Device, precision and memory helpers (tunelab.device)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tunelab import device
from tunelab.device import cpu_calibration, measure_bf16_speedup


@pytest.fixture
def calibration_cache(tmp_path, monkeypatch):
    """A fresh cache folder of the test's own, and no calibration remembered by this process."""
    monkeypatch.setenv(device.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(device.RECALIBRATE_ENV, raising=False)
    cpu_calibration.cache_clear()
    yield tmp_path / "cache"
    cpu_calibration.cache_clear()


def avx512_cpu(monkeypatch, amx: bool = False, kernels: bool = True) -> None:
    features = {"model": "Test CPU 9000", "capability": "AVX512", "amx_bf16": amx, "avx512_bf16": True,
                "bf16_kernels": kernels}  # fmt: skip
    monkeypatch.setattr(device, "cpu_features", lambda: dict(features))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: kernels)


@pytest.mark.parametrize("speedup, expected", [(2.2, torch.bfloat16), (1.0, None), (0.55, None)])
def test_auto_precision_on_cpu_takes_bf16_only_where_it_is_faster(monkeypatch, speedup, expected):
    avx512_cpu(monkeypatch)
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: speedup)
    cpu = torch.device("cpu")
    assert device.resolve_precision("auto", cpu) is expected
    # asked for by name, bf16 is used whatever the timing says; fp32 likewise
    assert device.resolve_precision("bf16", cpu) is torch.bfloat16
    assert device.resolve_precision("fp32", cpu) is None
    # a CPU without bf16 support: auto is fp32 and no timing is taken
    avx512_cpu(monkeypatch, kernels=False)
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: pytest.fail("timed a CPU without bf16"))
    assert device.resolve_precision("auto", cpu) is None
    # AMX tiles: the features decide for bf16, and no timing is taken either
    avx512_cpu(monkeypatch, amx=True)
    assert device.resolve_precision("auto", cpu) is torch.bfloat16
    assert device.precision_used("auto", cpu)["decided_by"] == "cpu features: AMX bf16"


def test_the_calibration_is_measured_once_per_machine_and_cached(calibration_cache, monkeypatch):
    avx512_cpu(monkeypatch)
    measured = []

    def measure() -> dict:
        measured.append(1)
        return {"bf16_speedup": 2.5, "rounds": 9, "low": 2.0, "high": 3.0}

    monkeypatch.setattr(device, "measure_bf16_speedup", measure)
    first = cpu_calibration()
    assert first["source"] == "measured" and first["bf16_speedup"] == 2.5 and len(measured) == 1
    assert first["file"] == str(calibration_cache / "cpu-precision.json")
    # a new process (the per-process memory cleared) reads the file instead of timing again
    cpu_calibration.cache_clear()
    again = cpu_calibration()
    assert again["source"] == "cache" and again["bf16_speedup"] == 2.5 and len(measured) == 1
    entries = json.loads((calibration_cache / "cpu-precision.json").read_text())
    assert list(entries) == [f"Test CPU 9000 | AVX512 | torch {torch.__version__}"]
    assert entries[list(entries)[0]]["bf16_speedup"] == 2.5 and "measured_at" in entries[list(entries)[0]]
    # TUNELAB_RECALIBRATE=1 measures again and replaces the entry
    monkeypatch.setenv(device.RECALIBRATE_ENV, "1")
    cpu_calibration.cache_clear()
    assert cpu_calibration()["source"] == "measured" and len(measured) == 2
    # another torch version (or CPU model) is another entry: measured anew, the first kept
    monkeypatch.delenv(device.RECALIBRATE_ENV)
    monkeypatch.setattr(device.torch, "__version__", "9.9.9")
    cpu_calibration.cache_clear()
    assert cpu_calibration()["source"] == "measured" and len(measured) == 3
    assert len(json.loads((calibration_cache / "cpu-precision.json").read_text())) == 2
    assert [p.name for p in calibration_cache.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_damaged_or_unwritable_cache_falls_back_to_measuring(calibration_cache, monkeypatch, tmp_path):
    avx512_cpu(monkeypatch)
    monkeypatch.setattr(device, "measure_bf16_speedup", lambda: {"bf16_speedup": 0.6, "rounds": 9})
    calibration_cache.mkdir()
    (calibration_cache / "cpu-precision.json").write_text("{not json")
    assert cpu_calibration()["source"] == "measured"  # tunelab's own file, rewritten whole
    assert json.loads((calibration_cache / "cpu-precision.json").read_text())
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(device.CACHE_DIR_ENV, str(blocker / "cache"))  # a folder under a file
    cpu_calibration.cache_clear()
    calibration = cpu_calibration()
    assert calibration["bf16_speedup"] == 0.6 and calibration["source"].startswith("measured, not cached")
    assert device.resolve_precision("auto", torch.device("cpu")) is None


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(device.CACHE_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert device.calibration_path() == tmp_path / "xdg" / "tunelab" / "cpu-precision.json"
    monkeypatch.setenv(device.CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert device.calibration_path() == tmp_path / "mine" / "cpu-precision.json"


def test_the_calibration_leaves_the_seeded_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    measure_bf16_speedup(size=32, rounds=3)
    assert torch.equal(torch.rand(3), expected)  # training draws the same numbers with or without the timing


def test_the_calibration_is_the_median_of_interleaved_rounds(monkeypatch):
    # a fake clock that each product advances by a set cost: one untimed warm-up product per dtype,
    # then per round and dtype the best of three; the second round, whose float32 products were all
    # slowed 10x by load, does not move the median
    costs = {
        torch.float32: [9.0, 2.0, 2.0, 2.5, 20.0, 21.0, 20.0, 2.4, 2.5, 2.4],
        torch.bfloat16: [9.0, 1.0, 1.1, 1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.3],
    }
    clock = [0.0]

    def product(a: torch.Tensor, b: torch.Tensor) -> None:
        clock[0] += costs[a.dtype].pop(0)

    monkeypatch.setattr(device.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(device.torch, "mm", product)
    result = measure_bf16_speedup(size=4, rounds=3)
    assert result == {"bf16_speedup": 2.0, "rounds": 3, "low": 2.0, "high": 20.0}
    assert costs == {torch.float32: [], torch.bfloat16: []}  # one warm-up and three per round each


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux only")
def test_peak_rss_is_the_process_own_not_its_parents():
    import resource
    import subprocess
    import sys

    # the parent holds 1.5 GB for a moment, then starts a child: Linux hands its ru_maxrss on
    big = bytearray(1536 * 2**20)
    big[::4096] = b"\1" * len(range(0, len(big), 4096))  # touch every page
    del big
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 > 1500
    code = ("import resource; from tunelab.device import peak_rss_mb; "
            "print(peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    own, inherited = map(float, out.split())
    assert inherited > 1500  # what the child would have reported before
    assert 20 < own < 1000  # the child's own peak: Python, torch and tunelab imported


def test_env_json_says_what_auto_precision_came_to(calibration_cache, monkeypatch):
    avx512_cpu(monkeypatch)
    monkeypatch.setattr(device, "measure_bf16_speedup", lambda: {"bf16_speedup": 0.554, "rounds": 9})
    cpu = torch.device("cpu")
    used = device.precision_used("auto", cpu)
    assert used == {
        "setting": "auto",
        "used": "fp32",
        "decided_by": "calibration: bf16 at least 1.2x float32",
        "cpu": device.cpu_features(),
        "cpu_bf16_speedup": 0.55,
        "calibration": {**{k: v for k, v in cpu_calibration().items() if k != "bf16_speedup"}},
    }
    assert used["calibration"]["file"] == str(calibration_cache / "cpu-precision.json")
    assert used["calibration"]["source"] == "measured" and used["calibration"]["rounds"] == 9
    assert device.precision_used("bf16", cpu) == {"setting": "bf16", "used": "bf16"}


@pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="Linux's page map")
def test_release_file_pages_hands_back_only_a_files_own_unwritten_pages(tmp_path):
    """A tensor memory-mapped from a file (as safetensors weights are) leaves the process's
    resident memory and reads back the same; a page written in place, or memory that is no
    file's, is never released (unmapping it would lose what it holds)."""
    values = np.arange(4 * 2**20, dtype=np.float32)  # 16 MB
    path = tmp_path / "weights.bin"
    values.tofile(path)
    expected = torch.from_numpy(values.copy())
    mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="c"))  # private, copy on write
    assert torch.equal(mapped, expected)  # read: every page resident
    before = device.proc_mb("/proc/self/status", "RssFile") or 0.0
    assert device.release_file_pages([mapped]) > 15
    assert before - (device.proc_mb("/proc/self/status", "RssFile") or 0.0) > 15
    assert torch.equal(mapped, expected)  # read again, from the page cache
    mapped[10] = -1.0  # one page now the process's own copy
    assert device.release_file_pages([mapped]) == 0
    assert mapped[10] == -1.0 and torch.equal(mapped[11:], expected[11:])
    anonymous = torch.randn(2**20)
    kept = anonymous.clone()
    assert device.release_file_pages([anonymous]) == 0 and torch.equal(anonymous, kept)
