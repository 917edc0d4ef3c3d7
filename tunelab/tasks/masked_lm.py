"""Masked language modelling: continued pretraining of an encoder on in-domain text
("domain-adaptive pretraining", Gururangan et al., 2020), whose run can then start a
classification or NER run (`model: runs/<this run>`).

Data: a .txt file (one document per line; when paragraphs span several lines, the
blank-line-separated paragraphs are the documents) or `data.text_column` of any table.
Documents are tokenized, joined with [SEP] and cut into `data.block_size` blocks (default:
max_length), each wrapped in [CLS] ... [SEP]; `data.packing=false` keeps one document per row.

Masking is transformers' `DataCollatorForLanguageModeling`: `mlm.probability` of the tokens
are chosen, 80% become [MASK], 10% a random token and 10% stay (with `mlm.whole_word`, every
sub-token of a chosen word is masked, and the collator always writes [MASK] then). Training
rows are masked afresh at every batch from a generator seeded with the run's seed, so each
epoch sees other masks; validation and test rows are masked once, from a fixed seed, so
their loss compares between runs. Metrics: masked-token loss, perplexity and accuracy, with
the un-tuned model's beside them in eval.json (`baseline`). `predict` fills [MASK] tokens
with the top `mlm.top_k` candidates.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunelab.config import Config, max_length
from tunelab.data import Table, is_missing, read_table, require_columns
from tunelab.device import autocast, to_device
from tunelab.errors import ConfigError, DataError
from tunelab.tasks.base import Splits, TaskBase, collate_tokens, pad_labels, split_tables
from tunelab.tasks.generative import IGNORE, only_positions

EVAL_MASK_SEED = 1234  # validation and test masks come from this seed, whatever the run's seed


def read_text_documents(path: Path) -> Table:
    """A .txt file as documents: one per line, or one per blank-line-separated paragraph when
    blank lines separate paragraphs of which any spans several lines."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        return read_table(path, "text")  # its error names the line of the bad byte
    paragraphs: list[tuple[int, list[str]]] = []  # (first line number, lines)
    current: list[str] = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            if not current:
                paragraphs.append((number, current))
            current.append(line)
        else:
            current = []
    if len(paragraphs) < 2 or not any(len(p) > 1 for _, p in paragraphs):  # no blank-line structure
        return read_table(path, "text")
    rows = [{"text": "\n".join(p)} for _, p in paragraphs]
    return Table(path, rows, [f"line {n}" for n, _ in paragraphs], ["text"])


class MaskedLMTask(TaskBase):
    name = "masked-lm"
    default_metric = "loss"
    # BERT's MLM head transform (dense + norm before the output layer): pretrained where the
    # checkpoint has it, fresh where it has none (sentence encoders such as minilm-l6), so it
    # always trains; the output layer itself is tied to the word embeddings
    head_modules: tuple[str, ...] = ("transform",)
    # peft has no masked-LM type; its feature-extraction wrapper passes every input on (soft
    # prompts prepended, prefixes as past key values), which is what MLM needs
    peft_task_type = "FEATURE_EXTRACTION"
    fresh_inputs = True
    scores_baseline = True

    def __init__(self, config: Config, labels: list[str] | None = None):
        self.config = config
        self.labels = None
        self.tokenizer: Any = None
        self._collator: Any = None

    # ----------------------------------------------------------------- data
    def read(self, path: str, need_labels: bool = True) -> Table:
        d = self.config.data
        file = Path(path)
        if file.suffix.lower() == ".txt" and d.format in ("auto", "text"):
            if not file.is_file():
                return read_table(path, "text")  # its error names the missing file
            return read_text_documents(file)
        table = read_table(path, d.format)
        require_columns(table, [d.text_column], {d.text_column: "data.text_column"})
        rows = []
        for i, row in enumerate(table.rows):
            value = row.get(d.text_column)
            if is_missing(value) or not str(value).strip():
                raise DataError(f"{table.where(i)}: '{d.text_column}' is empty; fill it in or remove the row")
            rows.append({"text": str(value)})
        return Table(table.path, rows, table.lines, ["text"])

    def load_splits(self, tokenizer: Any) -> Splits:
        """Training rows are left unmasked (masked afresh in every batch); validation and
        test rows carry a fixed mask."""
        d = self.config.data
        if not d.train:
            raise DataError("no training data: set data.train=<file> (.txt, or a table with a text column)")
        if d.shots_per_class or d.augment.method != "none":
            raise ConfigError("data.shots_per_class and data.augment are for classification; remove them")
        train, validation, test = split_tables(self, self.read(d.train), None)
        splits = Splits(
            train=self.encode(train, tokenizer, with_labels=False),
            validation=self.encode(validation, tokenizer),
            test=self.encode(test, tokenizer) if test is not None else None,
            files={
                k: v for k, v in (("train", d.train), ("validation", d.validation), ("test", d.test)) if v
            },
        )
        if not splits.train:
            raise DataError(f"{d.train}: no tokens to train on")
        return splits

    def encode(self, table: Table, tokenizer: Any, with_labels: bool = True) -> list[dict[str, Any]]:
        """Token blocks (or one row per document with data.packing=false). With labels, each row
        is masked once from a fixed seed (evaluation); without, it is masked in `collate`."""
        self._set_tokenizer(tokenizer)
        examples = self._sequences([r["text"] for r in table.rows], tokenizer)
        if not with_labels:
            for e in examples:
                e["dynamic_mask"] = True
            return examples
        generator = torch.Generator().manual_seed(EVAL_MASK_SEED)
        for s in range(0, len(examples), 256):
            chunk = examples[s : s + 256]
            padded = collate_tokens([{"input_ids": e["input_ids"]} for e in chunk], tokenizer.pad_token_id)
            batch = self._mask(padded, chunk, generator)
            for row, e in enumerate(chunk):
                n = len(e["input_ids"])
                e["input_ids"] = batch["input_ids"][row, :n].tolist()
                e["labels"] = batch["labels"][row, :n].tolist()
        return [e for e in examples if any(t != IGNORE for t in e["labels"])]

    def _set_tokenizer(self, tokenizer: Any) -> None:
        if tokenizer.mask_token_id is None:
            raise ConfigError(f"{self.config.model}: its tokenizer has no mask token; masked-lm needs an "
                              f"encoder tokenizer (BERT, RoBERTa, ...)")  # fmt: skip
        if self.config.mlm.whole_word and not getattr(tokenizer, "is_fast", False):
            raise ConfigError("mlm.whole_word needs a fast tokenizer (one with tokenizer.json); turn it off")
        if self.tokenizer is not tokenizer:
            # transformers takes seconds to import: only once there is a tokenizer (as build_model does)
            from transformers import DataCollatorForLanguageModeling

            self.tokenizer = tokenizer
            with warnings.catch_warnings():  # whole-word masking: "random replacement not supported"
                warnings.simplefilter("ignore")
                self._collator = DataCollatorForLanguageModeling(
                    tokenizer, mlm_probability=self.config.mlm.probability,
                    whole_word_mask=self.config.mlm.whole_word, seed=self.config.seed,
                )  # fmt: skip

    def _sequences(self, texts: list[str], tokenizer: Any) -> list[dict[str, Any]]:
        d = self.config.data
        size = (
            (d.block_size or max_length(self.config)) if d.packing is not False else max_length(self.config)
        )
        body = size - 2  # [CLS] and [SEP] around each row
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=self.config.mlm.whole_word)
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        if cls is None or sep is None:
            raise ConfigError(
                f"{self.config.model}: its tokenizer has no [CLS]/[SEP] tokens to frame rows with"
            )
        none = (0, 0)
        pieces = []
        for i, ids in enumerate(enc["input_ids"]):
            offsets = (
                [tuple(o) for o in enc["offset_mapping"][i]] if "offset_mapping" in enc else [none] * len(ids)
            )
            pieces.append((list(ids), offsets))
        if d.packing is not False:
            stream: list[int] = []
            where: list[tuple[int, int]] = []
            for ids, offsets in pieces:
                if ids:
                    stream += ids + [sep]
                    where += offsets + [none]
            pieces = [(stream[s : s + body], where[s : s + body]) for s in range(0, len(stream), body)]
        examples = []
        for ids, offsets in pieces:
            ids, offsets = ids[:body], offsets[:body]
            if not ids or all(t == sep for t in ids):
                continue
            example: dict[str, Any] = {"input_ids": [cls, *ids, sep]}
            if self.config.mlm.whole_word:
                example["offsets"] = [none, *offsets, none]
            examples.append(example)
        return examples

    def _mask(self, batch: dict[str, torch.Tensor], examples: list[dict[str, Any]],
              generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
        """Mask a padded batch with the collator (its own seeded generator, or `generator`)."""
        collator = self._collator
        special = set(self.tokenizer.all_special_ids)
        ids = batch["input_ids"]
        special_mask = torch.tensor([[t in special for t in row] for row in ids.tolist()], dtype=torch.bool)
        special_mask |= batch["attention_mask"] == 0
        offsets = None
        if self.config.mlm.whole_word:
            longest = ids.shape[1]
            offsets = torch.tensor(
                [e["offsets"] + [(0, 0)] * (longest - len(e["offsets"])) for e in examples]
            )
        if collator.generator is None:
            collator.create_rng()
        saved, collator.generator = collator.generator, generator or collator.generator
        try:
            masked, labels = collator.torch_mask_tokens(ids.clone(), special_mask, offsets)
        finally:
            collator.generator = saved
        if not (labels != IGNORE).any():  # a batch needs a target (the loss is divided by their count)
            row, position = (~special_mask).nonzero()[0].tolist()
            labels[row, position] = ids[row, position]
            masked[row, position] = self.tokenizer.mask_token_id
        return {**batch, "input_ids": masked, "labels": labels}

    def encode_inputs(self, texts: list[str], tokenizer: Any, pairs: list[str] | None = None) -> list[dict]:
        """Texts with one or more mask tokens (`[MASK]` for BERT) to fill."""
        self._set_tokenizer(tokenizer)
        enc = tokenizer(texts, truncation=True, max_length=max_length(self.config))
        examples = []
        for n, (text, ids) in enumerate(zip(texts, enc["input_ids"])):
            if tokenizer.mask_token_id not in ids:
                raise DataError(f"input {n + 1}: no {tokenizer.mask_token} in {text[:60]!r}; write "
                                f"{tokenizer.mask_token} where a word is missing")  # fmt: skip
            examples.append({"input_ids": ids, "text": text})
        return examples

    # ----------------------------------------------------------------- model
    def build_model(self, path: str) -> torch.nn.Module:
        from transformers import AutoModelForMaskedLM

        return AutoModelForMaskedLM.from_pretrained(path, **self.pretrained_options())

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """Padded rows; training rows are masked here (new masks at every call), evaluation
        rows carry their fixed mask."""
        batch = collate_tokens([{"input_ids": e["input_ids"]} for e in examples], pad_id)
        if examples[0].get("dynamic_mask"):
            return self._mask(batch, examples)
        if "labels" in examples[0]:
            batch["labels"] = pad_labels(examples, batch["input_ids"].shape[1])
        return batch

    @staticmethod
    def units(batch: dict[str, torch.Tensor]) -> int:
        """Masked tokens in the batch."""
        return int((batch["labels"] != IGNORE).sum())

    def token_losses(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """(loss per masked token, its row, whether the top prediction is right); the output
        layer runs on the masked positions only."""
        labels = batch.pop("labels")
        mask = labels != IGNORE
        with only_positions(model, mask):
            logits = model(**batch).logits.float()
        target = labels[mask]
        return (
            F.cross_entropy(logits, target, reduction="none"),
            mask.nonzero()[:, 0],
            logits.argmax(-1) == target,
        )

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.token_losses(model, batch)[0].sum()

    # ----------------------------------------------------------------- outputs
    @torch.inference_mode()
    def outputs(self, model: torch.nn.Module, examples: list[dict[str, Any]], pad_id: int, batch_size: int,
                device: torch.device, dtype: torch.dtype | None) -> list[Any]:  # fmt: skip
        """Per labelled row: (summed loss, masked tokens, correct predictions); per input to
        fill: the top-k (token id, probability) at each mask."""
        was_training = model.training
        model.eval()
        out: list[Any] = [None] * len(examples)
        fill = "labels" not in examples[0] if examples else False
        for s in range(0, len(examples), batch_size):
            chunk = list(range(s, min(s + batch_size, len(examples))))
            batch = to_device(self.collate([examples[i] for i in chunk], pad_id), device)
            with autocast(device, dtype):
                if fill:
                    batch["labels"] = torch.where(batch["input_ids"] == self.tokenizer.mask_token_id,
                                                  batch["input_ids"], IGNORE)  # fmt: skip
                    self._fill(model, batch, chunk, out)
                    continue
                losses, rows, correct = self.token_losses(model, batch)
            sums = torch.zeros(len(chunk), 3, dtype=torch.float64)
            sums.index_add_(0, rows.cpu(), torch.stack([losses.double(), torch.ones_like(losses).double(),
                                                        correct.double()], 1).cpu())  # fmt: skip
            for row, i in enumerate(chunk):
                out[i] = sums[row].numpy()
        model.train(was_training)
        return out

    def _fill(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: list[int], out: list[Any]
    ) -> None:
        labels = batch.pop("labels")
        mask = labels != IGNORE
        with only_positions(model, mask):
            probs = torch.softmax(model(**batch).logits.float(), -1)
        top = probs.topk(min(self.config.mlm.top_k, probs.shape[-1]), -1)
        rows = mask.nonzero()[:, 0].tolist()
        for i in chunk:
            out[i] = []
        for n, row in enumerate(rows):
            out[chunk[row]].append(list(zip(top.indices[n].tolist(), top.values[n].tolist())))

    def metrics(self, outputs: list[Any], examples: list[dict[str, Any]]) -> dict[str, Any]:
        total = np.sum(outputs, axis=0) if outputs else np.zeros(3)
        loss = float(total[0] / max(total[1], 1))
        return {"loss": loss, "perplexity": float(math.exp(min(loss, 700.0))),
                "accuracy": float(total[2] / max(total[1], 1)), "masked_tokens": int(total[1])}  # fmt: skip

    def calibrate(self, outputs: list[Any], examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def predictions(self, outputs: list[Any], examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per text: the candidates for each mask, and the text with the top ones filled in."""
        tokenizer = self.tokenizer
        results = []
        for candidates, example in zip(outputs, examples):
            masks = [[{"token": tokenizer.convert_ids_to_tokens(t), "score": float(p)} for t, p in options]
                     for options in candidates]  # fmt: skip
            filled = example["text"]
            for options in masks:
                filled = filled.replace(tokenizer.mask_token, options[0]["token"].removeprefix("##"), 1)
            results.append({"masks": masks, "filled": filled})
        return results

    def probe_batch(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """At most 8 rows cut to 64 tokens: vocabulary-wide logits at every position are big."""
        short = [{**e, "input_ids": e["input_ids"][:64], "dynamic_mask": False} for e in examples[:8]]
        batch = collate_tokens([{"input_ids": e["input_ids"]} for e in short], pad_id)
        return batch
