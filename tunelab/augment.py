"""EDA text augmentation for classification, with synonyms from the model's own embeddings.

EDA (Wei & Zou, 2019, "EDA: Easy Data Augmentation Techniques for Boosting Performance on
Text Classification Tasks", EMNLP) makes new training rows from each original with one of
four edits: synonym replacement, random insertion (of a synonym of some word), random swap
and random deletion. EDA takes its synonyms from WordNet; here they are the nearest
neighbours of a word among the model's own whole-word vocabulary tokens, by cosine
similarity of the input embeddings, so no word list is needed and nothing is downloaded.

It is written here rather than taken from nlpaug or textattack because those pull in large
dependencies, or word lists and models that must be downloaded, and EDA is ~100 lines.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data import Table
from tunelab.errors import ConfigError, DataError
from tunelab.models import load_tokenizer, quiet_transformers, resolve_model

OPERATIONS = ("synonym", "insert", "swap", "delete")

# Function words that carry no meaning worth replacing and make poor synonyms (EDA skips
# stopwords too). Words under 3 letters are skipped by length, so they are not listed.
STOPWORDS = frozenset(
    """
    the and but for nor yet with from into onto upon about above after again against all any
    are was were been being have has had having does did doing this that these those them they
    their theirs there then than what which who whom whose when where why how not only own same
    some such too very can will just should would could our ours you your yours his her hers him
    its she himself herself itself myself yourself yourselves ourselves themselves each few more
    most other both because while until out off over under through during before below between
    down further here once also may might must shall isn aren wasn weren hasn haven hadn doesn
    didn won wouldn shouldn couldn mustn let per via within without among whether
    """.split()
)

# A whitespace-separated word: leading punctuation, an alphabetic core, trailing punctuation.
_WORD = re.compile(r"^([^A-Za-z]*)([A-Za-z]+)([^A-Za-z]*)$")
_WORD_START_MARKERS = ("Ġ", "▁")  # byte-level BPE (GPT-2) and SentencePiece (Llama) word starts


@dataclass
class AugmentOptions:
    """How many augmented rows to make and how strongly each EDA operation edits a text.

    `p_delete` is EDA's per-word deletion probability; the other three are the share of the
    words an operation changes. Every operation changes max(1, round(p * n_words)) words at
    least (deletion: each word with probability `p_delete`, and at least one); an operation
    whose probability is 0 is never used.
    """

    factor: int = 2  # new rows per original row (the original is kept too)
    p_delete: float = 0.1  # per-word probability (EDA's alpha) for random deletion
    p_swap: float = 0.1  # share of words swapped
    p_insert: float = 0.1  # share of words inserted (synonym of a random word, at a random place)
    p_synonym: float = 0.1  # share of words replaced by a synonym
    seed: int = 42

    def __post_init__(self) -> None:
        if not isinstance(self.factor, int) or isinstance(self.factor, bool) or self.factor < 0:
            raise ConfigError(f"augment factor must be a whole number >= 0, got {self.factor!r}")
        for name in ("p_delete", "p_swap", "p_insert", "p_synonym"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"augment {name} must be between 0 and 1, got {value!r}")

    def probability(self, operation: str) -> float:
        return float(getattr(self, f"p_{operation}"))


def _is_trivial_variant(a: str, b: str) -> bool:
    """Same word up to case or a trailing 's' (good/Good/goods)."""
    a, b = a.lower(), b.lower()
    return a == b or a == b + "s" or b == a + "s"


class EmbeddingSynonyms:
    """Nearest neighbours of a word among the model's whole-word vocabulary tokens, by cosine
    similarity of the input embeddings.

    Whole-word tokens are alphabetic, at least 3 letters long, not special tokens, not
    WordPiece continuations (`##...`) and not stopwords. In byte-level BPE or SentencePiece
    vocabularies (most tokens start with 'Ġ' or '▁') only tokens with that word-start marker
    count, with the marker stripped. A lowercasing tokenizer (`do_lower_case`) only ever
    produces lowercase tokens, so only those count, and lookups lowercase the word. Lookups
    are cached.
    """

    def __init__(
        self, tokenizer: Any, embeddings: torch.Tensor, k: int = 8, min_similarity: float = 0.0
    ) -> None:
        """
        Args:
            tokenizer: a Hugging Face tokenizer (only its vocabulary and special tokens are used).
            embeddings: the input-embedding matrix, one row per token id.
            k: at most this many neighbours per word.
            min_similarity: neighbours below this cosine similarity are dropped.
        """
        if k < 1:
            raise ConfigError(f"k must be >= 1, got {k}")
        self.k = k
        self.min_similarity = min_similarity
        self.lowercase = bool(getattr(tokenizer, "do_lower_case", False))
        vocab: dict[str, int] = tokenizer.get_vocab()
        special = set(getattr(tokenizer, "all_special_tokens", []))
        marked = sum(token.startswith(_WORD_START_MARKERS) for token in vocab)
        byte_level = marked > 0.1 * max(len(vocab), 1)
        rows = embeddings.shape[0]
        words: dict[str, int] = {}  # word -> token id
        for token, index in sorted(vocab.items(), key=lambda item: item[1]):
            if token in special or index >= rows:
                continue
            if byte_level:
                if not token.startswith(_WORD_START_MARKERS):
                    continue  # a word-internal piece
                token = token[1:]
            if self.lowercase and not token.islower():
                continue  # never produced by a lowercasing tokenizer
            if len(token) >= 3 and token.isascii() and token.isalpha() and token.lower() not in STOPWORDS:
                words.setdefault(token, index)
        self.words = list(words)
        self._index = {word: i for i, word in enumerate(self.words)}
        ids = torch.tensor(list(words.values()), dtype=torch.long)
        matrix = embeddings.detach()[ids].float() if len(ids) else torch.zeros(0, embeddings.shape[1])
        self._unit = torch.nn.functional.normalize(matrix, dim=1)
        self._cache: dict[str, list[str]] = {}

    @classmethod
    def from_model_path(cls, path: str, **kw: Any) -> EmbeddingSynonyms:
        """Load the tokenizer and input-embedding matrix of the model at `path`.

        `path` is anything `from_pretrained` takes; for a built-in name pass
        `tunelab.models.resolve_model(name)`. `kw` goes to `__init__` (k, min_similarity).
        """
        from transformers import AutoModel

        tokenizer = load_tokenizer(path)
        with quiet_transformers():
            model = AutoModel.from_pretrained(path)
        embeddings = model.get_input_embeddings().weight.detach().clone()
        del model
        return cls(tokenizer, embeddings, **kw)

    def _lookup(self, word: str) -> int | None:
        """The word's row: as written, else lowercased ('Great' at a sentence start -> 'great')."""
        if not self.lowercase and word in self._index:
            return self._index[word]
        return self._index.get(word.lower())

    def synonyms(self, word: str) -> list[str]:
        """Up to `k` neighbours of `word`, most similar first.

        [] when the word is not a single whole-word vocabulary token, is a stopword or shorter
        than 3 letters, or has no neighbour above `min_similarity`. The word itself and its
        case/plural variants are never returned.
        """
        key = word.lower() if self.lowercase else word
        if key in self._cache:
            return list(self._cache[key])
        result: list[str] = []
        index = self._lookup(word)
        if index is not None:
            similarity = self._unit @ self._unit[index]
            similarity[index] = -2.0
            # extra candidates, since variants of the word and of each other are dropped below
            top = torch.topk(similarity, min(len(self.words), self.k * 4 + 8))
            seen = {self.words[index].lower()}
            for score, i in zip(top.values.tolist(), top.indices.tolist()):
                if score < self.min_similarity or len(result) == self.k:
                    break
                candidate = self.words[i]
                if any(_is_trivial_variant(candidate, other) for other in seen):
                    continue
                seen.add(candidate.lower())
                result.append(candidate)
        self._cache[key] = result
        return list(result)


def _match_case(replacement: str, original: str) -> str:
    if len(original) > 1 and original.isupper():
        return replacement.upper()
    if original[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def _synonyms_of(token: str, synonyms: EmbeddingSynonyms | None) -> tuple[str, str, str, list[str]]:
    """(prefix, core, suffix, neighbours of core) for a whitespace token; [] if not a word."""
    match = _WORD.match(token)
    if synonyms is None or match is None:
        return "", token, "", []
    prefix, core, suffix = match.groups()
    return prefix, core, suffix, synonyms.synonyms(core)


def _synonym_replacement(
    words: list[str], n: int, synonyms: EmbeddingSynonyms | None, rng: random.Random
) -> list[str]:
    out = list(words)
    positions = list(range(len(words)))
    rng.shuffle(positions)
    replaced = 0
    for i in positions:
        if replaced == n:
            break
        prefix, core, suffix, options = _synonyms_of(words[i], synonyms)
        if options:
            out[i] = prefix + _match_case(rng.choice(options), core) + suffix
            replaced += 1
    return out


def _random_insertion(
    words: list[str], n: int, synonyms: EmbeddingSynonyms | None, rng: random.Random
) -> list[str]:
    sources = [options for w in words if (options := _synonyms_of(w, synonyms)[3])]
    out = list(words)
    if not sources:
        return out
    for _ in range(n):
        out.insert(rng.randint(0, len(out)), rng.choice(rng.choice(sources)))
    return out


def _random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def _random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    if len(words) < 2:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    if len(kept) == len(words):  # nothing deleted by chance: delete one word
        drop = rng.randrange(len(words))
        kept = words[:drop] + words[drop + 1 :]
    if not kept:  # everything deleted: keep one word, as EDA does
        kept = [rng.choice(words)]
    return kept


def augment_text(
    text: str,
    options: AugmentOptions,
    synonyms: EmbeddingSynonyms | None,
    rng: random.Random,
    operation: str | None = None,
) -> str:
    """One EDA edit of `text`.

    `operation` is one of "synonym", "insert", "swap", "delete"; None picks one at random among
    those whose probability is above 0. When the chosen edit cannot change the text (no word
    has a synonym, or there is only one word to swap or delete), the next operation in that
    order is tried; when none can, the original text is returned, so the result is never
    empty unless `text` is. Words are split on whitespace and rejoined with single spaces;
    only words whose letters form one run ("movie," or "(great)") are replaced by synonyms,
    keeping their punctuation and the case of their first letter (all capitals stay capitals).
    """
    enabled = [op for op in OPERATIONS if options.probability(op) > 0]
    if operation is not None and operation not in OPERATIONS:
        raise ValueError(f"unknown operation {operation!r}; choose one of: {', '.join(OPERATIONS)}")
    words = text.split()
    if not words or not enabled:
        return text
    first = operation if operation is not None else rng.choice(enabled)
    start = OPERATIONS.index(first)
    for step in range(len(OPERATIONS)):
        op = OPERATIONS[(start + step) % len(OPERATIONS)]
        if step and op not in enabled:
            continue
        p = options.probability(op)
        n = max(1, round(p * len(words)))
        if op == "synonym":
            new = _synonym_replacement(words, n, synonyms, rng)
        elif op == "insert":
            new = _random_insertion(words, n, synonyms, rng)
        elif op == "swap":
            new = _random_swap(words, n, rng)
        else:
            new = _random_deletion(words, p, rng)
        if new and new != words:
            return " ".join(new)
    return text


def augment_rows(
    rows: list[dict], text_column: str, options: AugmentOptions, synonyms: EmbeddingSynonyms | None
) -> list[dict]:
    """Originals first, then `factor` augmented copies of each row (all other columns copied
    unchanged). Seeded: same input + seed -> same output.

    The copies of one row take the four operations in rotation (synonym, insert, swap,
    delete) from a random starting point, so `factor=4` uses each once and smaller factors
    use different ones. Each row has its own random stream from the seed and its position,
    so editing one row does not change the copies of the others. Copies stay in row order,
    each row's copies together. Texts that are not strings are copied unchanged.

    Raises:
        DataError: a row has no `text_column`.
    """
    augmented: list[dict] = []
    for position, row in enumerate(rows):
        if text_column not in row:
            raise DataError(
                f"row {position + 1} has no column '{text_column}'; it has: {', '.join(map(str, row))}"
            )
        text = row[text_column]
        rng = random.Random(f"{options.seed}:{position}")
        start = rng.randrange(len(OPERATIONS))
        for copy in range(options.factor):
            new = dict(row)
            if isinstance(text, str):
                operation = OPERATIONS[(start + copy) % len(OPERATIONS)]
                # a disabled operation is not used: augment_text picks among the enabled ones instead
                chosen = operation if options.probability(operation) != 0 else None
                new[text_column] = augment_text(text, options, synonyms, rng, operation=chosen)
            augmented.append(new)
    return [dict(row) for row in rows] + augmented


def options_from_config(config: Any) -> AugmentOptions:
    a = config.data.augment
    return AugmentOptions(factor=a.factor, p_delete=a.p_delete, p_swap=a.p_swap, p_insert=a.p_insert,
                          p_synonym=a.p_synonym, seed=config.seed)  # fmt: skip


def augment_table(table: Any, config: Any) -> Any:
    """The training Table plus `data.augment.factor` augmented copies of every row."""
    options = options_from_config(config)
    synonyms = None
    if options.p_synonym > 0 or options.p_insert > 0:
        synonyms = EmbeddingSynonyms.from_model_path(resolve_model(config.model))
    rows = augment_rows(table.rows, config.data.text_column, options, synonyms)
    lines = list(table.lines) + [f"{line} (augmented)" for line in table.lines for _ in range(options.factor)]
    return Table(table.path, rows, lines, table.columns)
