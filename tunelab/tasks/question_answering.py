"""Extractive question answering: (question, context) -> the span of the context that answers
it, or no answer (SQuAD v2.0).

Data: SQuAD v1.1/v2.0 JSON (`data -> paragraphs -> qas`, `is_impossible` for v2), or flat
JSON/JSONL/CSV/Parquet rows with `question`, `context` and `answers: {text: [...],
answer_start: [...]}` (the Hugging Face layout; empty lists mean no answer). Every answer must
sit at its `answer_start`; `data.fix_offsets=true` looks for it instead.

Long contexts are cut into windows of `data.max_length` tokens that overlap by
`data.doc_stride` (the tokenizer's overflowing tokens and offsets, as Hugging Face's
`run_qa.py` does). Training labels each window with the answer's first and last token, or
with the [CLS] position where the window does not hold it. Predictions consider every
window's `qa.n_best` starts and ends, up to `qa.max_answer_length` tokens, map the best span
back to character offsets of the context, and for v2 data answer nothing when the no-answer
([CLS]) score beats the best span by more than `qa.null_threshold` (tuned on validation after
training and saved in the run). Metrics: exact match and F1 as the official SQuAD scripts
compute them (`metrics.squad_metrics`).

Postprocessing is written here rather than taken from transformers: its QA pipeline decodes
one window set at a time with its own threshold rules, and `run_qa.py`'s `utils_qa.py` is an
example script, not a package.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunelab.config import Config, max_length
from tunelab.data import Table, is_missing, not_utf8, read_table, require_columns
from tunelab.device import autocast, to_device
from tunelab.errors import ConfigError, DataError
from tunelab.metrics import squad_f1, squad_metrics
from tunelab.tasks.base import Splits, TaskBase, collate_tokens, split_and_encode


def _load_json(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"data file not found: {path} (check the path)")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read; flatten the rows") from None


def read_squad(path: Path, data: dict[str, Any]) -> Table:
    """A SQuAD v1.1/v2.0 file as flat rows {id, question, context, answers, is_impossible}."""
    articles = data.get("data")
    shape = "SQuAD JSON needs {'data': [{'paragraphs': [{'context': ..., 'qas': [...]}]}]}"
    if not isinstance(articles, list) or not articles:
        raise DataError(f"{path}: not SQuAD-shaped: no 'data' list; {shape}, or use flat JSONL rows")
    rows: list[dict[str, Any]] = []
    lines: list[str] = []
    for a, article in enumerate(articles):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise DataError(f"{path}: not SQuAD-shaped: data[{a}] has no 'paragraphs' list; {shape}")
        for p, paragraph in enumerate(paragraphs):
            qas = paragraph.get("qas") if isinstance(paragraph, dict) else None
            if not isinstance(qas, list):
                raise DataError(
                    f"{path}: not SQuAD-shaped: data[{a}].paragraphs[{p}] has no 'qas' list; {shape}"
                )
            for q, qa in enumerate(qas):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                if not isinstance(qa, dict):
                    raise DataError(f"{path} ({where}): expected an object with 'question' and 'answers'")
                answers = qa.get("answers") or []
                if not isinstance(answers, list) or not all(isinstance(x, dict) for x in answers):
                    raise DataError(f"{path} ({where}): 'answers' must be a list of {{text, answer_start}}")
                rows.append({
                    "id": str(qa.get("id", len(rows))), "question": qa.get("question"),
                    "context": paragraph.get("context"), "is_impossible": bool(qa.get("is_impossible")),
                    "answers": {"text": [x.get("text") for x in answers],
                                "answer_start": [x.get("answer_start") for x in answers]},
                })  # fmt: skip
                lines.append(f"{where}, id {qa.get('id', '?')}")
    if not rows:
        raise DataError(f"{path}: the SQuAD file holds no questions")
    return Table(path, rows, lines, ["id", "question", "context", "answers", "is_impossible"])


def answer_spans(row: dict[str, Any], where: str, key: str, fix_offsets: bool) -> list[tuple[str, int]]:
    """The row's gold answers as (text, character start), each checked against the context."""
    context, answers = row["context"], row.get(key)
    if isinstance(answers, str):  # a CSV cell holds the mapping as JSON text
        try:
            answers = json.loads(answers)
        except json.JSONDecodeError:
            raise DataError(f"{where}: '{key}' is not JSON: {answers[:60]!r}") from None
    if answers is None or (isinstance(answers, float) and math.isnan(answers)):
        answers = {"text": [], "answer_start": []}
    if not isinstance(answers, dict) or not isinstance(answers.get("text"), list) \
            or not isinstance(answers.get("answer_start"), list):  # fmt: skip
        raise DataError(
            f'{where}: \'{key}\' must be {{"text": [...], "answer_start": [...]}}, got {answers!r}'
        )
    texts, starts = answers["text"], answers["answer_start"]
    if len(texts) != len(starts):
        raise DataError(f"{where}: '{key}' has {len(texts)} texts but {len(starts)} answer_start values")
    spans = []
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or not text:
            raise DataError(f"{where}: an answer text is empty or not text ({text!r})")
        if not isinstance(start, int) or isinstance(start, bool):
            raise DataError(f"{where}: answer_start must be an integer, got {start!r}")
        if context[start : start + len(text)] == text and start >= 0:
            spans.append((text, start))
            continue
        found = [i for i in range(len(context)) if context.startswith(text, i)] if fix_offsets else []
        if found:
            spans.append((text, min(found, key=lambda i: abs(i - start))))
        elif fix_offsets:
            raise DataError(f"{where}: answer {text!r} is not found anywhere in the context; fix the answer "
                            f"text or remove the row")  # fmt: skip
        elif start < 0 or start >= len(context):
            raise DataError(f"{where}: answer_start {start} is beyond the context ({len(context)} characters); "
                            f"fix the offset, or set data.fix_offsets=true to search for {text!r}")  # fmt: skip
        else:
            raise DataError(
                f"{where}: answer {text!r} is not at answer_start {start} (the context there reads "
                f"{context[start : start + len(text)]!r}); fix the offset, or set data.fix_offsets=true"
            )
    return spans


class QuestionAnsweringTask(TaskBase):
    name = "question-answering"
    default_metric = "f1"
    head_modules: tuple[str, ...] = ("qa_outputs",)  # the start/end projection (BERT, RoBERTa, ...)
    # not peft's QUESTION_ANS: its wrapper drops token_type_ids (peft 0.21), so a LoRA model would
    # train without segment ids and its merged export would then see them; the feature-extraction
    # wrapper passes every input on
    peft_task_type = "FEATURE_EXTRACTION"

    def __init__(self, config: Config, labels: list[str] | None = None):
        self.config = config
        self.labels = None

    # ----------------------------------------------------------------- data
    def read(self, path: str, need_labels: bool = True) -> Table:
        """SQuAD JSON or flat rows, as rows {id, question, context, answers: [(text, start)],
        is_impossible}; each row checked (errors name the row and the fix)."""
        d = self.config.data
        file = Path(path)
        if file.suffix.lower() == ".json" and d.format in ("auto", "json"):
            data = _load_json(file)
            if isinstance(data, dict) and "data" in data:
                table = read_squad(file, data)
                columns = ("question", "context", "answers")
            elif isinstance(data, list):
                table = read_table(path, "json")
                columns = (d.question_column, d.context_column, d.answers_column)
            else:
                raise DataError(f"{path}: not SQuAD-shaped (a JSON object without 'data'); give SQuAD JSON "
                                f"{{'data': [{{'paragraphs': [...]}}]}} or a list of flat rows")  # fmt: skip
        else:
            table = read_table(path, d.format)
            columns = (d.question_column, d.context_column, d.answers_column)
        keys = dict(zip(columns, ("data.question_column", "data.context_column", "data.answers_column")))
        require_columns(table, list(columns[: 3 if need_labels else 2]), keys)
        question, context, answers = columns
        rows = []
        for i, row in enumerate(table.rows):
            where = table.where(i)
            for column in (question, context):
                value = row.get(column)
                if is_missing(value) or not isinstance(value, str) or not value.strip():
                    raise DataError(f"{where}: '{column}' is missing or empty; fill it in or remove the row")
            record: dict[str, Any] = {
                "id": str(row.get("id", i)),
                "question": row[question].strip(),
                "context": row[context],
            }
            if need_labels:
                record["answers"] = answer_spans({**row, "context": row[context]}, where, answers,
                                                 d.fix_offsets)  # fmt: skip
                if row.get("is_impossible") and record["answers"]:
                    raise DataError(f"{where}: is_impossible is true but the question has answers")
            rows.append(record)
        return Table(table.path, rows, table.lines, ["id", "question", "context", "answers"])

    def load_splits(self, tokenizer: Any) -> Splits:
        d = self.config.data
        if not d.train:
            raise DataError("no training data: set data.train=<file> (SQuAD JSON, or JSONL/CSV rows)")
        if d.doc_stride >= max_length(self.config):
            raise ConfigError(f"data.doc_stride: {d.doc_stride} must be less than data.max_length "
                              f"({max_length(self.config)}); windows overlap by doc_stride tokens")  # fmt: skip
        for key, value in (("data.shots_per_class", d.shots_per_class), ("data.packing", d.packing)):
            if value:
                raise ConfigError(f"{key} does not apply to question-answering; remove it")
        if d.augment.method != "none":
            raise ConfigError("data.augment is for classification; set data.augment.method=none")
        return split_and_encode(self, self.read(d.train), None, tokenizer)

    def encode(self, table: Table, tokenizer: Any, with_labels: bool = True) -> list[dict[str, Any]]:
        """One example per window of each row: tokens, the context offsets of each token
        (None outside the context), and with labels the answer's start/end token."""
        rows = table.rows
        examples = self._windows([r["question"] for r in rows], [r["context"] for r in rows], tokenizer)
        for e in examples:
            row = rows[e["row"]]
            e["id"] = row["id"]
            if with_labels:
                e["answers"] = [text for text, _ in row["answers"]]
                first = row["answers"][0] if row["answers"] else None
                e["labels"] = list(self._positions(e["offsets"], first))
        return examples

    def encode_inputs(self, texts: list[str], tokenizer: Any, pairs: list[str] | None = None) -> list[dict]:
        """Windows of (question, context) pairs: `texts` are the questions, `pairs` the contexts."""
        if pairs is None or len(pairs) != len(texts):
            raise DataError(
                "question answering needs a context for every question (--question and --context)"
            )
        for n, (question, context) in enumerate(zip(texts, pairs)):
            if not question.strip() or not context.strip():
                raise DataError(f"input {n + 1}: the question and the context must both be non-empty")
        examples = self._windows([t.strip() for t in texts], list(pairs), tokenizer)
        for e in examples:
            e["id"] = str(e["row"])
        return examples

    def _windows(self, questions: list[str], contexts: list[str], tokenizer: Any) -> list[dict[str, Any]]:
        if not getattr(tokenizer, "is_fast", False):
            raise DataError("question answering needs a fast tokenizer (one with tokenizer.json)")
        limit = max_length(self.config)
        try:
            enc = tokenizer(questions, contexts, truncation="only_second", max_length=limit,
                            stride=self.config.data.doc_stride, return_overflowing_tokens=True,
                            return_offsets_mapping=True)  # fmt: skip
        except Exception as e:  # the tokenizers library raises plain exceptions
            raise DataError(f"a question with data.doc_stride={self.config.data.doc_stride} leaves no room for the "
                            f"context in data.max_length={limit} tokens: raise max_length or lower doc_stride "
                            f"({str(e).strip(', ')})") from None  # fmt: skip
        examples = []
        for i, ids in enumerate(enc["input_ids"]):
            sequence = enc.sequence_ids(i)
            row = enc["overflow_to_sample_mapping"][i]
            example: dict[str, Any] = {
                "input_ids": ids, "row": row, "context": contexts[row],
                "offsets": [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], sequence)],
            }  # fmt: skip
            if "token_type_ids" in enc:
                example["token_type_ids"] = enc["token_type_ids"][i]
            examples.append(example)
        return examples

    @staticmethod
    def _positions(offsets: list[Any], answer: tuple[str, int] | None) -> tuple[int, int]:
        """(start token, end token) of the answer in a window; (0, 0), the [CLS] token, when
        there is no answer or the window does not hold all of it."""
        if answer is None:
            return 0, 0
        start_char, end_char = answer[1], answer[1] + len(answer[0])
        inside = [i for i, o in enumerate(offsets) if o is not None]
        if not inside or offsets[inside[0]][0] > start_char or offsets[inside[-1]][1] < end_char:
            return 0, 0
        start = max(i for i in inside if offsets[i][0] <= start_char)
        end = min(i for i in inside if offsets[i][1] >= end_char)
        return start, end

    # ----------------------------------------------------------------- model
    def build_model(self, path: str) -> torch.nn.Module:
        from transformers import AutoModelForQuestionAnswering

        return AutoModelForQuestionAnswering.from_pretrained(path, **self.pretrained_options())

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        keys = ("input_ids", "token_type_ids", "labels")
        return collate_tokens([{k: e[k] for k in keys if k in e} for e in examples], pad_id)

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        """One loss term per window (the mean of its start and end cross-entropies)."""
        return batch["labels"].shape[0]

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        labels = batch.pop("labels")
        start, end = self._logits(model, batch)
        return (F.cross_entropy(start, labels[:, 0], reduction="sum")
                + F.cross_entropy(end, labels[:, 1], reduction="sum")) / 2  # fmt: skip

    @staticmethod
    def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits over the real tokens (soft-prompt methods prepend virtual ones)."""
        out = model(**batch)
        length = batch["input_ids"].shape[1]
        return out.start_logits[:, -length:].float(), out.end_logits[:, -length:].float()

    @torch.inference_mode()
    def outputs(self, model: torch.nn.Module, examples: list[dict[str, Any]], pad_id: int, batch_size: int,
                device: torch.device, dtype: torch.dtype | None) -> list[np.ndarray]:  # fmt: skip
        """A (2, tokens) array of start and end logits per window."""
        was_training = model.training
        model.eval()
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        out: list[np.ndarray] = [np.zeros(0)] * len(examples)
        for s in range(0, len(order), batch_size):
            chunk = order[s : s + batch_size]
            batch = self.collate([examples[i] for i in chunk], pad_id)
            batch.pop("labels", None)
            with autocast(device, dtype):
                start, end = self._logits(model, to_device(batch, device))
            both = torch.stack([start, end], 1).cpu().numpy()
            for row, i in enumerate(chunk):
                out[i] = both[row, :, : len(examples[i]["input_ids"])]
        model.train(was_training)
        return out

    # ----------------------------------------------------------------- answers
    def best_spans(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per question (in order of appearance): the best span over all its windows (character
        offsets), its score, the no-answer score, their difference, and the probabilities of the
        span and of no answer (a softmax over every candidate's score)."""
        qa = self.config.qa
        found: dict[int, dict[str, Any]] = {}
        for logits, e in zip(outputs, examples):
            best = found.setdefault(e["row"], {"example": e, "null": math.inf, "score": -math.inf, "span": None,
                                          "scores": []})  # fmt: skip
            start_logits, end_logits = logits
            best["null"] = min(best["null"], float(start_logits[0] + end_logits[0]))
            best["scores"].append(float(start_logits[0] + end_logits[0]))
            offsets = e["offsets"]
            starts = np.argsort(start_logits)[::-1][: qa.n_best]
            ends = np.argsort(end_logits)[::-1][: qa.n_best]
            for s in starts:
                for t in ends:
                    if offsets[s] is None or offsets[t] is None or t < s or t - s + 1 > qa.max_answer_length:
                        continue
                    score = float(start_logits[s] + end_logits[t])
                    best["scores"].append(score)
                    if score > best["score"]:
                        best["score"], best["span"] = score, (offsets[s][0], offsets[t][1])
        results = []
        for best in found.values():
            scores = np.array(best["scores"])
            total = np.exp(scores - scores.max()).sum()
            best["probability"] = float(np.exp(best["score"] - scores.max()) / total)
            best["null_probability"] = float(np.exp(best["null"] - scores.max()) / total)
            best["diff"] = best["null"] - best["score"]  # > threshold: no answer
            results.append(best)
        return results

    def threshold(self, examples: list[dict[str, Any]]) -> float | None:
        """The no-answer threshold: the run's (tuned or set), else 0 for v2 data; None (always
        answer) for v1 data."""
        if self.config.qa.null_threshold is not None:
            return self.config.qa.null_threshold
        return 0.0 if any("answers" in e and not e["answers"] for e in examples) else None

    @staticmethod
    def _text(best: dict[str, Any], threshold: float | None) -> str:
        if best["span"] is None or (threshold is not None and best["diff"] > threshold):
            return ""
        start, end = best["span"]
        return str(best["example"]["context"][start:end])

    def metrics(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> dict[str, Any]:
        spans = self.best_spans(outputs, examples)
        threshold = self.threshold(examples)
        golds = [b["example"]["answers"] for b in spans]
        return squad_metrics(golds, [self._text(b, threshold) for b in spans], threshold is not None)

    def calibrate(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> dict[str, Any]:
        """With unanswerable questions: the no-answer threshold that maximises F1 on validation
        (as the official v2.0 script's best-threshold search), saved in the run's config."""
        if self.config.qa.null_threshold is not None or not any(not e["answers"] for e in examples):
            return {}
        spans = self.best_spans(outputs, examples)
        golds = [[a for a in b["example"]["answers"] if a] for b in spans]
        answered = [max((squad_f1(g, self._text(b, None)) for g in gold), default=float(not self._text(b, None)))
                    for b, gold in zip(spans, golds)]  # fmt: skip
        unanswered = [float(not gold) for gold in golds]
        diffs = sorted((b["diff"], i) for i, b in enumerate(spans) if math.isfinite(b["diff"]))
        # below every difference no question is answered; passing each one answers its question.
        # The threshold sits halfway to the next difference, so rounding cannot flip a question.
        total = best_total = sum(unanswered)
        threshold = diffs[0][0] - 1.0 if diffs else 0.0
        for n, (diff, i) in enumerate(diffs):
            total += answered[i] - unanswered[i]
            if total > best_total:
                following = diffs[n + 1][0] if n + 1 < len(diffs) else diff + 2.0
                best_total, threshold = total, (diff + following) / 2
        self.config.qa.null_threshold = threshold = float(threshold)
        return {"null_threshold": threshold, "validation_f1": best_total / max(len(spans), 1)}

    def predictions(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """{answer, start, end, score} per question: `context[start:end] == answer`; no answer
        gives answer, start and end null (score: the no-answer probability)."""
        threshold = self.config.qa.null_threshold
        results = []
        for best in self.best_spans(outputs, examples):
            text = self._text(best, threshold)
            if not text:
                results.append(
                    {"answer": None, "start": None, "end": None, "score": best["null_probability"]}
                )
                continue
            start, end = best["span"]
            results.append(
                {"answer": text, "start": int(start), "end": int(end), "score": best["probability"]}
            )
        return results

    def file_inputs(self, path: str) -> tuple[list[dict[str, Any]], list[str], list[str]]:
        """(what each row shows, questions, contexts) of a file to predict on."""
        table = self.read(path, need_labels=False)
        shown = [{"id": r["id"], "question": r["question"]} for r in table.rows]
        return shown, [r["question"] for r in table.rows], [r["context"] for r in table.rows]
