"""tunelab's exact speed-ups compute what the model's own code computes."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tunelab import speed
from tunelab.config import load_config
from tunelab.methods import METHODS
from tunelab.models import load_tokenizer
from tunelab.run import build_model, train
from tunelab.tasks import TASKS

from .conftest import write_tiny_bert


def test_fast_dropout_rate_scale_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(400, 500, requires_grad=True)
    y = speed.fast_dropout(x, 0.1)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.1) < 0.005
    assert abs(y.mean().item() - 1.0) < 0.01  # inverted dropout keeps the expectation
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # the gradient is the same mask and scale
    torch.manual_seed(0)
    assert torch.equal(speed.fast_dropout(x.detach(), 0.1), y.detach())  # seeded: reproducible
    assert speed.fast_dropout(x, 0.1, training=False) is x
    assert (speed.fast_dropout(x, 1.0) == 0).all()
    odd = speed.fast_dropout(torch.ones(3, 5, dtype=torch.bfloat16), 0.5)
    assert odd.shape == (3, 5) and odd.dtype == torch.bfloat16


def test_dropout_add_is_the_same_dropout_in_one_pass():
    torch.manual_seed(0)
    x = torch.randn(300, 70, requires_grad=True)
    residual = torch.randn(300, 70, requires_grad=True)
    torch.manual_seed(1)
    y = speed.dropout_add(x, residual, 0.2, training=True)
    torch.manual_seed(1)
    expected = speed.fast_dropout(x.detach(), 0.2) + residual.detach()  # the same mask, drawn the same way
    assert torch.allclose(y, expected, atol=1e-6)
    kept = (expected - residual.detach()) != 0
    assert abs(1 - kept.float().mean().item() - 0.2) < 0.01
    y.backward(torch.ones_like(y))
    assert torch.equal(residual.grad, torch.ones_like(y))
    assert torch.allclose(x.grad, kept.float() * 32768 / (32768 - round(0.2 * 32768)))
    assert torch.equal(speed.dropout_add(x, residual, 0.2, training=False), x + residual)


def _classifier(tiny_bert, dropout_free):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert), num_labels=3)
    if dropout_free:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    return model


def _count_packed_layers(monkeypatch):
    calls = []
    real = speed._packed_layer

    def counted(layer, x, *args):
        calls.append(x.shape[0])  # the packed rows the layer saw
        return real(layer, x, *args)

    monkeypatch.setattr(speed, "_packed_layer", counted)
    return calls


@pytest.mark.parametrize("method", ["full", "lora", "prompt", "prefix"])
def test_cpu_attention_and_first_token_layer_match_the_model(tiny_bert, method, monkeypatch):
    packed = _count_packed_layers(monkeypatch)
    tokenizer = load_tokenizer(str(tiny_bert))
    batch = tokenizer(["good movie", "the plot was very dull and the acting so bad"], padding=True,
                      return_tensors="pt")  # fmt: skip
    config = load_config(model=str(tiny_bert), method=method)
    task = TASKS["classification"](config)
    task.labels = ["a", "b", "c"]
    reference = METHODS[method].apply(_classifier(tiny_bert, dropout_free=True), config, task)
    patched = copy.deepcopy(reference)
    speed.apply(patched, task, cpu=True)
    assert speed.first_token_last_layer(patched, task) is not None
    for model in (reference, patched):
        model.train()
        model(**batch).logits.pow(2).sum().backward()
    assert torch.allclose(reference(**batch).logits, patched(**batch).logits, atol=1e-5)
    for (name, a), b in zip(reference.named_parameters(), patched.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5), name
    # the encoder ran on the real tokens only (prefix tuning's key/value cache keeps the padded path)
    real = int(batch["attention_mask"].sum()) + (
        2 * 20 if method == "prompt" else 0
    )  # 20 virtual tokens a row
    rows = -(-real // speed.PACK_ROWS) * speed.PACK_ROWS  # rounded up with filler rows
    assert packed == ([] if method == "prefix" else [rows] * 2 * 2)  # 2 layers x 2 training forwards
    # evaluation keeps the padded layout: the model's own first layer, then the first-token layer
    reference.eval(), patched.eval()
    with torch.no_grad():
        assert torch.allclose(reference(**batch).logits, patched(**batch).logits, atol=1e-5)
    speed.undo(patched)
    assert "forward" not in vars(
        patched.get_base_model().bert.encoder if method != "full" else patched.bert.encoder
    )
    assert patched.config._attn_implementation == reference.config._attn_implementation
    assert not hasattr(patched.config, "tunelab_attention")


def test_packed_encoder_gives_token_classifiers_every_position(tiny_bert, monkeypatch):
    """Without the first-token layer, the packed encoder puts every real token back in its
    padded place (zeros at padding) for a per-token head; logits at real tokens and all
    gradients match the model's own code, and evaluation keeps the model's own path."""
    packed = _count_packed_layers(monkeypatch)
    tokenizer = load_tokenizer(str(tiny_bert))
    batch = tokenizer(["good movie", "the plot was very dull and the acting so bad"], padding=True,
                      return_tensors="pt")  # fmt: skip
    config = load_config(model=str(tiny_bert), task="token-classification")
    task = TASKS["token-classification"](config)
    task.labels = ["O", "B-X", "I-X"]
    torch.manual_seed(0)
    reference = task.build_model(str(tiny_bert))
    for module in reference.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    patched = copy.deepcopy(reference)
    speed.apply(patched, task, cpu=True)
    real = batch["attention_mask"].bool()
    outputs = []
    for model in (reference, patched):
        model.train()
        logits = model(**batch).logits
        logits[real].pow(2).sum().backward()
        outputs.append(logits[real])
    assert packed == [-(-int(real.sum()) // speed.PACK_ROWS) * speed.PACK_ROWS] * 2
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    for (name, a), b in zip(reference.named_parameters(), patched.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5), name
    patched.eval()
    with torch.no_grad():
        assert torch.allclose(reference.eval()(**batch).logits, patched(**batch).logits, atol=1e-5)
    assert len(packed) == 2


def test_hooks_inside_a_layer_keep_the_models_own_path(tiny_bert, monkeypatch):
    """The packed layer computes the attention output and feed-forward modules itself, so a
    hook on one of them sends the encoder (or the first-token layer) back to the model's code."""
    packed = _count_packed_layers(monkeypatch)
    tokenizer = load_tokenizer(str(tiny_bert))
    batch = tokenizer(["good movie", "the plot was dull"], padding=True, return_tensors="pt")
    config = load_config(model=str(tiny_bert), method="full")
    task = TASKS["classification"](config)
    task.labels = ["a", "b", "c"]
    model = METHODS["full"].apply(_classifier(tiny_bert, dropout_free=False), config, task)
    speed.apply(model, task, cpu=True)
    layers = model.bert.encoder.layer
    seen = []
    layers[0].output.register_forward_hook(lambda m, a, out: seen.append("first"))
    layers[-1].attention.output.register_forward_hook(lambda m, a, out: seen.append("last"))
    model.train()
    model(**batch)
    assert seen == ["first", "last"] and packed == []
    model.bert.encoder.layer[-1].attention.output._forward_hooks.clear()
    model(**batch)  # the last layer computes its first position again (on the padded layout)
    assert seen[2:] == ["first"] and packed == [batch["input_ids"].numel()]


def test_first_token_layer_only_for_classifiers_reading_the_first_position(tiny_bert):
    config = load_config(model=str(tiny_bert), task="token-classification")
    task = TASKS["token-classification"](config)
    task.labels = ["O", "B-X"]
    model = task.build_model(str(tiny_bert))
    assert speed.first_token_last_layer(model, task) is None


def test_full_keeps_the_word_embeddings_frozen_unless_asked(tiny_bert, sentiment_files):
    def trainable(**kw):
        config = load_config(model=str(tiny_bert), method="full", train=str(sentiment_files["train"]), **kw)
        task = TASKS["classification"](config)
        task.labels = ["negative", "positive"]
        model = build_model(config, task, METHODS["full"], str(tiny_bert), load_tokenizer(str(tiny_bert)))
        return {n for n, p in model.named_parameters() if p.requires_grad}

    default, everything = trainable(), trainable(overrides=["full.train_embeddings=true"])
    assert everything - default == {"bert.embeddings.word_embeddings.weight"}


def _freeze_run(tmp_path, folder, files, fast):
    run = train(
        model=str(folder), method="freeze", train=str(files["train"]), validation=str(files["validation"]),
        output_dir=str(tmp_path / f"run-{fast}"), progress_bar=False, precision="fp32",
        overrides=["freeze.trainable_layers=1", "train.epochs=2", f"train.fast_kernels={str(fast).lower()}"],
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
    assert "tunelab_attention" not in saved


def test_frozen_layer_cache_applies_only_to_frozen_lower_layers(tiny_bert, sentiment_files):
    config = load_config(model=str(tiny_bert), method="lora", train=str(sentiment_files["train"]))
    tokenizer = load_tokenizer(str(tiny_bert))
    task = TASKS["classification"](config)
    splits = task.load_splits(tokenizer)
    model = build_model(config, task, METHODS["lora"], str(tiny_bert), tokenizer)
    cache = speed.FrozenCache.build(model, splits.train, task.collate, 0, 64, torch.device("cpu"),
                                    torch.no_grad)  # fmt: skip
    assert cache is None  # LoRA trains inside every block: nothing below is fixed
