"""Preference tuning of causal language models: DPO, IPO, ORPO, SimPO and KTO.

Layouts (`data.format`, or detected from the columns):

- `pairs`: `prompt`, `chosen`, `rejected`. Each is text, or a list of `{role, content}`
  messages (the conversational form); without a `prompt` column, `chosen` and `rejected` are
  whole conversations that share every turn but the last, which is the answer.
- `unpaired`: `prompt`, `completion`, `label` (true: a desirable answer, false: an undesirable
  one). Only `preference.loss=kto` trains on these; KTO also trains on pairs, each pair read
  as one desirable and one undesirable row.

Prompts and answers are rendered with the chat template, as causal-lm renders its chat
layouts, and only the answer's tokens (with the end-of-turn marker the template writes after
it) are scored: an answer's log-probability is the sum over those tokens.

The losses, per pair (c / r: the policy's summed log-probabilities of the chosen / rejected
answer, c0 / r0 the reference model's, |c| / |r| the answers' token counts):

- `dpo`: -log sigmoid(beta ((c - c0) - (r - r0)))
- `ipo`: ((c - c0) / |c| - (r - r0) / |r| - 1 / (2 beta))^2 (length-normalised, as TRL does)
- with `preference.sft_weight` w (dpo, ipo): + w x the chosen answers' token-mean NLL over
  the batch (TRL's `sft` loss term, as in RPO)
- `simpo`: -log sigmoid(beta (c / |c| - r / |r|) - gamma) (no reference model)
- `orpo`: NLL(chosen) - beta log sigmoid(log odds(c / |c|) - log odds(r / |r|)), where
  odds(p) = p / (1 - p) and the NLL is the token-mean over the chosen rows' prompt and
  answer (no reference model)
- `kto`, per row: 1 - sigmoid(beta (logratio - z)) for a desirable answer,
  1 - sigmoid(beta (z - logratio)) for an undesirable one, where z is the batch's
  clamped KL estimate from mismatched prompt/answer rows.

These are the formulas of TRL 1.x (DPOTrainer, the experimental CPO trainer's `simpo` and
ORPO trainers, KTOTrainer); `tests/test_preference.py` checks each against TRL's own trainer
on the same batch. They are written here rather than called from TRL because TRL offers them
only inside its `Trainer` subclasses (DPO's and KTO's losses are inline in `_compute_loss`,
CPO's and ORPO's are methods reading the trainer's settings), and a trainer brings its own
loop, data pipeline and Accelerate state, where tunelab has its own loop (`loop.py`).

The reference model is the policy with its adapters switched off (peft's `disable_adapter`)
for peft methods, or a frozen copy of the starting model for full fine-tuning and `freeze`.
With `preference.precompute_reference`, its log-probabilities for every training row are
computed once, on the first step, and looked up afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunelab.config import Config, batch_size, max_length
from tunelab.console import say
from tunelab.data import Table, is_missing, read_table, shown_list
from tunelab.device import autocast, to_device
from tunelab.errors import ConfigError, DataError
from tunelab.models import resolve_model
from tunelab.tasks.base import Splits, encode_splits, split_tables
from tunelab.tasks.causal_lm import CausalLMTask
from tunelab.tasks.generative import IGNORE, fill_placeholders, only_positions, pad_sequences

PREFERENCE_LAYOUTS = ("pairs", "unpaired")
REFERENCE_LOSSES = ("dpo", "ipo", "kto")  # the losses that compare with a reference model
ROLES = ("system", "user", "assistant")


def detect_preference_layout(table: Table) -> str:
    columns = set(table.columns)
    if {"chosen", "rejected"} <= columns:
        return "pairs"
    if {"completion", "label"} <= columns:
        return "unpaired"
    raise DataError(
        f"{table.path}: cannot tell the layout from the columns ({shown_list(table.columns)}); preference reads "
        f"'prompt'/'chosen'/'rejected' (pairs) or 'prompt'/'completion'/'label' (unpaired, for kto); "
        f"or set data.format=pairs|unpaired"
    )


def turns(value: Any, where: str, key: str, role: str) -> list[dict[str, str]]:
    """A cell as chat messages: text becomes one message of `role`; a list of messages is checked."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: '{key}' is empty; fill it in or remove the row")
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        out = []
        for n, m in enumerate(value):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: {key}[{n}] must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: {key}[{n}].role is {m['role']!r}; use one of: {', '.join(ROLES)}")
            if not isinstance(m["content"], str) or not m["content"].strip():
                raise DataError(f"{where}: {key}[{n}].content must be non-empty text")
            out.append({"role": str(m["role"]), "content": m["content"]})
        return out
    if is_missing(value) or value == []:
        raise DataError(f"{where}: '{key}' is missing or empty; fill it in or remove the row")
    raise DataError(
        f"{where}: '{key}' must be text or a list of messages, got {type(value).__name__} {value!r}"
    )


def answer_turns(value: Any, where: str, key: str) -> list[dict[str, str]]:
    messages = turns(value, where, key, "assistant")
    if any(m["role"] != "assistant" for m in messages):
        raise DataError(
            f"{where}: '{key}' must hold only the assistant's answer; put earlier turns in 'prompt'"
        )
    return messages


def desirable(value: Any, where: str) -> bool:
    """An unpaired row's `label`: true (a desirable answer) or false."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    raise DataError(f"{where}: 'label' must be true (a desirable answer) or false, got {value!r}")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (as TRL's ORPO computes it)."""
    t = -0.6931471805599453
    return torch.where(x < t, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class PreferenceTask(CausalLMTask):
    name = "preference"
    default_metric = "reward_accuracy"

    def __init__(self, config: Config, labels: list[str] | None = None):
        super().__init__(config, labels)
        fmt = config.data.format
        self.layout = fmt if fmt in PREFERENCE_LAYOUTS else None  # type: ignore[assignment]
        self.reference: torch.nn.Module | None = None  # the frozen copy (methods without peft adapters)
        self.train_examples: list[dict[str, Any]] | None = None
        self.reference_table: torch.Tensor | None = None  # precomputed reference log-probs of train rows

    @property
    def loss_name(self) -> str:
        return self.config.preference.loss

    # ----------------------------------------------------------------- data
    def read(self, path: str, need_labels: bool = True) -> Table:
        """Read a file of pairs or unpaired rows, checking each row; without `need_labels` (predict),
        a file with only a `prompt` column is read as prompts."""
        table = read_table(path, self._file_format(path))
        if (
            not need_labels
            and "prompt" in table.columns
            and not {"chosen", "completion"} & set(table.columns)
        ):
            table.rows = [{"messages": turns(fill_placeholders(r.get("prompt"), self.config.data.fill,
                                                               table.where(i)), table.where(i), "prompt", "user")}
                          for i, r in enumerate(table.rows)]  # fmt: skip
            return table
        fmt = self.config.data.format
        layout = fmt if fmt in PREFERENCE_LAYOUTS else detect_preference_layout(table)
        self.layout = self.layout or layout  # type: ignore[assignment]
        table.rows = [self.preference_record(table, i, layout) for i in range(len(table))]
        return table

    def preference_record(self, table: Table, i: int, layout: str) -> dict[str, Any]:
        """One row as {"messages": prompt, "chosen", "rejected"} or {"messages", "completion",
        "desirable"} (answers as assistant messages); DataError naming the row when malformed."""
        where = table.where(i)
        row = fill_placeholders(table.rows[i], self.config.data.fill, where)
        if layout == "unpaired":
            for key in ("prompt", "completion", "label"):
                if key not in row:
                    raise DataError(
                        f"{where}: no '{key}' column; unpaired rows need prompt, completion, label"
                    )
            return {"messages": turns(row["prompt"], where, "prompt", "user"),
                    "completion": answer_turns(row["completion"], where, "completion"),
                    "desirable": desirable(row["label"], where)}  # fmt: skip
        chosen, rejected = (
            turns(row.get("chosen"), where, "chosen", "assistant"),
            turns(row.get("rejected"), where, "rejected", "assistant"),
        )
        if is_missing(row.get("prompt")):
            # the conversational form with the prompt inside: the turns both share, before the answer
            if len(chosen) < 2 or chosen[:-1] != rejected[:-1]:
                raise DataError(f"{where}: no 'prompt'; then 'chosen' and 'rejected' must be conversations that "
                                f"share every turn but the last (the answer)")  # fmt: skip
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        else:
            prompt = turns(row["prompt"], where, "prompt", "user")
        for key, answer in (("chosen", chosen), ("rejected", rejected)):
            if any(m["role"] != "assistant" for m in answer):
                raise DataError(f"{where}: '{key}' must hold only the assistant's answer; put earlier turns in "
                                f"'prompt'")  # fmt: skip
        if prompt[-1]["role"] == "assistant":
            raise DataError(
                f"{where}: 'prompt' ends with an assistant turn; it must end with the user's message"
            )
        if chosen == rejected:
            raise DataError(
                f"{where}: 'chosen' and 'rejected' are the same answer; a pair needs two different ones"
            )
        return {"messages": prompt, "chosen": chosen, "rejected": rejected}

    def load_splits(self, tokenizer: Any) -> Splits:
        d = self.config.data
        if not d.train:
            raise DataError("no training data: set data.train=<file> (JSON, JSONL, CSV, TSV or Parquet) of "
                            "prompt/chosen/rejected (or prompt/completion/label) rows")  # fmt: skip
        for key, on in (("data.packing", d.packing), ("data.train_on_prompt", d.train_on_prompt),
                        ("data.shots_per_class", bool(d.shots_per_class)),
                        ("data.augment", d.augment.method != "none")):  # fmt: skip
            if on:
                raise ConfigError(
                    f"{key} does not apply to task=preference (only answers are scored); turn it off"
                )
        train = self.read(d.train)
        if self.layout == "unpaired" and self.loss_name != "kto":
            raise ConfigError(f"{d.train}: unpaired rows (prompt, completion, label) train only with "
                              f"preference.loss=kto; set it, or give prompt/chosen/rejected pairs")  # fmt: skip
        assert self.layout is not None  # `read` fixes it
        self.config.data.format = self.layout  # the resolved config records the layout
        self.template(tokenizer)
        splits = encode_splits(self, split_tables(self, train, None), tokenizer)
        if self.loss_name == "kto":
            splits.train = self.kl_rows(unpair(splits.train))
        for n, e in enumerate(splits.train):
            e["row"] = n  # where precomputed reference log-probs are looked up
        self.train_examples, self.reference_table = splits.train, None
        return splits

    # ----------------------------------------------------------------- encoding
    def encode(self, table: Table, tokenizer: Any, with_labels: bool = True) -> list[dict[str, Any]]:
        examples, dropped = [], 0
        limit = max_length(self.config)
        for i, r in enumerate(table.rows):
            where, prompt = table.where(i), r["messages"]
            if "chosen" in r:
                c_ids, c_labels = self.encode_answer(prompt, r["chosen"], tokenizer, where, limit)
                r_ids, r_labels = self.encode_answer(prompt, r["rejected"], tokenizer, where, limit)
                if all(t == IGNORE for t in c_labels) or all(t == IGNORE for t in r_labels):
                    dropped += 1
                    continue
                example = {"input_ids": c_ids, "labels": c_labels, "rejected_ids": r_ids, "rejected_labels": r_labels,
                           "reference": answer_text(r["chosen"])}  # fmt: skip
            elif "completion" in r:
                ids, labels = self.encode_answer(prompt, r["completion"], tokenizer, where, limit)
                if all(t == IGNORE for t in labels):
                    dropped += 1
                    continue
                example = {"input_ids": ids, "labels": labels, "desirable": r["desirable"]}
                if r["desirable"]:
                    example["reference"] = answer_text(r["completion"])
            else:
                raise DataError(
                    f"{where}: a prompt without answers; preference needs chosen/rejected answers"
                )
            example.update(
                prompt=prompt, prompt_text=self.render(prompt, tokenizer, add_generation_prompt=True)
            )
            examples.append(example)
        if dropped:
            say(
                f"{table.path}: {dropped} row(s) dropped: an answer starts after data.max_length={limit} tokens"
            )
        if not examples:
            raise DataError(f"{table.path}: no row has its answers within data.max_length={limit} tokens; "
                            f"raise data.max_length")  # fmt: skip
        return examples

    def encode_answer(self, prompt: list[dict[str, str]], answer: list[dict[str, str]], tokenizer: Any,
                      where: str, limit: int) -> tuple[list[int], list[int]]:  # fmt: skip
        """Token ids of prompt + answer rendered with the chat template, and labels that score only
        the answer (and what the template writes after it, such as the end-of-turn marker)."""
        before = self.render(prompt, tokenizer, add_generation_prompt=True)
        text = self.render(prompt + answer, tokenizer)
        if not text.startswith(before):
            raise ConfigError(f"{where}: the chat template does not render the prompt the same with and without "
                              f"the answer, so the answer cannot be located; set data.template=plain")  # fmt: skip
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        labels = [t if a >= len(before) else IGNORE for t, (a, _) in zip(ids, enc["offset_mapping"])]
        return ids[:limit], labels[:limit]

    def kl_rows(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """KTO's KL estimate reads each prompt with another row's answer. As TRL does, answers are
        rotated by one inside consecutive groups of a batch's size, once, so the mismatched rows
        are fixed (and their reference log-probs can be computed once)."""
        size = batch_size(self.config)
        for s in range(0, len(examples), size):
            group = examples[s : s + size]
            for n, e in enumerate(group):
                other = group[n - 1]
                start, other_start = first_target(e["labels"]), first_target(other["labels"])
                e["kl_ids"] = e["input_ids"][:start] + other["input_ids"][other_start:]
                e["kl_labels"] = [IGNORE] * start + other["labels"][other_start:]
        return examples

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """Pairs: the chosen rows, then the rejected rows, right-padded (no attention mask, as in
        causal-lm: causal attention never looks at the padding after a row). Unpaired rows: the
        rows, whether each is desirable, and (for kto) the mismatched rows of the KL estimate."""
        if "rejected_ids" in examples[0]:
            ids = [e["input_ids"] for e in examples] + [e["rejected_ids"] for e in examples]
            labels = [e["labels"] for e in examples] + [e["rejected_labels"] for e in examples]
        else:
            ids, labels = [e["input_ids"] for e in examples], [e["labels"] for e in examples]
        batch = {"input_ids": pad_sequences(ids, pad_id), "labels": pad_sequences(labels, IGNORE),
                 "lengths": torch.tensor([len(i) for i in ids])}  # fmt: skip
        if "desirable" in examples[0]:
            batch["desirable"] = torch.tensor([bool(e["desirable"]) for e in examples])
        if "kl_ids" in examples[0]:
            batch["kl_input_ids"] = pad_sequences([e["kl_ids"] for e in examples], pad_id)
            batch["kl_labels"] = pad_sequences([e["kl_labels"] for e in examples], IGNORE)
        if "row" in examples[0]:
            batch["rows"] = torch.tensor([e["row"] for e in examples])
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss terms: pairs, or unpaired rows."""
        rows = batch["input_ids"].shape[0]
        return rows if "desirable" in batch else rows // 2

    def probe_batch(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """The chosen rows of at most 8 pairs, cut to 64 tokens (to compare two models' logits)."""
        return {"input_ids": pad_sequences([e["input_ids"][:64] for e in examples[:8]], pad_id)}

    # ----------------------------------------------------------------- model
    @contextmanager
    def as_reference(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The reference model, in a `with` block: the policy with its adapters off (peft
        methods), else a frozen copy of the starting model on the policy's device."""
        import peft  # peft loads only where a task needs it, as in methods/
        from peft.tuners.tuners_utils import BaseTunerLayer

        inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        # Each adapter layer is switched off by its own flag, which tunelab's fused LoRA layers
        # (speed/linear.py) honour too: peft's model-wide `disable_adapter` looks for its layers
        # by type, and the speed layer has put wrappers in their place, which keep the layer
        # they stand in for in `_original` (read here without importing speed/, a sibling layer).
        held = [m.__dict__.get("_original", (m,))[0] for m in inner.modules()]
        layers = [m for m in held if isinstance(m, BaseTunerLayer)]
        if layers:
            was = [m._disable_adapters for m in layers]
            for m in layers:
                m._disable_adapters = True
            try:
                yield inner
            finally:
                for m, flag in zip(layers, was):
                    m._disable_adapters = flag
            return
        if isinstance(inner, peft.PeftModel):  # prompt learning (prefix, prompt): no adapter layers
            with inner.disable_adapter():
                yield inner
            return
        if self.reference is None:
            # the starting model (a chained run's folded weights), never a tuned run's own folder
            with torch.inference_mode(False):  # its weights must be ordinary tensors, whoever asks first
                self.reference = self.build_model(resolve_model(self.config.model))
            self.reference.requires_grad_(False).eval()
        self.reference.to(next(inner.parameters()).device)
        yield self.reference

    # ----------------------------------------------------------------- training
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's summed preference loss (the loop divides by `units`: pairs or rows)."""
        return self.losses(model, batch).sum()

    def losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of each pair (or unpaired row) of the batch, per `preference.loss`."""
        p = self.config.preference
        ids, labels = batch["input_ids"], batch["labels"]
        if p.loss == "kto":
            return self.kto_losses(model, batch)
        pairs = ids.shape[0] // 2
        logps, counts, nll = score(model, ids, labels, batch["lengths"], pairs if p.loss == "orpo" else 0)
        c, r = logps[:pairs], logps[pairs:]
        nc, nr = counts[:pairs], counts[pairs:]
        if p.loss == "simpo":
            return -F.logsigmoid(p.beta * (c / nc - r / nr) - p.gamma)
        if p.loss == "orpo":
            ac, ar = c / nc, r / nr
            log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
            assert nll is not None
            return nll - p.beta * F.logsigmoid(log_odds)
        ref = self.reference_logps(model, batch)
        c0, r0 = ref[:pairs], ref[pairs:]
        # with sft_weight, the chosen answers' token-mean NLL over the batch (TRL's `sft` term)
        sft = -p.sft_weight * c.sum() / nc.sum() if p.sft_weight else 0.0
        if p.loss == "ipo":
            return ((c - c0) / nc - (r - r0) / nr - 1 / (2 * p.beta)) ** 2 + sft
        return -F.logsigmoid(p.beta * ((c - c0) - (r - r0))) + sft

    def kto_losses(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        beta = self.config.preference.beta
        logps, _, _ = score(model, batch["input_ids"], batch["labels"])
        with torch.no_grad():  # the KL estimate only shifts the loss's reference point: no gradient
            kl_logps, _, _ = score(model, batch["kl_input_ids"], batch["kl_labels"])
        ref = self.reference_logps(model, batch)
        rows = logps.shape[0]
        ratio, kl = logps - ref[:rows], (kl_logps - ref[rows:]).mean().clamp(min=0).detach()
        good = batch["desirable"].to(logps.device)
        return torch.where(
            good, 1 - torch.sigmoid(beta * (ratio - kl)), 1 - torch.sigmoid(beta * (kl - ratio))
        )

    def reference_logps(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference model's summed answer log-probs of the batch's rows (then, for kto, its
        KL rows): looked up when precomputed, else computed now."""
        if (
            self.config.preference.precompute_reference
            and "rows" in batch
            and self.train_examples is not None
        ):
            if self.reference_table is None:
                self.reference_table = self.precompute(model)
            found = self.reference_table[batch["rows"].cpu()].to(batch["input_ids"].device)
            return found.T.reshape(-1)  # (chosen..., rejected...) or (rows..., KL rows...)
        return self.reference_of(model, batch)

    @torch.no_grad()
    def reference_of(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        with self.as_reference(model) as reference:
            logps, _, _ = score(reference, batch["input_ids"], batch["labels"])
            if "kl_input_ids" in batch:
                kl, _, _ = score(reference, batch["kl_input_ids"], batch["kl_labels"])
                logps = torch.cat([logps, kl])
        return logps

    @torch.no_grad()
    def precompute(self, model: torch.nn.Module) -> torch.Tensor:
        """(rows, 2): the reference log-probs of every training row (chosen and rejected, or the
        row and its KL row), computed once in batches of train.eval_batch_size."""
        assert self.train_examples is not None
        examples, size = self.train_examples, self.config.train.eval_batch_size
        say(f"preference: computing the reference log-probs of {len(examples)} training rows once")
        table = torch.zeros(len(examples), 2, dtype=torch.float32)
        device = batch_device(model)
        was_training = model.training
        model.eval()
        for s in range(0, len(examples), size):
            chunk = examples[s : s + size]
            batch = to_device({k: v for k, v in self.collate(chunk, 0).items() if k != "rows"}, device)
            values = self.reference_of(model, batch).float().cpu()
            table[s : s + len(chunk)] = values.reshape(2, len(chunk)).T
        model.train(was_training)
        return table

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def outputs(self, model: torch.nn.Module, examples: list[dict[str, Any]], pad_id: int, batch_size: int,
                device: torch.device, dtype: torch.dtype | None) -> list[np.ndarray]:  # fmt: skip
        """Per pair (policy chosen, policy rejected, reference chosen, reference rejected, chosen
        tokens, rejected tokens); per unpaired row (policy, reference, tokens, desirable)."""
        was_training = model.training
        model.eval()
        needs_reference = self.loss_name in REFERENCE_LOSSES
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        out: list[np.ndarray] = [np.zeros(0)] * len(examples)
        step = max(1, batch_size // 2)
        for s in range(0, len(order), step):
            chunk = order[s : s + step]
            rows = [{k: v for k, v in examples[i].items() if k not in ("row", "kl_ids", "kl_labels")}
                    for i in chunk]  # fmt: skip
            # pairs and unpaired rows collate apart
            for kind in (True, False):
                part = [n for n, e in enumerate(rows) if ("rejected_ids" in e) == kind]
                if not part:
                    continue
                batch = to_device(self.collate([rows[n] for n in part], pad_id), device)
                with autocast(device, dtype):
                    logps, counts, _ = score(model, batch["input_ids"], batch["labels"])
                    ref = self.reference_of(model, batch) if needs_reference else torch.zeros_like(logps)
                logps, counts, ref = logps.double().cpu(), counts.double().cpu(), ref.double().cpu()
                k = len(part)
                for j, n in enumerate(part):
                    if kind:
                        values = [logps[j], logps[k + j], ref[j], ref[k + j], counts[j], counts[k + j]]
                    else:
                        values = [logps[j], ref[j], counts[j], torch.tensor(float(rows[n]["desirable"]))]
                    out[chunk[n]] = np.array([float(v) for v in values])
        model.train(was_training)
        return out

    def reward(self, logps: np.ndarray, ref: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """The implicit reward TRL logs for the loss: beta x the log-ratio to the reference (dpo,
        ipo, kto), or beta x the mean token log-prob (simpo, orpo: no reference)."""
        beta = self.config.preference.beta
        if self.loss_name in REFERENCE_LOSSES:
            return beta * (logps - ref)
        return beta * logps / np.maximum(tokens, 1)

    def metrics(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Reward accuracy (the chosen answer's reward above the rejected one's; a tie counts half,
        so a model scored against itself gets 0.5), the mean reward margin, mean rewards and mean
        summed log-probs of the chosen and rejected answers. Unpaired rows: accuracy is the share
        whose reward has the sign of its label; the margin is desirable minus undesirable."""
        pairs = np.array([o for o in outputs if len(o) == 6]).reshape(-1, 6)
        single = np.array([o for o in outputs if len(o) == 4]).reshape(-1, 4)
        if len(pairs):
            chosen = self.reward(pairs[:, 0], pairs[:, 2], pairs[:, 4])
            rejected = self.reward(pairs[:, 1], pairs[:, 3], pairs[:, 5])
            right = (chosen > rejected) + 0.5 * (chosen == rejected)
            logp_c, logp_r = pairs[:, 0], pairs[:, 1]
        else:
            rewards = self.reward(single[:, 0], single[:, 1], single[:, 2])
            good = single[:, 3] > 0.5
            chosen, rejected = rewards[good], rewards[~good]
            right = np.where(good, rewards > 0, rewards < 0) + 0.5 * (rewards == 0)
            logp_c, logp_r = single[good, 0], single[~good, 0]

        def mean(values: np.ndarray) -> float:
            return float(np.mean(values)) if len(values) else float("nan")

        return {"reward_accuracy": mean(right), "reward_margin": mean(chosen) - mean(rejected),
                "rewards_chosen": mean(chosen), "rewards_rejected": mean(rejected),
                "logps_chosen": mean(logp_c), "logps_rejected": mean(logp_r),
                "pairs" if len(pairs) else "rows": int(len(pairs) or len(single))}  # fmt: skip

    def evaluate_model(self, model: torch.nn.Module, tokenizer: Any, examples: list[dict[str, Any]],
                       device: torch.device, dtype: torch.dtype | None,
                       generate: bool = True) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
        """Preference metrics, and (with `generate`) generations for the prompts, scored against
        the chosen answers (BLEU / ROUGE / exact match)."""
        batch = self.config.train.eval_batch_size
        metrics = self.metrics(self.outputs(model, examples, tokenizer.pad_token_id, batch, device, dtype),
                               examples)  # fmt: skip
        if not generate:
            return metrics, []
        scores, generations = self.score_generations(model, tokenizer, examples, device, dtype)
        return {**metrics, **scores}, generations


def score(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor | None = None,
          nll_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """(summed log-prob of each row's targets, target count of each row, and with `nll_rows` the
    mean negative log-likelihood of every real token of the first `nll_rows` rows, ORPO's SFT
    term). The output layer runs only where a log-prob is needed (`only_positions`)."""
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE  # position t predicts token t + 1
    real = torch.zeros_like(scored)
    if nll_rows:
        assert lengths is not None
        real = torch.arange(ids.shape[1], device=ids.device)[None, :] + 1 < lengths.to(ids.device)[:, None]
        real[nll_rows:] = False
    mask = scored | real
    following = torch.zeros_like(ids)
    following[:, :-1] = ids[:, 1:]
    with only_positions(model, mask):
        logits = model(input_ids=ids, use_cache=False).logits
    logp = -F.cross_entropy(logits.float(), following[mask], reduction="none")
    rows = mask.nonzero()[:, 0]
    kept = scored[mask]
    sums = torch.zeros(ids.shape[0], dtype=logp.dtype, device=logp.device).index_add(
        0, rows[kept], logp[kept]
    )
    counts = torch.bincount(rows[kept], minlength=ids.shape[0]).to(logp.dtype)
    nll = -logp[real[mask]].mean() if nll_rows else None
    return sums, counts, nll


def unpair(examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs as KTO rows: the chosen answer desirable, the rejected one not (unpaired rows pass)."""
    out = []
    for e in examples:
        if "rejected_ids" not in e:
            out.append(e)
            continue
        shared = {k: v for k, v in e.items() if k not in ("rejected_ids", "rejected_labels", "reference")}
        out.append({**shared, "desirable": True, "reference": e["reference"]})
        out.append(
            {**shared, "input_ids": e["rejected_ids"], "labels": e["rejected_labels"], "desirable": False}
        )
    return out


def first_target(labels: list[int]) -> int:
    return next((n for n, t in enumerate(labels) if t != IGNORE), len(labels))


def answer_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in messages)


def batch_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
