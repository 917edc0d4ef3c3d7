"""The memory plan (tunelab/memory.py): gradient checkpointing and token-budget micro-batches
chosen to fit `train.memory_limit_mb`, on a tiny random Llama. The process's memory is pinned
(`rss_mb`), so the plan's arithmetic, and so its choice, does not depend on the test process."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tunelab import memory
from tunelab.config import load_config, save_config
from tunelab.errors import ConfigError
from tunelab.loop import token_batches
from tunelab.methods import METHODS
from tunelab.run import build_model, load_inputs, train

from .conftest import write_tiny_llama

NOW_MB = 1000.0  # the process's memory, as the plan is told it
WORDS = ["good", "great", "fine", "nice", "bad"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("memory-plan")
    model = write_tiny_llama(folder / "llama")
    rows = [{"instruction": f"the movie {WORDS[i % 5]} was", "input": "",
             "output": " ".join(WORDS[: 1 + i % 5] * (1 + i % 4))} for i in range(24)]  # fmt: skip
    data = folder / "train.json"
    data.write_text(json.dumps(rows))
    return model, data


@pytest.fixture(autouse=True)
def pinned(monkeypatch):
    monkeypatch.setattr(memory, "rss_mb", lambda: NOW_MB)


@pytest.fixture
def remeasured(monkeypatch, measured):
    """Plans below reuse `measured`'s footprint (the same model and data) instead of measuring again."""
    monkeypatch.setattr(memory, "footprint", lambda *args: dataclasses.replace(measured.footprint))


def settings(setup, **train):
    model, data = setup
    return load_config(model=str(model), task="causal-lm", method="lora", progress_bar=False, precision="fp32",
                       data={"train": str(data)}, lora={"dropout": 0.0}, train={"batch_size": 8, **train})  # fmt: skip


@pytest.fixture(scope="module")
def built(setup):
    """The run's inputs and model, built once; each plan below is made on them."""
    config = settings(setup)
    model_path, tokenizer, task, splits = load_inputs(config)
    return config, task, splits.train, build_model(config, task, METHODS["lora"], model_path, tokenizer)


def planned(built, **train):
    config, task, rows, model = built
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, **train))
    return memory.plan_memory(model, task, rows, config, 0, torch.device("cpu"), None)


@pytest.fixture(scope="module")
def measured(built):
    """The footprint of the run, measured once (the limits below are placed around it)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(memory, "rss_mb", lambda: NOW_MB)
        plan = planned(built, memory_limit_mb=10**6)
    found = plan.footprint
    assert found is not None and found.checkpointed_per_token_mb is not None
    assert (
        0 < found.checkpointed_per_token_mb < found.saved_per_token_mb
    )  # checkpointing keeps less per token
    return plan


def test_a_high_limit_changes_nothing_and_off_plans_nothing(built, measured):
    assert not measured.gradient_checkpointing and measured.micro_batch_tokens is None
    assert measured.predicted_mb == pytest.approx(measured.whole_batches_mb)
    off = planned(built, memory_limit_mb="off")
    assert off.limit_mb is None and off.micro_batch_tokens is None and not off.gradient_checkpointing
    assert "no plan" in off.line()


def test_lower_limits_bring_micro_batches_then_checkpointing(built, measured, remeasured):
    """Micro-batches down to a quarter of the batch come first (they cost less than recomputing
    every layer), then checkpointing; each choice's predicted peak is within the limit."""
    f, tokens = measured.footprint, measured.longest_batch_tokens
    row = tokens // 8
    quarter = max(row, tokens // 4)
    assert f.peak(tokens, True) < f.peak(tokens, False)  # checkpointing keeps less
    half = f.peak(tokens // 2, False)
    plan = planned(built, memory_limit_mb=half)
    assert not plan.gradient_checkpointing and quarter <= plan.micro_batch_tokens < tokens
    assert plan.predicted_mb <= half < plan.whole_batches_mb
    below_quarter = f.peak(quarter, False) - 0.01
    plan = planned(built, memory_limit_mb=below_quarter)
    assert plan.gradient_checkpointing and plan.predicted_mb <= below_quarter
    # checkpointing turned off by the user: micro-batches alone, smaller ones
    plan = planned(built, memory_limit_mb=below_quarter, gradient_checkpointing=False)
    assert not plan.gradient_checkpointing and row <= plan.micro_batch_tokens < quarter


def test_a_limit_below_the_leanest_plan_is_refused(built, measured, remeasured):
    least = measured.footprint.peak(measured.longest_batch_tokens // 8, True)
    with pytest.raises(ConfigError) as caught:
        planned(built, memory_limit_mb=least - 0.01)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("train.memory_limit_mb:")
    assert "raise it to" in message and "train.memory_limit_mb=off" in message


def test_token_batches_keep_every_row_within_the_budget():
    rows = [{"input_ids": [1] * n} for n in (5, 9, 3, 9, 1, 7, 2, 8)]
    parts = token_batches(list(range(8)), rows, budget=18, multiple=1)
    assert sorted(i for p in parts for i in p) == list(range(8))
    assert all(len(p) * max(len(rows[i]["input_ids"]) for i in p) <= 18 for p in parts)
    assert len(parts) < 8  # rows share micro-batches where they fit
    assert token_batches([0, 1], rows, budget=4, multiple=1) == [[1], [0]]  # longer than the budget: alone


def test_micro_batched_training_has_the_same_losses(setup, measured, remeasured, tmp_path, capsys):
    """The plan's micro-batches accumulate to the whole batch: the same loss at every step."""
    f, tokens = measured.footprint, measured.longest_batch_tokens
    limit = round(f.peak(2 * tokens // 8, False), 3) + 0.001  # room for micro-batches of two rows
    losses, env = {}, {}
    for name, limit_mb in (("whole", "off"), ("micro", limit)):
        out = tmp_path / name
        overrides = [f"train.memory_limit_mb={limit_mb}", "train.gradient_checkpointing=false", "train.max_steps=3",
                     "train.log_steps=1", "generation.eval_samples=0", "generation.compare_base=false",
                     f"output_dir={out}"]  # fmt: skip
        save_config(settings(setup), tmp_path / f"{name}.yaml")
        train(tmp_path / f"{name}.yaml", overrides=overrides)
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[name] = [e["loss"] for e in lines if "split" not in e]
        env[name] = json.loads((out / "env.json").read_text())["memory"]
    assert len(losses["whole"]) == 3
    assert losses["micro"] == pytest.approx(losses["whole"], rel=1e-5)
    assert env["whole"]["micro_batch_tokens"] is None and env["whole"]["limit_mb"] is None
    assert env["micro"]["limit_mb"] == limit and not env["micro"]["gradient_checkpointing"]
    assert env["micro"]["micro_batch_tokens"] < env["micro"]["longest_batch_tokens"]
    assert env["micro"]["predicted_mb"] <= limit
    shown = [line for line in capsys.readouterr().err.splitlines() if "memory: limit" in line]
    assert shown == ["tunelab: " + env["micro"]["line"]]
    assert f"micro-batches of at most {env['micro']['micro_batch_tokens']:,} tokens" in shown[0]


def test_weight_copies_are_given_up_last(built, measured, monkeypatch):
    """The speed layer's bf16 weight copies go only where checkpointing and micro-batches of one
    example are not enough (a footprint with copies, as bf16 training has, given to the plan)."""
    given = memory.Footprint(now_mb=NOW_MB, state_mb=1.0, saved_mb=5.0, saved_per_token_mb=0.5, checkpointed_mb=1.0,
                             checkpointed_per_token_mb=0.05, copies_mb=300.0, layers=2)  # fmt: skip
    monkeypatch.setattr(memory, "footprint", lambda *args: dataclasses.replace(given))
    tokens, row = measured.longest_batch_tokens, measured.longest_batch_tokens // 8
    plan = planned(built, memory_limit_mb=given.peak(tokens, True) + 0.5)
    assert plan.gradient_checkpointing and plan.weight_copies and plan.micro_batch_tokens is None
    plan = planned(built, memory_limit_mb=given.peak(row, True) - 1)
    assert plan.gradient_checkpointing and not plan.weight_copies
    assert plan.predicted_mb <= given.peak(row, True) - 1 and "no kept bf16 weight copies" in plan.line()


def test_a_tight_limit_hands_freed_memory_back_after_every_step(setup, measured, tmp_path, monkeypatch):
    """Where the predicted peak is within `TRIM_ROOM` of the limit, the allocator's kept memory
    goes back after each optimizer step, so one step's batch shapes do not add to the next's;
    with room to spare (or no plan), never: the pages would be faulted in again for nothing."""
    import tunelab.loop

    calls = {"n": 0}
    monkeypatch.setattr(tunelab.loop, "trim", lambda: calls.__setitem__("n", calls["n"] + 1))
    monkeypatch.setattr(memory, "footprint", lambda *args: dataclasses.replace(measured.footprint))
    tight = round(measured.whole_batches_mb * 1.1, 3)
    for limit, expected in ((tight, 3), (10**6, 0), ("off", 0)):
        calls["n"] = 0
        save_config(settings(setup), tmp_path / "run.yaml")
        out = tmp_path / str(limit)
        train(tmp_path / "run.yaml", overrides=[f"train.memory_limit_mb={limit}", "train.max_steps=3",
                                                "generation.eval_samples=0", "generation.compare_base=false",
                                                f"output_dir={out}"])  # fmt: skip
        assert calls["n"] == expected
        plan = json.loads((out / "env.json").read_text())["memory"]
        assert plan["trim_steps"] == bool(expected)
        assert ("freed memory handed back after each step" in plan["line"]) == bool(expected)
