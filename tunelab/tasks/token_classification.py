"""Token classification (NER, sequence labelling): words -> one tag per word.

Data: CoNLL files (`word ... tag` per line, tag last, blank line between sentences,
`-DOCSTART-` skipped) or JSON/JSONL rows with a list of words and a list of tags. Tags are
BIO/IOB2 (BIOES accepted). Only the first sub-token of each word carries the word's tag; the
others are ignored by the loss. Metrics are entity-level (`metrics.entity_metrics`, computed
as seqeval/conlleval do). `predict` splits raw text into words and returns entities with
character offsets into the input.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunelab.config import Config, max_length
from tunelab.data import Table, not_utf8, read_table, require_columns
from tunelab.errors import DataError
from tunelab.metrics import entity_metrics, get_entities
from tunelab.tasks.base import Splits, TaskBase, collate_tokens, pad_labels, split_and_encode

CONLL_SUFFIXES = {".conll", ".txt", ".bio", ".iob", ".conllu"}
WORD = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")
TAG = re.compile(r"O|[BIESLU][-_]\S+")  # BIO / IOB2 / BIOES (and BILOU, read as BIOES)


def read_conll(path: Path) -> Table:
    """Sentences of a CoNLL file as rows {"tokens": [...], "tags": [...]}."""
    if not path.exists():
        raise DataError(f"data file not found: {path} (check the path)")
    if path.is_dir():
        raise DataError(f"{path} is a folder; give the data file inside it")
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines_of_file = list(f)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    rows, lines, start = [], [], 0
    tokens: list[str] = []
    tags: list[str] = []
    for n, line in enumerate(lines_of_file, 1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if tokens:
                rows.append({"tokens": tokens, "tags": tags})
                lines.append(f"line {start}")
            tokens, tags = [], []
            continue
        if len(fields) < 2:
            raise DataError(f"{path}:{n}: expected 'word tag' (tag last, space-separated), "
                                f"found {line.strip()!r}")  # fmt: skip
        if not tokens:
            start = n
        check_tag(fields[-1], f"{path}:{n}")
        tokens.append(fields[0])
        tags.append(fields[-1])
    if tokens:
        rows.append({"tokens": tokens, "tags": tags})
        lines.append(f"line {start}")
    if not rows:
        raise DataError(
            f"{path}: no sentences found; expected one 'word tag' per line, blank line between sentences"
        )
    return Table(path, rows, lines, ["tokens", "tags"])


def check_tag(tag: str, where: str) -> None:
    """Refuse a tag outside the BIO / IOB2 / BIOES scheme: it would become a label of its own
    and no entity would ever be read from it."""
    if not TAG.fullmatch(tag):
        raise DataError(
            f"{where}: tag {tag!r} is not BIO/IOB2/BIOES; write O, or B-, I-, E-, S- and the entity type "
            f"(e.g. B-PER, I-PER)"
        )


def split_words(text: str) -> list[tuple[str, int, int]]:
    """Words and punctuation of raw text, with character offsets."""
    return [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


class TokenClassificationTask(TaskBase):
    name = "token-classification"
    default_metric = "f1_micro"
    head_modules: tuple[str, ...] = ("classifier",)
    peft_task_type = "TOKEN_CLS"

    def __init__(self, config: Config, labels: list[str] | None = None):
        self.config = config
        self.labels = labels or config.data.labels

    # ----------------------------------------------------------------- data
    def read(self, path: str, need_labels: bool = True) -> Table:
        d = self.config.data
        fmt = d.format
        if fmt == "conll" or (fmt == "auto" and Path(path).suffix.lower() in CONLL_SUFFIXES):
            table = read_conll(Path(path))
            d_tokens, d_tags = "tokens", "tags"
        else:
            table = read_table(path, fmt)
            keys = {d.tokens_column: "data.tokens_column", d.tags_column: "data.tags_column"}
            require_columns(table, [d.tokens_column] + ([d.tags_column] if need_labels else []), keys)
            d_tokens, d_tags = d.tokens_column, d.tags_column
        rows = []
        for i, row in enumerate(table.rows):
            tokens, tags = row.get(d_tokens), row.get(d_tags) if need_labels else None
            if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
                raise DataError(f"{table.where(i)}: '{d_tokens}' must be a non-empty list of words")
            if need_labels and (not isinstance(tags, list) or len(tags) != len(tokens)):
                got = len(tags) if isinstance(tags, list) else repr(tags)
                raise DataError(f"{table.where(i)}: '{d_tags}' must be a list with one tag per word "
                                f"({len(tokens)} words, got {got})")  # fmt: skip
            if tags is not None:
                for j, tag in enumerate(tags):
                    check_tag(str(tag), f"{table.where(i)}, word {j + 1}")
            rows.append({"tokens": tokens, "tags": [str(t) for t in tags] if tags is not None else None})
        return Table(table.path, rows, table.lines, ["tokens", "tags"])

    def tag_ids(self, table: Table) -> list[list[int]]:
        assert self.labels is not None  # fixed by load_splits (or given) before rows are encoded
        index = {name: i for i, name in enumerate(self.labels)}
        out = []
        for i, row in enumerate(table.rows):
            unknown = [t for t in row["tags"] if t not in index]
            if unknown:
                raise DataError(f"{table.where(i)}: tag '{unknown[0]}' never appears in the training data "
                                f"(known tags: {', '.join(self.labels)})")  # fmt: skip
            out.append([index[t] for t in row["tags"]])
        return out

    def load_splits(self, tokenizer: Any) -> Splits:
        d = self.config.data
        if not d.train:
            raise DataError("no training data: set data.train=<file> (CoNLL, JSON or JSONL)")
        train = self.read(d.train)
        if self.labels is None:
            tags = {t for row in train.rows for t in row["tags"]}
            self.labels = ["O"] * ("O" in tags) + sorted(tags - {"O"}, key=lambda t: (t[2:], t))
        return split_and_encode(self, train, None, tokenizer)

    def encode(self, table: Table, tokenizer: Any, with_labels: bool = True) -> list[dict[str, Any]]:
        words = [row["tokens"] for row in table.rows]
        examples = self._encode_words(words, tokenizer)
        if with_labels:
            for example, tags in zip(examples, self.tag_ids(table)):
                example["tags"] = tags
                labels = [-100] * len(example["input_ids"])
                for word, position in enumerate(example["word_starts"]):
                    labels[position] = tags[word]
                example["labels"] = labels
        return examples

    def _encode_words(self, words: list[list[str]], tokenizer: Any) -> list[dict[str, Any]]:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("token classification needs a fast tokenizer (one with tokenizer.json)")
        enc = tokenizer(words, is_split_into_words=True, truncation=True, max_length=max_length(self.config))
        examples = []
        for i in range(len(words)):
            starts: list[int] = []
            for position, word in enumerate(enc.word_ids(i)):
                if word is not None and word == len(starts):
                    starts.append(position)
            examples.append({"input_ids": enc["input_ids"][i], "word_starts": starts})
        return examples

    def encode_inputs(self, texts: list[str], tokenizer: Any, pairs: list[str] | None = None) -> list[dict]:
        spans = [split_words(text) or [(text, 0, len(text))] for text in texts]
        examples = self._encode_words([[w for w, _, _ in s] for s in spans], tokenizer)
        for example, text, span in zip(examples, texts, spans):
            example["text"], example["spans"] = text, span
        return examples

    # ----------------------------------------------------------------- model
    def build_model(self, path: str) -> torch.nn.Module:
        from transformers import AutoModelForTokenClassification

        labels = self.labels or []
        return AutoModelForTokenClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, **self.pretrained_options(),
        )  # fmt: skip

    @staticmethod
    def collate(examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        batch = collate_tokens([{"input_ids": e["input_ids"]} for e in examples], pad_id)
        if "labels" in examples[0]:
            batch["labels"] = pad_labels(examples, batch["input_ids"].shape[1])
        return batch

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        """Labelled words in the batch (first sub-tokens)."""
        return int((batch["labels"] != -100).sum())

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        logits = logits[:, -labels.shape[1] :]  # soft-prompt methods prepend virtual tokens
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")

    # ----------------------------------------------------------------- outputs
    def word_tags(self, logits: np.ndarray, example: dict[str, Any], n_words: int) -> list[str]:
        """Predicted tag per word; words cut off by max_length are tagged O."""
        assert self.labels is not None  # fixed by load_splits (or the saved run) before scoring
        ids = logits[example["word_starts"]].argmax(-1) if example["word_starts"] else []
        return [self.labels[i] for i in ids] + ["O"] * (n_words - len(example["word_starts"]))

    def metrics(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> dict[str, Any]:
        assert self.labels is not None  # fixed by load_splits (or the saved run) before scoring
        truth = [[self.labels[t] for t in e["tags"]] for e in examples]
        predicted = [self.word_tags(o, e, len(t)) for o, e, t in zip(outputs, examples, truth)]
        return entity_metrics(truth, predicted)

    def calibrate(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def predictions(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        results = []
        for logits, example in zip(outputs, examples):
            spans = example["spans"]
            tags = self.word_tags(logits, example, len(spans))
            probs = torch.softmax(torch.from_numpy(logits), dim=-1).numpy()
            word_scores = [float(probs[p].max()) for p in example["word_starts"]] + [0.0] * len(spans)
            entities = []
            for kind, first, last in get_entities(tags):
                start, end = spans[first][1], spans[last][2]
                entities.append({"text": example["text"][start:end], "type": kind, "start": start, "end": end,
                                 "score": float(np.mean(word_scores[first : last + 1]))})  # fmt: skip
            results.append({"entities": entities})
        return results
