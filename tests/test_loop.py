"""The training loop's promises, on a tiny random BERT."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tunelab.config import load_config
from tunelab.loop import fit, length_batches, make_schedule
from tunelab.models import load_tokenizer
from tunelab.run import seed_everything, train
from tunelab.tasks import TASKS

from .conftest import write_tiny_bert


def build(tiny_bert, sentiment_files, **kw):
    config = load_config(
        model=str(tiny_bert),
        train=str(sentiment_files["train"]),
        validation=str(sentiment_files["validation"]),
        progress_bar=False,
        precision="fp32",
        **kw,
    )
    tokenizer = load_tokenizer(str(tiny_bert))
    task = TASKS["classification"](config)
    splits = task.load_splits(tokenizer)
    seed_everything(config.seed)
    model = task.build_model(str(tiny_bert))
    return config, task, splits, model, tokenizer


def run_fit(config, task, model, train_rows, validation, lr=1e-3):
    log = []
    result = fit(model, task, train_rows, validation, config, lr, 0, log.append, torch.device("cpu"))
    return result, log


def test_accumulation_equals_larger_batch(tmp_path, sentiment_files):
    """4 micro-batches of 1 accumulate to the same update as one batch of 4. (SGD, because
    Adam's first step is about lr * sign(grad), which amplifies rounding in near-zero grads.)"""
    bert = write_tiny_bert(tmp_path / "bert", dropout=0.0)
    states = []
    for batch, accumulation in ((4, 1), (1, 4)):
        config, task, splits, model, _ = build(
            bert,
            sentiment_files,
            method="full",
            batch_size=batch,
            gradient_accumulation=accumulation,
            max_steps=1,
            length_bucketing=False,
            eval_each_epoch=False,
            warmup_ratio=0.0,
            optimizer="sgd",
        )
        run_fit(config, task, model, splits.train, [], lr=0.5)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    for name, value in states[0].items():
        torch.testing.assert_close(value, states[1][name], atol=2e-6, rtol=1e-4, msg=name)
    initial = task.build_model(str(bert)).state_dict()
    changed = sum(not torch.equal(initial[k], v) for k, v in states[0].items() if "classifier" not in k)
    assert changed > 10  # the step really moved the encoder weights


def test_loss_falls_when_overfitting_one_batch(tiny_bert, sentiment_files):
    config, task, splits, model, _ = build(
        tiny_bert,
        sentiment_files,
        method="full",
        batch_size=8,
        max_steps=40,
        log_steps=1,
        eval_each_epoch=False,
    )
    one_batch = splits.train[:8]
    _, log = run_fit(config, task, model, one_batch, [], lr=3e-3)
    losses = [e["loss"] for e in log if "loss" in e]
    assert len(losses) == 40
    assert losses[-1] < 0.3 * losses[0]


def test_same_seed_same_losses_and_different_seed_differs(tiny_bert, sentiment_files):
    def losses(seed):
        config, task, splits, model, _ = build(
            tiny_bert, sentiment_files, method="full", seed=seed, max_steps=6, log_steps=1
        )
        _, log = run_fit(config, task, model, splits.train, splits.validation)
        return [e["loss"] for e in log if "loss" in e]

    assert losses(3) == losses(3)
    assert losses(3) != losses(4)


def test_early_stopping_stops_after_patience(tiny_bert, sentiment_files):
    config, task, splits, model, _ = build(
        tiny_bert, sentiment_files, method="full", max_steps=20, eval_steps=1, early_stopping_patience=2
    )
    result, log = run_fit(config, task, model, splits.train, splits.validation, lr=1e-12)
    evals = [e for e in log if e.get("split") == "validation"]
    # the metric cannot improve at lr 1e-12: first eval sets the best, two more end the run
    assert result.stopped_early and result.steps == 3 and len(evals) == 3
    assert result.best_step == 1


def test_best_model_is_restored(tiny_bert, sentiment_files, tmp_path):
    run = train(
        model=str(tiny_bert),
        method="full",
        output_dir=str(tmp_path / "run"),
        train=str(sentiment_files["train"]),
        validation=str(sentiment_files["validation"]),
        epochs=6,
        eval_steps=2,
        learning_rate=5e-3,
        progress_bar=False,
        precision="fp32",
    )
    evals = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if e.get("split") == "validation"]
    best = max(e["accuracy"] for e in evals)
    report = json.loads((run.path / "eval.json").read_text())
    assert report["validation"]["accuracy"] == pytest.approx(best)
    assert report["train"]["best_metric"] == pytest.approx(best)


def test_length_buckets_cover_every_row_once_and_cut_padding():
    rng = random.Random(0)
    lengths = [rng.randint(3, 120) for _ in range(1000)]
    bucketed = length_batches(lengths, 16, random.Random(1), bucketing=True)
    plain = length_batches(lengths, 16, random.Random(1), bucketing=False)
    for batches in (bucketed, plain):
        assert sorted(i for b in batches for i in b) == list(range(1000))

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(bucketed) < 0.7 * padded(plain)
    # buckets come in shuffled order, not longest-first or shortest-first
    maxima = [max(lengths[i] for i in b) for b in bucketed]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedule_warms_up_then_decays(kind):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = make_schedule(optimizer, kind, warmup=4, total=20)
    lrs = []
    for _ in range(20):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[:5] == sorted(lrs[:5]) and lrs[0] < 0.5 and lrs[4] == pytest.approx(1.0)
    if kind == "constant":
        assert lrs[4:] == [1.0] * 16
    else:
        assert lrs[4:] == sorted(lrs[4:], reverse=True) and lrs[-1] < 0.2


def test_weight_decay_skips_biases_and_norms(tiny_bert):
    from tunelab.loop import param_groups

    config = load_config(model=str(tiny_bert), labels=["a", "b"])
    model = TASKS["classification"](config).build_model(str(tiny_bert))
    decay, exempt = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any("LayerNorm" in names[id(p)] for p in exempt["params"])
    assert all(not names[id(p)].endswith("bias") for p in decay["params"])
    assert decay["weight_decay"] == 0.01 and exempt["weight_decay"] == 0.0


def test_the_loop_never_names_a_method_or_a_task():
    """The loop knows methods and tasks only through what they declare (tunelab.methods.Method,
    tunelab.tasks.base.Task): no name of either appears in its code."""
    import ast
    import inspect

    from tunelab import loop
    from tunelab.methods import METHODS

    strings = {n.value for n in ast.walk(ast.parse(inspect.getsource(loop))) if isinstance(n, ast.Constant)}
    assert not strings & (set(METHODS) | set(TASKS)), strings & (set(METHODS) | set(TASKS))


def test_train_leaves_the_process_as_it_found_it(tiny_bert, sentiment_files, tmp_path):
    """Threads, deterministic algorithms, transformers' verbosity and progress bars, and the
    signal handlers are set for a run and put back after it."""
    import signal

    from transformers.utils import logging as hf_logging

    threads = torch.get_num_threads()
    hf_logging.set_verbosity_info()
    hf_logging.enable_progress_bar()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    seen = {}

    def spy(message):  # what the process looked like while training ran
        seen.update(threads=torch.get_num_threads(), deterministic=torch.are_deterministic_algorithms_enabled(),
                    verbosity=hf_logging.get_verbosity(), handler=signal.getsignal(signal.SIGTERM))  # fmt: skip

    from tunelab import run as run_module

    original_say = run_module.say
    run_module.say = spy
    try:
        train(model=str(tiny_bert), method="full", output_dir=str(tmp_path / "run"), train=str(sentiment_files["train"]),
              max_steps=2, progress_bar=False, precision="fp32", num_threads=1, deterministic=True)  # fmt: skip
    finally:
        run_module.say = original_say
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_warning()
    assert seen["threads"] == 1 and seen["deterministic"] and seen["verbosity"] == hf_logging.ERROR
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()
    assert verbosity == hf_logging.INFO and hf_logging.is_progress_bar_enabled()
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
