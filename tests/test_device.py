"""Device, precision and memory helpers (tunelab.device)."""

from __future__ import annotations

import pytest
import torch

from tunelab import device
from tunelab.device import cpu_bf16_speedup


@pytest.mark.parametrize("speedup, expected", [(2.2, torch.bfloat16), (1.0, None), (0.55, None)])
def test_auto_precision_on_cpu_takes_bf16_only_where_it_is_faster(monkeypatch, speedup, expected):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: speedup)
    cpu = torch.device("cpu")
    assert device.resolve_precision("auto", cpu) is expected
    # asked for by name, bf16 is used whatever the timing says; fp32 likewise
    assert device.resolve_precision("bf16", cpu) is torch.bfloat16
    assert device.resolve_precision("fp32", cpu) is None
    # a CPU without bf16 support: auto is fp32 and no timing is taken
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: pytest.fail("timed a CPU without bf16"))
    assert device.resolve_precision("auto", cpu) is None


def test_bf16_speedup_is_timed_once_per_process_and_leaves_the_seeded_stream_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    cpu_bf16_speedup.cache_clear()
    first = cpu_bf16_speedup()
    assert torch.equal(torch.rand(3), expected)  # training draws the same numbers with or without the timing
    assert cpu_bf16_speedup() is first  # cached: every later call in the process agrees
    cpu_bf16_speedup.cache_clear()


def test_bf16_speedup_is_the_ratio_of_the_best_float32_and_bf16_timings(monkeypatch):
    # a fake clock that each product advances by a set cost: the first call of each dtype
    # is the untimed warm-up, then the best of `repeats` timed calls counts
    costs = {torch.float32: [10.0, 3.0, 2.0, 2.5, 2.0, 4.0], torch.bfloat16: [10.0, 1.0, 0.5, 0.8, 1.0, 0.6]}
    clock = [0.0]

    def product(a: torch.Tensor, b: torch.Tensor) -> None:
        clock[0] += costs[a.dtype].pop(0)

    monkeypatch.setattr(device.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(device.torch, "mm", product)
    cpu_bf16_speedup.cache_clear()
    try:
        assert cpu_bf16_speedup(size=4, repeats=5) == 2.0 / 0.5
        assert costs == {torch.float32: [], torch.bfloat16: []}  # one warm-up and five timed calls each
    finally:
        cpu_bf16_speedup.cache_clear()


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


def test_env_json_says_what_auto_precision_came_to(monkeypatch):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(device, "cpu_bf16_speedup", lambda: 0.55)
    cpu = torch.device("cpu")
    assert device.precision_used("auto", cpu) == {"setting": "auto", "used": "fp32", "cpu_bf16_speedup": 0.55}
    assert device.precision_used("bf16", cpu) == {"setting": "bf16", "used": "bf16"}
