"""freeze's frozen-layer cache: what it computes (no dropout in the frozen layers), that the
config key turns it on and off, and that the report and env.json say which path ran."""

from __future__ import annotations

import json

import torch

from tunelab import speed
from tunelab.config import load_config
from tunelab.loop import fit
from tunelab.methods import METHODS
from tunelab.models import load_tokenizer
from tunelab.run import build_model, train
from tunelab.tasks import TASKS

from .conftest import write_tiny_bert


def _freeze_run(tmp_path, folder, files, fast):
    run = train(
        model=str(folder), method="freeze", train=str(files["train"]), validation=str(files["validation"]),
        output_dir=str(tmp_path / f"run-{fast}"), progress_bar=False, precision="fp32",
        overrides=["freeze.trainable_layers=1", "train.epochs=2", f"train.fast_kernels={str(fast).lower()}",
                   f"train.cache_frozen_layers={str(fast).lower()}"],
    )  # fmt: skip
    return run, json.loads((run.path / "eval.json").read_text())


def test_frozen_layer_cache_trains_the_same_model(tmp_path, sentiment_files):
    """Without dropout the frozen layers compute the same in train and eval mode, so caching
    their outputs must give the same trained model as running them every step."""
    folder = write_tiny_bert(tmp_path / "bert3", layers=3, dropout=0.0)
    slow, slow_report = _freeze_run(tmp_path, folder, sentiment_files, fast=False)
    fast, fast_report = _freeze_run(tmp_path, folder, sentiment_files, fast=True)
    trained = {n: p for n, p in slow.model.named_parameters() if p.requires_grad}
    assert trained and {n for n, p in fast.model.named_parameters() if p.requires_grad} == set(trained)
    for name, p in fast.model.named_parameters():
        if name in trained:
            assert torch.allclose(p, trained[name], atol=1e-4), name
    assert fast_report["validation"]["accuracy"] == slow_report["validation"]["accuracy"]
    saved = json.loads((fast.path / "model" / "config.json").read_text())
    assert "tunelab_attention" not in saved and "_attn_implementation" not in saved
    # env.json says what ran: the speed-ups and the cache, or neither
    fast_env, slow_env = (json.loads((r.path / "env.json").read_text())["speed"] for r in (fast, slow))
    assert fast_env["fast_kernels"] and fast_env["frozen-layer cache"]["built"]
    assert fast_env["applied"]["packed encoder"] == {"count": 1, "modules": ["bert.encoder"]}
    assert fast_report["train"]["cache_mb"] > 0 and slow_report["train"]["cache_mb"] == 0
    assert not slow_env["fast_kernels"] and slow_env["applied"] == {}
    assert not slow_env["frozen-layer cache"]["built"]


def test_frozen_layer_cache_applies_only_to_frozen_lower_layers(tiny_bert, sentiment_files):
    config = load_config(model=str(tiny_bert), method="lora", train=str(sentiment_files["train"]))
    tokenizer = load_tokenizer(str(tiny_bert))
    task = TASKS["classification"](config)
    splits = task.load_splits(tokenizer)
    model = build_model(config, task, METHODS["lora"], str(tiny_bert), tokenizer)
    cache = speed.FrozenCache.build(model, splits.train, task.collate, 0, 64, torch.device("cpu"),
                                    torch.no_grad)  # fmt: skip
    assert cache is None  # LoRA trains inside every block: nothing below is fixed
    assert speed.report_for(model).cache == {
        "built": False,
        "reason": "the first block trains: no frozen lower block",
    }


def test_cache_stands_in_for_the_frozen_layers_and_close_puts_them_back(tmp_path, sentiment_files):
    folder = write_tiny_bert(tmp_path / "bert3", layers=3)
    config = load_config(model=str(folder), method="freeze", train=str(sentiment_files["train"]),
                         overrides=["freeze.trainable_layers=1"])  # fmt: skip
    tokenizer = load_tokenizer(str(folder))
    task = TASKS["classification"](config)
    splits = task.load_splits(tokenizer)
    model = build_model(config, task, METHODS["freeze"], str(folder), tokenizer)
    keys = list(model.state_dict())
    types = {name: type(m) for name, m in model.named_modules()}
    cache = speed.FrozenCache.build(model, splits.train, task.collate, 0, 64, torch.device("cpu"),
                                    torch.no_grad)  # fmt: skip
    assert cache is not None and cache.table.shape == (sum(len(e["input_ids"]) for e in splits.train) + 1, 32)
    assert isinstance(model.bert.embeddings, speed.CachedEntry)
    assert [type(b) for b in model.bert.encoder.layer][:2] == [speed.CachedBlock] * 2
    assert list(model.state_dict()) == keys
    cache.close()
    assert {name: type(m) for name, m in model.named_modules()} == types


def test_dropout_in_frozen_layers_runs_only_without_the_cache(tmp_path, sentiment_files):
    """With dropout (0.1), the cache is a different computation: the first trained block gets
    the same input in every training forward over a row (the frozen layers ran once, without
    dropout); with `train.cache_frozen_layers` off they run every step, with dropout."""
    folder = write_tiny_bert(tmp_path / "bert3", layers=3, dropout=0.1)
    tokenizer = load_tokenizer(str(folder))

    def first_trained_block_inputs(cache: bool) -> tuple[list[torch.Tensor], speed.SpeedReport, float]:
        config = load_config(model=str(folder), method="freeze", train=str(sentiment_files["train"]),
                             overrides=["freeze.trainable_layers=1", "train.max_steps=2", "train.batch_size=1",
                                        f"train.cache_frozen_layers={str(cache).lower()}", "train.precision=fp32",
                                        "train.progress_bar=false", "train.eval_each_epoch=false"])  # fmt: skip
        task = TASKS["classification"](config)
        row = task.load_splits(tokenizer).train[:1]  # one row: both steps train on it
        model = build_model(config, task, METHODS["freeze"], str(folder), tokenizer)
        inputs: list[torch.Tensor] = []
        block = model.bert.encoder.layer[2]
        block.register_forward_pre_hook(
            lambda m, a: inputs.append(a[0].detach().clone()) if m.training else None
        )
        result = fit(model, task, row, [], config, 1e-3, tokenizer.pad_token_id, lambda entry: None)
        return inputs, speed.report_for(model), result.setup_s

    cached, report, setup_s = first_trained_block_inputs(cache=True)
    assert len(cached) == 2 and torch.equal(cached[0], cached[1])  # no dropout below: the same features
    assert report.cache["built"] and setup_s > 0  # the cache pass ran
    assert report.cache["reason"].startswith("2 frozen blocks over 1 rows")
    uncached, report, setup_s = first_trained_block_inputs(cache=False)
    assert len(uncached) == 2 and not torch.equal(
        uncached[0], uncached[1]
    )  # dropout ran in the frozen layers
    assert not report.cache["built"] and setup_s == 0
