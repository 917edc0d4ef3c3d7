"""Sequence-to-sequence: an encoder-decoder model (T5, BART, ... via
`AutoModelForSeq2SeqLM`) learns to write `data.target_column` from `data.source_column`.

Loss: token cross-entropy on the target; metrics: loss, perplexity, and on generations BLEU,
ROUGE-1/2/L and exact match. The decoder input is the target shifted right behind the
model's decoder start token, as the models do themselves when given labels.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.config import Config, max_length
from tunelab.data import Table, read_table, require_columns
from tunelab.errors import ConfigError, DataError
from tunelab.tasks.base import Splits, split_and_encode
from tunelab.tasks.generative import IGNORE, GenerativeTask, fill_placeholders, pad_sequences


class Seq2SeqTask(GenerativeTask):
    name = "seq2seq"
    peft_task_type = "SEQ_2_SEQ_LM"
    shift = False

    def __init__(self, config: Config, labels: list[str] | None = None):
        super().__init__(config, labels)
        self.decoder_start: int | None = None  # known once the model is built
        self.decoder_pad: int | None = None

    def read(self, path: str, need_labels: bool = True) -> Table:
        d = self.config.data
        fmt = d.format if d.format in ("csv", "tsv", "json", "jsonl", "parquet") else "auto"
        table = read_table(path, fmt)
        keys = {d.source_column: "data.source_column", d.target_column: "data.target_column"}
        require_columns(table, [c for c in keys if need_labels or c == d.source_column], keys)
        for i in range(len(table)):
            row = fill_placeholders(table.rows[i], d.fill, table.where(i))
            for column in (d.source_column, d.target_column) if need_labels else (d.source_column,):
                value = row.get(column)
                if not isinstance(value, str) or not value.strip():
                    raise DataError(
                        f"{table.where(i)}: column '{column}' must be non-empty text, got {value!r}"
                    )
            table.rows[i] = row
        return table

    def load_splits(self, tokenizer: Any) -> Splits:
        d = self.config.data
        if not d.train:
            raise DataError("no training data: set data.train=<file> with source and target columns")
        if d.packing:
            raise ConfigError("data.packing is for causal-lm; turn it off for seq2seq")
        if d.shots_per_class or d.augment.method != "none":
            raise ConfigError("data.shots_per_class and data.augment are for classification")
        return split_and_encode(self, self.read(d.train), None, tokenizer)

    def encode(self, table: Table, tokenizer: Any, with_labels: bool = True) -> list[dict[str, Any]]:
        d, limit = self.config.data, max_length(self.config)
        sources = [r[d.source_column] for r in table.rows]
        examples = self.encode_inputs(sources, tokenizer)
        if with_labels:
            targets = [r[d.target_column] for r in table.rows]
            ids = tokenizer(text_target=targets, truncation=True, max_length=limit)["input_ids"]
            for example, target, label in zip(examples, targets, ids):
                example.update(labels=label, reference=target)
        return examples

    def encode_inputs(self, texts: list[str], tokenizer: Any, pairs: list[str] | None = None) -> list[dict]:
        ids = tokenizer(texts, truncation=True, max_length=max_length(self.config))["input_ids"]
        return [{"input_ids": i, "prompt": t, "prompt_text": t} for i, t in zip(ids, texts)]

    def file_prompts(self, table: Table, tokenizer: Any) -> list[tuple[Any, str]]:
        column = self.config.data.source_column
        return [(r[column], r[column]) for r in table.rows]

    def prompt_for(self, text: str, tokenizer: Any, history: list[dict[str, str]] | None = None) -> str:
        return text

    def build_model(self, path: str) -> torch.nn.Module:
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_pretrained(path, **self.pretrained_options())
        start = model.config.decoder_start_token_id
        if start is None:
            raise ConfigError(f"{path}: the model config has no decoder_start_token_id; seq2seq needs one")
        self.decoder_start, self.decoder_pad = start, model.config.pad_token_id
        return model

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        ids = pad_sequences([e["input_ids"] for e in examples], pad_id)
        batch = {
            "input_ids": ids,
            "attention_mask": pad_sequences([[1] * len(e["input_ids"]) for e in examples], 0),
        }
        if "labels" in examples[0]:
            labels = pad_sequences([e["labels"] for e in examples], IGNORE)
            start = self.decoder_start if self.decoder_start is not None else pad_id
            decoder = torch.cat([torch.full((len(examples), 1), start), labels[:, :-1]], dim=1)
            pad = self.decoder_pad if self.decoder_pad is not None else pad_id
            batch.update(labels=labels, decoder_input_ids=decoder.masked_fill(decoder == IGNORE, pad))
        return batch
