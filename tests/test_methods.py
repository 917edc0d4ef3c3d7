"""Every method through the same checks, on a tiny random BERT and a tiny random Llama:
what trains, exact trainable counts, output at init, frozen weights bit-identical after
training, save/load round trip, and merged == unmerged where the maths allows."""

from __future__ import annotations

from typing import get_args

import pytest
import torch

from tunelab.config import MethodName, load_config
from tunelab.loop import fit
from tunelab.methods import METHODS, adapter
from tunelab.methods.common import merge_checked
from tunelab.models import block_stacks, count_params, load_tokenizer
from tunelab.run import load, seed_everything, train
from tunelab.tasks import TASKS

from .conftest import write_tiny_bert, write_tiny_llama

METHOD_NAMES = list(METHODS)
IDENTITY_AT_INIT = {"full", "freeze", "lora", "adapter", "ia3"}  # prefix/prompt add new inputs
TEXTS = ["the movie was good", "a dull and grim film", "happy warm plot and it was superb"]


@pytest.fixture(scope="module", params=["bert", "llama"])
def tiny(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    return (write_tiny_bert if request.param == "bert" else write_tiny_llama)(folder)


def build(model_dir, method, **kw):
    config = load_config(model=str(model_dir), method=method, labels=["negative", "positive"],
                         progress_bar=False, precision="fp32", **kw)  # fmt: skip
    task = TASKS["classification"](config)
    seed_everything(0)
    return config, task, task.build_model(str(model_dir))


def batch_of(model_dir, texts=TEXTS):
    tokenizer = load_tokenizer(str(model_dir))
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)  # single texts: all zero, and Llama takes none
    return batch


@torch.no_grad()
def logits(model, batch):
    model.eval()
    return model(**batch).logits


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_method_trains_only_its_parameters_and_round_trips(method, tiny, sentiment_files, tmp_path):
    config, task, model = build(tiny, method, **{"freeze.trainable_layers": 1})
    batch = batch_of(tiny)
    base_out = logits(model, batch)
    model = METHODS[method].apply(model, config, task)
    if method in IDENTITY_AT_INIT:
        torch.testing.assert_close(logits(model, batch), base_out, rtol=0, atol=1e-6)

    trainable, total = count_params(model)
    assert 0 < trainable <= total
    if method != "full":
        assert trainable < 0.6 * total
    if hasattr(model, "get_nb_trainable_parameters"):  # peft's own count agrees with ours
        assert model.get_nb_trainable_parameters()[0] == trainable

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    tokenizer = load_tokenizer(str(tiny))
    examples = task.encode(task.read(str(sentiment_files["train"])), tokenizer)[:64]
    config.train.max_steps = 4
    fit(model, task, examples, [], config, 1e-2, tokenizer.pad_token_id, lambda e: None, torch.device("cpu"))
    for name, before in frozen.items():
        assert torch.equal(dict(model.named_parameters())[name].detach(), before), f"{name} moved"
    moved = [
        n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p.detach(), trained[n])
    ]
    assert moved, "nothing trained"

    out = logits(model, batch)
    METHODS[method].save(model, tmp_path / "model")
    reloaded = METHODS[method].load(config, task, tmp_path / "model")
    torch.testing.assert_close(logits(reloaded, batch), out, rtol=0, atol=1e-6)

    if METHODS[method].merge is not None:
        merged, difference = merge_checked(METHODS[method], reloaded, batch)
        assert difference < 1e-4
        assert type(merged).__name__.endswith("ForSequenceClassification")
        assert not any(n for n, _ in merged.named_modules() if "lora_" in n or "modules_to_save" in n)


def test_lora_trainable_count_is_exact(tiny_bert):
    config, task, model = build(tiny_bert, "lora", **{"lora.rank": 4})
    hidden, inner, layers, labels, rank = 32, 64, 2, 2, 4
    per_layer = 4 * rank * (hidden + hidden) + rank * (hidden + inner) + rank * (inner + hidden)
    pooler, head = hidden * hidden + hidden, hidden * labels + labels
    model = METHODS["lora"].apply(model, config, task)
    assert count_params(model)[0] == layers * per_layer + pooler + head


def test_freeze_trains_the_top_layers_and_what_sits_above_them(tiny_bert):
    config, task, model = build(tiny_bert, "freeze", **{"freeze.trainable_layers": 1})
    model = METHODS["freeze"].apply(model, config, task)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(
        n.startswith(("bert.encoder.layer.1.", "bert.pooler.", "classifier.")) for n in trained
    )
    layer = sum(p.numel() for p in model.bert.encoder.layer[1].parameters())
    above = sum(p.numel() for p in model.bert.pooler.parameters()) + sum(
        p.numel() for p in model.classifier.parameters()
    )
    assert count_params(model)[0] == layer + above


def test_adapter_finds_attention_and_ffn_outputs_by_structure(tiny_bert, tmp_path):
    _, _, bert = build(tiny_bert, "adapter")
    assert adapter.targets(bert, "houlsby")[:2] == ["bert.encoder.layer.0.attention.output.dense",
                                                    "bert.encoder.layer.0.output.dense"]  # fmt: skip
    assert adapter.targets(bert, "pfeiffer") == [f"bert.encoder.layer.{i}.output.dense" for i in range(2)]
    llama_dir = write_tiny_llama(tmp_path / "llama")
    _, _, llama = build(llama_dir, "adapter")
    assert adapter.targets(llama, "houlsby")[:2] == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.down_proj",
    ]
    config, task, bert = build(tiny_bert, "adapter", **{"adapter.reduction_factor": 8})
    bert = adapter.apply(bert, config, task)
    hidden, bottleneck = 32, 4
    per_adapter = hidden * bottleneck + bottleneck + bottleneck * hidden + hidden
    head = hidden * hidden + hidden + hidden * 2 + 2
    assert count_params(bert)[0] == 2 * 2 * per_adapter + head


def test_block_stacks_finds_the_layer_list(tiny_bert, tmp_path):
    _, _, bert = build(tiny_bert, "full")
    assert [n for n, _ in block_stacks(bert)] == ["bert.encoder.layer"]
    _, _, llama = build(write_tiny_llama(tmp_path / "llama"), "full")
    assert [n for n, _ in block_stacks(llama)] == ["model.layers"]


def test_prompt_init_text_and_dora_rslora_options(tiny_bert):
    config, task, model = build(
        tiny_bert, "prompt", **{"prompt.init_text": "the movie was", "prompt.num_virtual_tokens": 3}
    )
    model = METHODS["prompt"].apply(model, config, task)
    tokenizer = load_tokenizer(str(tiny_bert))
    ids = tokenizer("the movie was")["input_ids"][:3]  # peft keeps the special tokens: [CLS] the movie
    prompt = model.prompt_encoder["default"].embedding.weight
    torch.testing.assert_close(prompt, model.get_input_embeddings().weight[ids])
    config, task, model = build(tiny_bert, "lora", **{"lora.use_dora": True, "lora.use_rslora": True})
    model = METHODS["lora"].apply(model, config, task)
    assert any("lora_magnitude_vector" in n for n, _ in model.named_parameters())
    assert model.peft_config["default"].use_rslora


@pytest.mark.parametrize("method", ["full", "lora", "adapter"])
def test_run_directory_round_trip(method, tiny_bert, sentiment_files, tmp_path):
    run = train(model=str(tiny_bert), method=method, output_dir=str(tmp_path / method),
                train=str(sentiment_files["train"]), validation=str(sentiment_files["validation"]),
                max_steps=5, progress_bar=False, precision="fp32")  # fmt: skip
    before = run.predict(TEXTS)
    after = load(run.path).predict(TEXTS)
    for b, a in zip(before, after):
        assert a["label"] == b["label"]
        for label in b["probabilities"]:
            assert a["probabilities"][label] == pytest.approx(b["probabilities"][label], abs=1e-6)
    files = {p.name for p in (run.path / "model").iterdir()}
    expected = {
        "full": "model.safetensors",
        "lora": "adapter_model.safetensors",
        "adapter": "trained.safetensors",
    }
    assert expected[method] in files
    if method != "full":
        assert "model.safetensors" not in files, "only what trains is saved"


def test_prefix_reparameterisation_trains_through_the_mlp(tiny_bert):
    config, task, model = build(
        tiny_bert, "prefix", **{"prefix.projection": True, "prefix.num_virtual_tokens": 4}
    )
    model = METHODS["prefix"].apply(model, config, task)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("prompt_encoder" in n and "transform" in n for n in trained), trained
    batch = batch_of(tiny_bert)
    model.train()
    model(**batch).logits.sum().backward()
    assert all(
        p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "transform" in n
    )


def test_the_config_accepts_exactly_the_methods_there_are():
    """`MethodName` (what a config may say) and `METHODS` (what exists) name the same methods,
    and every method declares each capability the loop and the commands read."""
    assert list(get_args(MethodName)) == list(METHODS)
    for name, method in METHODS.items():
        for flag in ("PLAIN_WEIGHTS", "PEFT_FORMAT", "CACHEABLE_FROZEN_LAYERS", "VIRTUAL_TOKENS"):
            assert isinstance(getattr(method, flag), bool), (name, flag)
        assert not (method.PLAIN_WEIGHTS and method.PEFT_FORMAT), name  # plain weights have no adapter
