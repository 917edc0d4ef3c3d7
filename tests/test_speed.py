"""tunelab's speed-ups compute what the model's own code computes, as wrapper modules that
keep the model's parameter names, report what applied, and go back on `undo`."""

from __future__ import annotations

import copy

import pytest
import torch

from tunelab import speed
from tunelab.config import load_config
from tunelab.methods import METHODS
from tunelab.models import load_tokenizer
from tunelab.run import build_model
from tunelab.speed import encoder as speed_encoder
from tunelab.tasks import TASKS


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
    real = speed_encoder.packed_layer

    def counted(layer, x, *args):
        calls.append(x.shape[0])  # the packed rows the layer saw
        return real(layer, x, *args)

    monkeypatch.setattr(speed_encoder, "packed_layer", counted)
    return calls


def _types(model):
    return {name: type(module) for name, module in model.named_modules()}


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
    types, keys = _types(patched), list(patched.state_dict())
    report = speed.apply(patched, task, cpu=True)
    assert report.has(speed.FIRST_TOKEN) and report.has(speed.PACKED) and report.has(speed.ATTENTION)
    assert report.applied[speed.FIRST_TOKEN][0].endswith("encoder.layer.1")
    assert list(patched.state_dict()) == keys  # the same parameter names while swapped
    assert not isinstance(patched, speed.StandIn)
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
    assert report.as_dict()["encoder_calls"].get("packed", 0) == (0 if method == "prefix" else 2)
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
    assert _types(patched) == types and list(patched.state_dict()) == keys
    with torch.no_grad():
        assert torch.allclose(reference(**batch).logits, patched(**batch).logits, atol=1e-5)


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
    report = speed.apply(patched, task, cpu=True)
    assert report.has(speed.PACKED) and not report.has(speed.FIRST_TOKEN)
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
    assert report.paths == {"packed": 1, "model's own": 1}


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
    report = speed.apply(model, task, cpu=True)
    assert not report.has(speed.FIRST_TOKEN)
    assert report.skipped[speed.FIRST_TOKEN] == "the token-classification task reads every position"
    assert "first-token last layer: the token-classification task reads every position" in report.line()


def test_full_keeps_the_word_embeddings_frozen_unless_asked(tiny_bert, sentiment_files):
    def trainable(**kw):
        config = load_config(model=str(tiny_bert), method="full", train=str(sentiment_files["train"]), **kw)
        task = TASKS["classification"](config)
        task.labels = ["negative", "positive"]
        model = build_model(config, task, METHODS["full"], str(tiny_bert), load_tokenizer(str(tiny_bert)))
        return {n for n, p in model.named_parameters() if p.requires_grad}

    default, everything = trainable(), trainable(overrides=["full.train_embeddings=true"])
    assert everything - default == {"bert.embeddings.word_embeddings.weight"}


@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_other_architectures_get_what_applies_and_the_report_says_why_not_the_rest(tmp_path, method):
    """A Llama classifier (bias-free linears, grouped-query attention): the dropout, linear and
    attention speed-ups apply and compute what the model does; the BERT-only ones say why not."""
    from .conftest import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "llama")
    tokenizer = load_tokenizer(str(folder))
    batch = tokenizer(["good movie", "the plot was very dull and the acting so bad"], padding=True,
                      return_tensors="pt")  # fmt: skip
    config = load_config(model=str(folder), method=method, overrides=["freeze.trainable_layers=1"])
    task = TASKS["classification"](config)
    task.labels = ["a", "b"]
    torch.manual_seed(0)
    reference = METHODS[method].apply(task.build_model(str(folder)), config, task)
    reference.config.pad_token_id = tokenizer.pad_token_id
    patched = copy.deepcopy(reference)
    types, keys = _types(patched), list(patched.state_dict())
    report = speed.apply(patched, task, cpu=True)
    assert report.skipped[speed.PACKED].startswith("model type llama is not BERT-family (bert, ")
    assert report.skipped[speed.FIRST_TOKEN] == report.skipped[speed.PACKED]
    assert report.has(speed.ATTENTION) and report.has(speed.FROZEN_LINEAR)
    assert report.has(speed.LORA_LINEAR) == (method == "lora")
    assert list(patched.state_dict()) == keys
    for model in (reference, patched):
        model.train()
        model(**batch).logits.pow(2).sum().backward()
    assert torch.allclose(reference(**batch).logits, patched(**batch).logits, atol=1e-5)
    for (name, a), b in zip(reference.named_parameters(), patched.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5), name
    speed.undo(patched)
    assert (
        _types(patched) == types
        and patched.config._attn_implementation == reference.config._attn_implementation
    )


def test_generative_tasks_keep_the_models_attention_and_fast_kernels_off_applies_nothing(tmp_path):
    from .conftest import write_tiny_llama

    folder = write_tiny_llama(tmp_path / "llama")
    config = load_config(model=str(folder), task="causal-lm", method="lora")
    task = TASKS["causal-lm"](config)
    model = METHODS["lora"].apply(task.build_model(str(folder)), config, task)
    report = speed.apply(model, task, cpu=True)
    assert report.skipped[speed.ATTENTION] == "generative task (generation keeps its own path)"
    assert report.has(speed.LORA_LINEAR) and model.config._attn_implementation != speed.IMPLEMENTATION
    plain = task.build_model(str(folder))
    types = _types(plain)
    off = speed.apply(plain, task, cpu=True, enabled=False)
    assert off.line() == "speed-ups: off (train.fast_kernels=false)" and off.as_dict()["applied"] == {}
    assert _types(plain) == types and speed.report_for(plain) is off


def test_wrappers_read_through_to_the_original_for_model_code_and_peft(tmp_path):
    """T5 reads its LoRA-wrapped output projection's `weight`; a wrapper that lacks an
    attribute reads the original's, so the model runs and computes what it did."""
    from .conftest import write_tiny_seq2seq

    folder = write_tiny_seq2seq(tmp_path / "t5", "t5")
    config = load_config(model=str(folder), task="seq2seq", method="lora",
                         overrides=["lora.target_modules=all-linear"])  # fmt: skip
    task = TASKS["seq2seq"](config)
    torch.manual_seed(0)
    reference = METHODS["lora"].apply(task.build_model(str(folder)), config, task)
    patched = copy.deepcopy(reference)
    report = speed.apply(patched, task, cpu=True)
    wo = patched.get_base_model().encoder.block[0].layer[-1].DenseReluDense.wo
    assert isinstance(wo, speed.FastLoraLinear) and wo.weight is wo.base_layer.weight
    assert wo.in_features == 64 and report.has(speed.LORA_LINEAR)
    ids = torch.tensor([[5, 6, 7, 3], [8, 9, 3, 0]])
    batch = {"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor([[5, 3], [6, 3]])}
    for model in (reference, patched):
        model.train()
        model(**batch).loss.backward()
    assert torch.allclose(reference(**batch).logits, patched(**batch).logits, atol=1e-5)
    for (name, a), b in zip(reference.named_parameters(), patched.parameters()):
        if a.grad is not None:
            assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_float32_weights_behind_kept_copies_go_back_to_the_page_cache(tmp_path):
    """Under bf16 autocast the frozen layers read only their kept bf16 copies: the float32
    weights, memory-mapped from the model's file, are released; the outputs stay the same, and a
    float32 read of a weight gives the file's values."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=4096, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(shape).save_pretrained(tmp_path)
    config = load_config(model=str(tmp_path), task="causal-lm", method="lora")
    task = TASKS["causal-lm"](config)
    model = METHODS["lora"].apply(task.build_model(str(tmp_path)), config, task)
    speed.apply(model, task, cpu=True)
    model.eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        before = model(input_ids=ids).logits
        assert speed.release_copied_weights(model) >= 3  # the MLP's three 1 MB weights at least
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    reference = LlamaForCausalLM.from_pretrained(tmp_path).model.layers[0].mlp.down_proj.weight
    mlp = model.get_base_model().model.layers[0].mlp
    assert torch.equal(mlp.down_proj.weight, reference)
    assert speed.release_copied_weights(model) >= 1  # the weight just read, again
