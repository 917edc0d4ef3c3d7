"""Masked language modelling: reading text, blocks, seeded masking (fresh per batch in
training, fixed for evaluation), whole-word masking, training with every method and the
un-tuned baseline in eval.json, filling masks, and chaining a classification run from an
adapted encoder."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tunelab.config import load_config
from tunelab.errors import DataError
from tunelab.loop import frozen_cache_refusal
from tunelab.methods import METHODS
from tunelab.models import load_tokenizer
from tunelab.run import load, train
from tunelab.tasks import TASKS
from tunelab.tasks.generative import IGNORE

from .conftest import NEGATIVE, POSITIVE, write_tiny_bert

WORDS = ["stock", "price", "rose", "fell", "sharply", "market", "shares", "today", "play", "##ing", "##ed"]


@pytest.fixture(scope="module")
def mlm_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("mlm-bert"), extra_words=WORDS)


def sentences(n: int, seed: int) -> list[str]:
    """Short texts with a strong pattern ('the movie was very <adjective> .'): learnable."""
    rng = random.Random(seed)
    return [f"the {rng.choice(['movie', 'film', 'plot'])} was very {rng.choice(POSITIVE + NEGATIVE)} ."
            for _ in range(n)]  # fmt: skip


@pytest.fixture(scope="module")
def text_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("mlm-data")
    (folder / "train.txt").write_text("\n".join(sentences(400, seed=1)) + "\n")
    (folder / "validation.txt").write_text("\n".join(sentences(60, seed=2)) + "\n")
    return {"train": folder / "train.txt", "validation": folder / "validation.txt"}


def task_for(**overrides):
    return TASKS["masked-lm"](load_config(task="masked-lm", **overrides))


def settings(model: Path, out: Path, **extra) -> dict:
    return {"model": str(model), "task": "masked-lm", "method": "full", "output_dir": str(out),
            "train.batch_size": 16, "train.precision": "fp32", "train.progress_bar": False, **extra}  # fmt: skip


# ------------------------------------------------------------------------- data


def test_text_files_hold_a_document_per_line_or_per_paragraph(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("one doc here\nanother doc\nthird doc\n")
    assert [r["text"] for r in task_for().read(str(lines)).rows] == [
        "one doc here",
        "another doc",
        "third doc",
    ]
    paragraphs = tmp_path / "paragraphs.txt"
    paragraphs.write_text("first line\nof the first\n\n\nsecond doc\n\nthird\nends here\n")
    table = task_for().read(str(paragraphs))
    assert [r["text"] for r in table.rows] == ["first line\nof the first", "second doc", "third\nends here"]
    assert table.where(1).endswith("paragraphs.txt:5")


def test_a_table_reads_its_text_column_and_names_an_empty_row(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"body": "the movie"}\n{"body": ""}\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: 'body' is empty"):
        task_for(**{"data.text_column": "body"}).read(str(path))


def test_texts_are_packed_into_blocks_or_kept_per_line(mlm_bert, text_files):
    tokenizer = load_tokenizer(str(mlm_bert))
    table = task_for().read(str(text_files["validation"]))
    blocks = task_for(**{"data.block_size": 16}).encode(table, tokenizer, with_labels=False)
    assert all(len(b["input_ids"]) == 16 for b in blocks[:-1]) and len(blocks[-1]["input_ids"]) <= 16
    assert all(b["input_ids"][0] == tokenizer.cls_token_id and b["input_ids"][-1] == tokenizer.sep_token_id
               for b in blocks)  # fmt: skip
    special = set(tokenizer.all_special_ids)
    total = sum(len(tokenizer(r["text"], add_special_tokens=False)["input_ids"]) for r in table.rows)
    assert sum(t not in special for b in blocks for t in b["input_ids"]) == total  # every token kept
    rows = task_for(**{"data.packing": False}).encode(table, tokenizer, with_labels=False)
    assert len(rows) == len(table.rows)
    assert rows[0]["input_ids"] == tokenizer(table.rows[0]["text"])["input_ids"]


# ------------------------------------------------------------------------- masking


def test_evaluation_masks_are_fixed_and_training_masks_change_every_batch(mlm_bert, text_files):
    tokenizer = load_tokenizer(str(mlm_bert))
    task = task_for(**{"data.block_size": 32})
    table = task.read(str(text_files["train"]))
    first, second = (
        task.encode(table, tokenizer),
        task_for(**{"data.block_size": 32, "seed": 7}).encode(table, tokenizer),
    )
    assert [e["labels"] for e in first] == [e["labels"] for e in second]  # whatever the run's seed
    rows = task.encode(table, tokenizer, with_labels=False)
    a, b = task.collate(rows[:8], tokenizer.pad_token_id), task.collate(rows[:8], tokenizer.pad_token_id)
    assert not torch.equal(a["labels"], b["labels"])
    again = task_for(**{"data.block_size": 32})  # the same seed gives the same sequence of masks
    rows2 = again.encode(table, tokenizer, with_labels=False)
    assert torch.equal(again.collate(rows2[:8], tokenizer.pad_token_id)["labels"], a["labels"])


def test_masking_rate_and_the_80_10_10_rule(mlm_bert, text_files):
    tokenizer = load_tokenizer(str(mlm_bert))
    task = task_for(**{"data.block_size": 32, "mlm.probability": 0.15})
    rows = task.encode(task.read(str(text_files["train"])), tokenizer, with_labels=False)
    batch = task.collate(rows, tokenizer.pad_token_id)
    original = task.collate([{"input_ids": r["input_ids"]} for r in rows], tokenizer.pad_token_id)[
        "input_ids"
    ]
    chosen = batch["labels"] != IGNORE
    special = torch.isin(original, torch.tensor(tokenizer.all_special_ids))
    assert not (chosen & special).any()
    rate = chosen.sum() / (~special).sum()
    assert 0.12 < rate < 0.18
    assert torch.equal(batch["labels"][chosen], original[chosen])  # the targets are the original tokens
    masked = (batch["input_ids"][chosen] == tokenizer.mask_token_id).float().mean()
    kept = (batch["input_ids"][chosen] == original[chosen]).float().mean()
    assert 0.74 < masked < 0.86 and 0.05 < kept < 0.16


def test_whole_word_masking_masks_every_piece_of_a_word(mlm_bert, tmp_path):
    tokenizer = load_tokenizer(str(mlm_bert))
    assert tokenizer.tokenize("playing") == ["play", "##ing"]
    path = tmp_path / "w.txt"
    path.write_text("\n".join(["the movie playing played today ."] * 200) + "\n")
    task = task_for(**{"mlm.whole_word": True, "mlm.probability": 0.3, "data.packing": False})
    rows = task.encode(task.read(str(path)), tokenizer, with_labels=False)
    labels = task.collate(rows, tokenizer.pad_token_id)["labels"]
    play = rows[0]["input_ids"].index(tokenizer.convert_tokens_to_ids("play"))
    for start in (play, play + 2):  # play ##ing, play ##ed
        assert torch.equal(labels[:, start] != IGNORE, labels[:, start + 1] != IGNORE)
    assert (labels[:, play] != IGNORE).any()


# ------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def mlm_run(mlm_bert, text_files, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("mlm-run") / "run"
    return train(**settings(mlm_bert, out, **{"data.train": str(text_files["train"]),
                                              "data.validation": str(text_files["validation"]),
                                              "data.block_size": 32, "train.epochs": 4,
                                              "train.learning_rate": 3e-3}))  # fmt: skip


def test_training_lowers_the_masked_token_loss_below_the_untuned_model(mlm_run):
    report = json.loads((mlm_run.path / "eval.json").read_text())
    tuned, base = report["validation"], report["baseline"]["validation"]
    for key in ("loss", "perplexity", "accuracy", "masked_tokens"):
        assert key in tuned and key in base
    assert tuned["masked_tokens"] == base["masked_tokens"] > 0  # the same fixed masks
    assert tuned["loss"] < base["loss"] and tuned["accuracy"] > base["accuracy"]
    assert tuned["perplexity"] == pytest.approx(2.718281828 ** tuned["loss"], rel=1e-6)


def test_predict_fills_the_masks(mlm_run):
    run = load(mlm_run.path)
    [result] = run.predict(["the movie was [MASK] good ."])
    [options] = result["masks"]
    assert len(options) == run.config.mlm.top_k
    scores = [o["score"] for o in options]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-6
    assert result["filled"] == f"the movie was {options[0]['token'].removeprefix('##')} good ."
    with pytest.raises(DataError, match=r"no \[MASK\]"):
        run.predict(["no mask here"])
    done = subprocess.run([sys.executable, "-m", "tunelab", "predict", str(mlm_run.path), "the [MASK] was good ."],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "[MASK]" not in done.stdout.splitlines()[0] and len(done.stdout.splitlines()) == 2


def test_the_frozen_layer_cache_is_refused_for_fresh_masks():
    config = load_config(task="masked-lm", method="freeze")
    assert "masking" in (frozen_cache_refusal(config, TASKS["masked-lm"](config), False) or "")


def test_a_classification_run_starts_from_the_adapted_encoder(
    mlm_bert, text_files, sentiment_files, tmp_path
):
    adapted = train(**settings(mlm_bert, tmp_path / "mlm", method="lora", **{
        "data.train": str(text_files["train"]), "data.block_size": 32, "train.max_steps": 3}))  # fmt: skip
    run = train(model=str(adapted.path), method="full", output_dir=str(tmp_path / "cls"),
                train=str(sentiment_files["train"]), validation=str(sentiment_files["validation"]),
                max_steps=3, progress_bar=False, precision="fp32")  # fmt: skip
    assert (adapted.path / "encoder" / "config.json").is_file()  # the LoRA run, folded once
    assert load_config(run.path / "config.yaml").model == str(adapted.path)  # where the encoder came from
    names = [n for n, _ in run.model.named_parameters()]
    assert not any(n.startswith("cls.") for n in names) and any(n.startswith("classifier.") for n in names)
    # the encoder is the adapted one, not the original
    from transformers import AutoModel

    folded = AutoModel.from_pretrained(adapted.path / "encoder")
    original = AutoModel.from_pretrained(mlm_bert)
    key = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(folded.state_dict()[key], original.state_dict()[key])
    assert load(run.path).predict(["the movie was good"])[0]["label"] in ("negative", "positive")


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_masked_lm(method, mlm_bert, text_files, tmp_path):
    run = train(**settings(mlm_bert, tmp_path / method, method=method, **{
        "data.train": str(text_files["validation"]), "data.block_size": 24, "train.max_steps": 2,
        "prefix.num_virtual_tokens": 4, "prompt.num_virtual_tokens": 4, "freeze.trainable_layers": 1}))  # fmt: skip
    report = json.loads((run.path / "eval.json").read_text())
    assert report["validation"]["masked_tokens"] > 0 and "baseline" in report
    if METHODS[method].merge is not None and not METHODS[method].PLAIN_WEIGHTS:
        assert report["merge"]["max_abs_diff"] < 1e-4
    [result] = load(run.path).predict(["the [MASK] was good ."])
    assert len(result["masks"]) == 1
