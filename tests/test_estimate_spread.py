"""`tunelab estimate` under load: each method's probe steps are timed over several repeated
passes, the epoch is the median of the passes' estimates, and their spread is reported in the
table and the JSON. (The shape of the report, not timings.)"""

from __future__ import annotations

import json

import pytest

from tunelab.estimator import REPEATS, Estimate, MethodEstimate, Step, predict

PLAN = [Step([i], tokens, [(1, tokens)], [tokens]) for i, tokens in enumerate([100, 200, 300, 400])]


def outcome(passes: list[float]) -> dict:
    """A probe of two steps (100 and 400 padded tokens) per pass; each pass's steps take the line
    0.01 s + 1 ms/token times that pass's factor (a busy machine slows a pass down)."""
    steps = [[100, 0.31, 1], [400, 1.41, 1]]  # the first pass: new shapes and warm-up
    for factor in passes:
        steps += [[100, 0.11 * factor, 0], [400, 0.41 * factor, 0]]
    return {"steps": steps, "pass_steps": 2, "memory_step_times": [], "setup_s": 0.0, "cache_s": None,
            "eval_s": 0.1, "trainable_params": 1, "total_params": 2, "peak_rss_mb": 500.0, "peak_gpu_mb": None,
            "probe_s": 1.0, "train_rows": 4, "probe_rows": 2}  # fmt: skip


def test_a_pass_slowed_by_load_moves_the_spread_not_the_median():
    row = MethodEstimate("lora", True, len(PLAN))
    predict(row, outcome([1.0, 5.0, 1.0]), PLAN, eval_scale=1.0)
    once = row.new_shape_s * row.shapes + row.warmup_s + row.setup_s
    line = 4 * 0.01 + 0.001 * 1000  # the quiet passes' line over the plan's 1,000 tokens
    assert (row.step_intercept_s, row.step_per_token_s) == pytest.approx((0.01, 0.001))
    assert row.epoch_s == pytest.approx(line + once)
    assert row.epoch_s_repeats == pytest.approx([line + once, 5 * line + once, line + once])
    assert (row.epoch_s_low, row.epoch_s_high) == pytest.approx((line + once, 5 * line + once))
    assert row.epoch_spread == pytest.approx(4 * line / (line + once))
    # the same probe on a quiet machine: the same median, no spread
    quiet = MethodEstimate("lora", True, len(PLAN))
    predict(quiet, outcome([1.0, 1.0, 1.0]), PLAN, eval_scale=1.0)
    assert quiet.epoch_s == pytest.approx(row.epoch_s) and quiet.epoch_spread == pytest.approx(0.0)


def test_table_and_json_report_the_median_and_the_spread():
    row = MethodEstimate("lora", True, len(PLAN))
    predict(row, outcome([1.0, 1.5, 1.2]), PLAN, eval_scale=1.0)
    result = Estimate(model="m", task="classification", method="lora", device="cpu", threads=1, precision="fp32",
                      train_rows=4, validation_rows=1, batch_size=1, gradient_accumulation=1, steps_per_epoch=4,
                      batch_shapes=4, longest_step_tokens=400, probe_steps=2, warmup_steps=2, methods=[row])  # fmt: skip
    lines = result.table().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    columns = lines[header].split("  ")
    assert [c.strip() for c in columns if c.strip()][2:4] == ["time/epoch", "spread"]
    cells = lines[header + 1].split()
    low, high = f"{row.epoch_s_low:.1f}", f"{row.epoch_s_high:.1f}"
    assert cells[5:7] == [f"{low}-{high}", "s"], lines[header + 1]  # "* lora 1 2.3 s 2.1-2.7 s ..."
    data = json.loads(json.dumps(result.to_dict()))
    method = data["methods"][0]
    assert data["repeats"] == REPEATS and len(method["epoch_s_repeats"]) == 3
    assert method["epoch_s_low"] <= method["epoch_s"] <= method["epoch_s_high"]
    assert method["epoch_s"] == pytest.approx(sorted(method["epoch_s_repeats"])[1])  # the median
    assert "the median of the passes' epochs" in data["basis"]
