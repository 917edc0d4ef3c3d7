"""`tunelab estimate`: its predictions against a real epoch of the same config, the table and
JSON it prints, method selection and skipping, generative tasks, and option errors."""

from __future__ import annotations

import contextlib
import io
import json
import random
import re
import subprocess
import sys

import pytest

import tunelab
from tunelab.cli import main
from tunelab.estimator import MethodEstimate, Step, fit_line, memory_steps, predict, probe_rows

from .conftest import FILLER, NEGATIVE, POSITIVE, write_csv, write_tiny_llama, write_tiny_seq2seq

# One CPU thread: the machine may be busy with other work, and two OpenMP threads competing
# with another process make small steps' times swing wildly; a training run in production has
# the machine to itself.
THREADS = "train.num_threads=1"


def varied_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Reviews of 4 to 46 words, so that batches differ in length as real data's do."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = [rng.choice(FILLER) for _ in range(rng.choice([3, 5, 8, 12, 20, 30, 45]))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label == "positive" else NEGATIVE))
        rows.append({"text": " ".join(words), "label": label})
    return rows


@pytest.fixture(scope="module")
def setting(tiny_bert, tmp_path_factory):
    folder = tmp_path_factory.mktemp("estimate")
    train = write_csv(folder / "train.csv", varied_rows(1200, seed=1))
    validation = write_csv(folder / "validation.csv", varied_rows(200, seed=2))
    return folder, [f"model={tiny_bert}", f"data.train={train}", f"data.validation={validation}", THREADS]


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def estimated(setting):
    _, overrides = setting
    code, out, err = run_cli("estimate", *overrides, "method=lora", "--methods", "full", "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def measured(setting):
    """One real epoch of each method, each in its own process (its own peak RSS)."""
    folder, overrides = setting
    reports = {}
    for method in ("lora", "full"):
        out = folder / f"run-{method}"
        done = subprocess.run([sys.executable, "-m", "tunelab", "train", *overrides, f"method={method}",
                               "train.epochs=1", "train.progress_bar=false", f"output_dir={out}"],
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr
        reports[method] = json.loads((out / "eval.json").read_text())["train"]
    return reports


def test_predictions_are_close_to_a_real_epoch(estimated, measured):
    rows = {m["method"]: m for m in estimated["methods"]}
    for method, train in measured.items():
        row = rows[method]
        assert row["steps_per_epoch"] == train["steps"], "the plan is the loop's own batching"
        assert row["trainable_params"] == train["trainable_params"]
        epoch_s = train["runtime_s"] - train["eval_s"]
        print(f"{method}: epoch predicted {row['epoch_s']:.3f} s, measured {epoch_s:.3f} s; peak RSS predicted "
              f"{row['peak_rss_mb']:.0f} MB, measured {train['peak_rss_mb']:.0f} MB")  # fmt: skip
        assert 0.33 <= row["epoch_s"] / epoch_s <= 3, (method, row["epoch_s"], epoch_s)
        assert 0.8 <= row["peak_rss_mb"] / train["peak_rss_mb"] <= 1.25, (method, row, train["peak_rss_mb"])
        assert row["eval_s"] > 0 and row["timed_steps"] > 0
        # each probe pass after the first is timed on its own; the estimate is their median
        assert estimated["repeats"] == 3 and len(row["epoch_s_repeats"]) == 3
        assert row["epoch_s_low"] <= row["epoch_s"] <= row["epoch_s_high"]
        assert row["memory_steps"] > 0, "the epoch's other shapes were run"


def test_freeze_cache_pass_is_predicted_from_a_sample(setting):
    """freeze's one-time cache pass is timed on a sample of the rows and scaled to all of them;
    the prediction must be near the real run's pass (and its epoch near the real epoch)."""
    folder, overrides = setting
    freeze = [*overrides, "method=freeze", "freeze.trainable_layers=1"]
    code, out, err = run_cli("estimate", *freeze, "--methods", "freeze", "--json")
    assert code == 0, err
    row = json.loads(out)["methods"][0]
    run = folder / "run-freeze"
    done = subprocess.run([sys.executable, "-m", "tunelab", "train", *freeze, "train.epochs=1",
                           "train.progress_bar=false", f"output_dir={run}"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    train = json.loads((run / "eval.json").read_text())["train"]
    assert train["setup_s"] > 0, "the run built the cache"
    print(f"freeze: cache pass predicted {row['setup_s']:.3f} s, measured {train['setup_s']:.3f} s")
    assert 0.33 <= row["setup_s"] / train["setup_s"] <= 3, (row["setup_s"], train["setup_s"])
    assert 0.33 <= row["epoch_s"] / (train["runtime_s"] - train["eval_s"]) <= 3


def test_no_cache_pass_is_predicted_when_the_cache_would_not_fit(setting, monkeypatch):
    import torch

    from tunelab.config import load_config
    from tunelab.estimator import time_cache_pass
    from tunelab.methods import METHODS
    from tunelab.run import build_model, load_inputs
    from tunelab.speed import cache as speed_cache

    _, overrides = setting
    config = load_config(None, [*overrides, "method=freeze", "freeze.trainable_layers=1"])
    path, tokenizer, task, splits = load_inputs(config)
    model = build_model(config, task, METHODS["freeze"], path, tokenizer)
    args = (model, splits.train, task, tokenizer.pad_token_id, config, torch.device("cpu"))
    assert time_cache_pass(*args) > 0
    monkeypatch.setattr(speed_cache, "CACHE_BUDGET_MB", 0.01)  # the training run would skip the cache
    assert time_cache_pass(*args) is None


def test_json_puts_the_configured_method_first_and_says_how(estimated):
    assert [m["method"] for m in estimated["methods"]] == ["lora", "full"]
    assert [m["configured"] for m in estimated["methods"]] == [True, False]
    assert estimated["method"] == "lora" and estimated["train_rows"] == 1200 and estimated["batch_size"] == 16
    assert estimated["steps_per_epoch"] == 75 and estimated["probe_steps"] == 6
    assert "run 4 times each through the training loop" in estimated["basis"]


def test_json_reports_each_repeated_pass_and_their_spread(estimated):
    for method in estimated["methods"]:
        assert len(method["epoch_s_repeats"]) == estimated["repeats"] == 3 and method["epoch_spread"] >= 0
        assert min(method["epoch_s_repeats"]) == method["epoch_s_low"] <= method["epoch_s"]
        assert method["epoch_s"] <= method["epoch_s_high"] == max(method["epoch_s_repeats"])
        assert method["epoch_s"] in method["epoch_s_repeats"]  # the median of three is one of them


def test_precision_is_spelled_as_train_precision_and_env_json_spell_it(setting, monkeypatch):
    import torch

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    _, overrides = setting
    code, out, err = run_cli(
        "estimate",
        *overrides,
        "method=lora",
        "train.precision=bf16",
        "--methods",
        "lora",
        "--steps",
        "2",
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["precision"] == "bf16"  # as in train.precision and env.json, not "bfloat16"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "lora,bogus"], "error: --methods: unknown bogus; choose from full, freeze, lora,"),
        (["--methods", "none"], "error: --methods: unknown none ('none' trains nothing"),
        (["--steps", "0"], "error: --steps must be an integer >= 1, got 0"),
    ],
)
def test_bad_options_are_named(setting, args, message):
    _, overrides = setting
    code, _, err = run_cli("estimate", *overrides, *args)
    assert code == 2 and err.startswith(message), err


def test_config_and_data_errors_are_the_same_as_train(setting):
    _, overrides = setting
    overrides = [o for o in overrides if o != THREADS]  # train() would set this process's threads
    for bad in (["train.batch_size=0"], ["data.text_column=sentence"], ["data.train=missing.csv"]):
        train = run_cli("train", *overrides, *bad)
        estimate = run_cli("estimate", *overrides, *bad)
        assert train[0] == estimate[0] == 2 and train[2] == estimate[2] and estimate[2].startswith("error: ")


def test_table_for_causal_lm_puts_the_configured_method_first_and_says_what_was_skipped(tmp_path):
    llama = write_tiny_llama(tmp_path / "llama")
    rng = random.Random(0)
    words = ["movie", "film", "plot", "acting", "good", "great", "fine", "bad"]
    rows = [{"instruction": " ".join(rng.choices(words, k=rng.randint(2, 12))), "input": "",
             "output": " ".join(rng.choices(words, k=rng.randint(1, 10)))} for _ in range(120)]  # fmt: skip
    (tmp_path / "alpaca.json").write_text(json.dumps(rows))
    code, out, err = run_cli("estimate", f"model={llama}", "task=causal-lm", f"data.train={tmp_path / 'alpaca.json'}",
                             "data.packing=true", "data.max_length=60", THREADS, "--methods", "prefix, lora",
                             "--steps", "2")  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    pattern = r" \(causal-lm\): (\d+) training rows, 12 validation rows, batch 8; cpu, 1 thread, \w+"
    about = re.fullmatch(re.escape(str(llama)) + pattern, lines[0])
    assert about, lines[0]
    # the memory plan the probe trained with, as `train` prints it (the machine's default limit)
    assert lines[1].startswith("memory: limit ") and "(auto: this process's" in lines[1], lines[1]
    header = lines.index(next(line for line in lines if line.startswith("method")))
    assert lines[header].split() == ["method", "trainable", "params", "time/epoch", "spread", "eval", "pass",
                                     "peak", "RSS", "steps/epoch"]  # fmt: skip
    steps = -(-int(about.group(1)) // 8)  # packed rows / batch 8
    assert lines[header + 1].startswith("* lora ") and lines[header + 1].endswith(f" {steps}")
    assert " MB " in lines[header + 1] and " s " in lines[header + 1]
    assert lines[header + 2].startswith("  prefix    skipped: data.packing does not work with method=prefix")
    assert lines[header + 3] == "" and lines[header + 4].startswith(
        "* the config's method. Basis: per method, 2 "
    )
    assert len(lines) == header + 5
    assert "estimate: lora (1/2)" in err and "estimate: prefix skipped: data.packing" in err


def test_seq2seq_works(tmp_path):
    t5 = write_tiny_seq2seq(tmp_path / "t5", "t5")
    rng = random.Random(0)
    words = ["movie", "film", "plot", "acting", "good", "great", "fine", "bad"]
    rows = [{"source": " ".join(rng.choices(words, k=rng.randint(2, 15))),
             "target": " ".join(rng.choices(words, k=rng.randint(1, 8)))} for _ in range(60)]  # fmt: skip
    (tmp_path / "pairs.json").write_text(json.dumps(rows))
    result = tunelab.estimate(model=str(t5), task="seq2seq", train=str(tmp_path / "pairs.json"),
                              num_threads=1, methods=["lora"], steps=2, say=lambda m: None)  # fmt: skip
    (row,) = result.methods
    assert row.method == "lora" and row.epoch_s > 0 and row.trainable_params > 0
    assert row.steps_per_epoch == -(-result.train_rows // 8) and result.train_rows == 54


def test_fit_line_and_probe_rows():
    assert fit_line([100, 200, 300], [1.1, 2.1, 3.1]) == pytest.approx((0.1, 0.01))
    assert fit_line([100, 200, 300], [3.0, 2.0, 1.0]) == (2.0, 0.0)  # noise, not a slope
    assert fit_line([100, 100], [1.0, 3.0]) == (0.0, 0.02)  # one size: proportional
    plan = [Step([i], tokens, [(1, tokens)]) for i, tokens in enumerate([5, 50, 20, 80, 10])]
    assert probe_rows(plan, 3) == [0, 2, 3]  # the shortest, the middle, the longest
    assert probe_rows(plan, 9) == [0, 1, 2, 3, 4]


def test_memory_steps_bring_the_shapes_the_probe_did_not_see():
    # (rows, padded length) per step; real tokens decide the packed encoder's row count (64s)
    plan = [Step([0], 64, [(2, 32)], [60]), Step([1], 64, [(2, 32)], [64]), Step([2], 64, [(2, 32)], [100]),
            Step([3], 80, [(2, 40)], [70]), Step([4], 80, [(2, 40)], [80]), Step([5], 200, [(2, 100)], [190])]  # fmt: skip
    assert plan[0].keys(packed=False) == {(2, 32)} and plan[2].keys(packed=True) == {(2, 32, 2)}
    # unpacked, steps 1 and 2 repeat the probed shape and step 4 repeats step 3's
    assert memory_steps(plan, [0], packed=False, budget=1000) == {"rows": [3, 5], "steps": 2, "tokens": 280,
                                                                   "rest_tokens": 0}  # fmt: skip
    # packed, step 2 needs 2 x 64 rows where step 0 needed one: a new shape
    assert memory_steps(plan, [0], packed=True, budget=1000)["rows"] == [2, 3, 5]
    # over the budget, a step's shape counts as seen and its tokens go to the extrapolated rest
    assert memory_steps(plan, [0], packed=True, budget=150) == {"rows": [2, 3], "steps": 2, "tokens": 144,
                                                                 "rest_tokens": 200}  # fmt: skip


def test_new_shapes_cost_what_the_memory_steps_show_and_the_first_pass_counts_once():
    """Line 0.01 s + 1 ms/token; new shapes cost 0.05 s on the memory steps; the probe's first
    pass took 1.2 s more than the line (warm-up, the first touch of the largest batch's memory)."""
    plan = [Step([i], tokens, [(1, tokens)], [tokens]) for i, tokens in enumerate([100, 200, 300, 400])]
    outcome = {"steps": [[100, 0.31, 1], [400, 1.41, 1], [100, 0.11, 0], [400, 0.41, 0]],
               "memory_step_times": [[200, 0.71, 1], [200, 0.26, 1], [300, 0.36, 1]],  # the first starts its loop
               "setup_s": 0.0, "cache_s": None, "eval_s": 0.1, "trainable_params": 1, "total_params": 2,
               "peak_rss_mb": 500.0, "peak_gpu_mb": None, "probe_s": 1.0, "train_rows": 4, "probe_rows": 2,
               "memory_steps": 3, "memory_tokens": 700, "memory_rest_tokens": 0, "memory_growth_mb": 30.0}  # fmt: skip
    row = MethodEstimate("lora", True, len(plan))
    predict(row, outcome, plan, eval_scale=1.0)
    assert (row.step_intercept_s, row.step_per_token_s) == pytest.approx((0.01, 0.001))
    assert row.new_shape_s == pytest.approx(0.05) and row.shapes == 4
    assert row.warmup_s == pytest.approx(1.2 - 2 * 0.05)  # once, less the two shapes it brought
    assert row.epoch_s == pytest.approx(1.04 + 4 * 0.05 + 1.1)
    assert row.peak_rss_mb == pytest.approx(530.0)
    # without memory steps, the first pass's fresh steps give the new-shape cost, as before
    predict(row, {**outcome, "memory_step_times": []}, plan, eval_scale=1.0)
    assert row.new_shape_s == pytest.approx(0.0) and row.warmup_s == pytest.approx(1.2)


def test_estimate_is_a_plain_function_and_the_probe_a_module_entry_point():
    import inspect

    import tunelab.estimator

    assert inspect.isfunction(tunelab.estimate) and tunelab.estimate is tunelab.estimator.estimate
    done = subprocess.run([sys.executable, "-m", "tunelab.estimator"], capture_output=True, text=True)
    assert done.returncode == 2 and "usage: python -m tunelab.estimator --probe SPEC.json" in done.stderr
