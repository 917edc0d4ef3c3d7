"""Every method through the same checks on a tiny random BERT: what trains, what stays frozen,
exact trainable counts, and save/load round trips."""

from __future__ import annotations

import pytest
import torch

from tunelab.config import load_config
from tunelab.methods import METHODS
from tunelab.models import count_params
from tunelab.run import load, train
from tunelab.tasks import TASKS

METHOD_NAMES = sorted(METHODS)


def tiny_model(tiny_bert, method, **kw):
    config = load_config(model=str(tiny_bert), method=method, labels=["negative", "positive"], **kw)
    task = TASKS["classification"](config)
    torch.manual_seed(0)
    return config, task, task.build_model(str(tiny_bert))


def test_lora_trainable_count_is_exact(tiny_bert):
    config, task, model = tiny_model(tiny_bert, "lora", **{"lora.rank": 4})
    hidden, inner, layers, labels = 32, 64, 2, 2
    rank = 4
    per_layer = 4 * rank * (hidden + hidden) + rank * (hidden + inner) + rank * (inner + hidden)
    pooler, head = hidden * hidden + hidden, hidden * labels + labels
    model = METHODS["lora"].apply(model, config, task)
    trainable, _ = count_params(model)
    assert trainable == layers * per_layer + pooler + head


def test_full_trains_everything(tiny_bert):
    config, task, model = tiny_model(tiny_bert, "full")
    model = METHODS["full"].apply(model, config, task)
    trainable, total = count_params(model)
    assert trainable == total


def test_lora_starts_as_the_base_model(tiny_bert):
    """B is zero at init, so the adapted model computes exactly what the base does."""
    config, task, model = tiny_model(tiny_bert, "lora")
    batch = {"input_ids": torch.tensor([[2, 5, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
        after = METHODS["lora"].apply(model, config, task).eval()(**batch).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_train_save_load_round_trip(method, tiny_bert, sentiment_files, tmp_path):
    run = train(
        model=str(tiny_bert),
        method=method,
        output_dir=str(tmp_path / method),
        train=str(sentiment_files["train"]),
        validation=str(sentiment_files["validation"]),
        epochs=1,
        progress_bar=False,
        precision="fp32",
    )
    texts = ["the movie was good", "a dull and grim film", "happy warm plot"]
    before = run.predict(texts)
    loaded = load(run.path)
    after = loaded.predict(texts)
    assert [p["label"] for p in before] == [p["label"] for p in after]
    for b, a in zip(before, after):
        for label in b["probabilities"]:
            assert a["probabilities"][label] == pytest.approx(b["probabilities"][label], abs=1e-6)
    files = {p.name for p in (run.path / "model").iterdir()}
    if method == "lora":
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert "model.safetensors" not in files
        from safetensors.torch import load_file

        saved = load_file(run.path / "model" / "adapter_model.safetensors")
        assert any("classifier" in k for k in saved), "the trained head must be saved with the adapter"
    else:
        assert "model.safetensors" in files
    assert "tokenizer.json" in files or "vocab.txt" in files


def test_lora_leaves_base_weights_bit_identical(tiny_bert, sentiment_files, tmp_path):
    config, task, base = tiny_model(tiny_bert, "lora")
    original = {k: v.clone() for k, v in base.state_dict().items()}
    run = train(
        model=str(tiny_bert),
        method="lora",
        output_dir=str(tmp_path / "r"),
        train=str(sentiment_files["train"]),
        validation=str(sentiment_files["validation"]),
        epochs=1,
        progress_bar=False,
        precision="fp32",
        seed=config.seed,
    )
    trained = run.model.get_base_model()
    changed = []
    for name, param in trained.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        key = name.replace(".base_layer", "").replace(".original_module", "")
        if key.startswith(("classifier", "bert.pooler")):
            continue  # the fresh head and the pooler train in full
        assert torch.equal(param.detach(), original[key]), name
        changed.append(key)
    assert len(changed) > 20
    lora_b = [p for n, p in trained.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b), "LoRA weights should have moved"
