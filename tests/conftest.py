"""Shared fixtures: no network, tiny random models built from configs, small data files."""

from __future__ import annotations

import csv
import os
import random
import tempfile
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# tunelab's per-user cache (the CPU's bf16 calibration) goes to a folder of this session's, not ~/.cache
os.environ["TUNELAB_CACHE_DIR"] = tempfile.mkdtemp(prefix="tunelab-test-cache-")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy", "bright", "warm"]
NEGATIVE = ["bad", "awful", "poor", "dull", "grim", "sad", "dark", "cold"]
FILLER = ["the", "movie", "was", "very", "a", "film", "plot", "and", "it", "really", "so", "acting"]


def write_tiny_bert(
    folder: Path,
    layers: int = 2,
    hidden: int = 32,
    dropout: float = 0.1,
    extra_words: list[str] | None = None,
) -> Path:
    """A random BERT with a WordPiece vocabulary of the words the test data uses."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + POSITIVE + NEGATIVE + FILLER + (extra_words or [])
    )
    vocab += [c for c in ".,!?" if c not in vocab]
    tokenizer = BertTokenizer(vocab={word: i for i, word in enumerate(vocab)})
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    import torch

    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_tiny_llama(folder: Path) -> Path:
    """A random Llama (grouped-query attention) sharing the tiny WordPiece vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    write_tiny_bert(folder)  # for the tokenizer files; the BERT weights are replaced below
    for name in ("model.safetensors", "config.json"):
        (folder / name).unlink()
    vocab = len((folder / "vocab.txt").read_text().split()) if (folder / "vocab.txt").exists() else 64
    config = LlamaConfig(
        vocab_size=max(vocab, 64),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    _set_special_tokens(folder, bos_token="[CLS]", eos_token="[SEP]")
    return folder


def _set_special_tokens(folder: Path, **tokens: str) -> None:
    """Give the WordPiece tokenizer the bos/eos tokens the generative configs point at."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.add_special_tokens(tokens)
    tokenizer.save_pretrained(folder)


def write_tiny_seq2seq(folder: Path, kind: str) -> Path:
    """A random T5 or BART encoder-decoder sharing the tiny WordPiece vocabulary ([PAD]=0,
    [CLS]=2 as bos, [SEP]=3 as eos; the decoder starts from [PAD] as T5 does, [CLS] for BART)."""
    import torch
    from transformers import BartConfig, BartForConditionalGeneration, T5Config, T5ForConditionalGeneration

    write_tiny_bert(folder)
    for name in ("model.safetensors", "config.json"):
        (folder / name).unlink()
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(folder))
    ids = {"pad_token_id": 0, "eos_token_id": 3, "decoder_start_token_id": 0 if kind == "t5" else 2}
    if kind == "t5":
        config = T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          dropout_rate=0.0, **ids)  # fmt: skip
        model = T5ForConditionalGeneration
    else:
        config = BartConfig(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                            decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0, bos_token_id=2,
                            forced_eos_token_id=None, **ids)  # fmt: skip
        model = BartForConditionalGeneration
    torch.manual_seed(0)
    model(config).save_pretrained(folder)
    _set_special_tokens(folder, bos_token="[CLS]", eos_token="[SEP]")
    return folder


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Synthetic reviews whose label is decided by one sentiment word among fillers."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == "positive" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sentiment")
    return {
        "train": write_csv(folder / "train.csv", sentiment_rows(400, seed=1)),
        "validation": write_csv(folder / "validation.csv", sentiment_rows(32, seed=2)),
        "test": write_csv(folder / "test.csv", sentiment_rows(32, seed=3)),
    }


@pytest.fixture
def shared_data() -> Path:
    """The real datasets (SST-2, AG News, CoNLL-2003, Alpaca) kept beside the project in
    ../shared/data: the one way a test reaches them. Where they are absent (a plain clone),
    the test is skipped and says so."""
    if not SHARED_DATA.is_dir():
        pytest.skip(
            f"needs the real datasets at {SHARED_DATA} (kept beside the project, not in the repository)"
        )
    return SHARED_DATA
