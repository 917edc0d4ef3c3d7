"""Causal language modelling: plain text (domain adaptation) and instruction / chat tuning.

Layouts (`data.format`, or detected from the file):

- `text`: a .txt file (one document per line) or a `data.text_column`; documents are
  tokenized, joined with the eos token and cut into `data.block_size` blocks; every token is
  a target.
- `alpaca`: `instruction`, optional `input`, `output`, optional `system` and `history`
  (a list of [question, answer] pairs before this one).
- `messages`: `messages: [{role, content}]` (system / user / assistant, OpenAI style).
- `sharegpt`: `conversations: [{from, value}]` (human / gpt / system), optional `system`.
- `prompt-completion`: `prompt` and `completion`, joined as raw text (no chat template).

Conversations are rendered with the chat template (the tokenizer's, `data.template=plain` for
a simple `### Instruction` / `### Response` one, or a Jinja file). Only the assistant turns
are targets unless `data.train_on_prompt`: each answer's span is found by rendering the
conversation up to that turn, so the end-of-turn marker the template writes after an
answer is a target too, and the tuned model learns to stop. With `data.packing`, short
examples share a row; their position ids restart, which makes transformers' attention keep
each example to itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from tunelab.config import Config, max_length
from tunelab.console import say
from tunelab.data import FORMATS, Table, is_missing, read_table, shown_list
from tunelab.errors import ConfigError, DataError
from tunelab.methods import METHODS
from tunelab.tasks.base import Splits, split_and_encode
from tunelab.tasks.generative import IGNORE, GenerativeTask, fill_placeholders, pad_sequences

Layout = Literal["text", "prompt-completion", "alpaca", "messages", "sharegpt"]  # how a record reads
CHAT_LAYOUTS: tuple[Layout, ...] = ("alpaca", "messages", "sharegpt")
LAYOUTS: tuple[Layout, ...] = ("text", "prompt-completion", *CHAT_LAYOUTS)
FILE_FORMATS = ("csv", "tsv", "json", "jsonl", "parquet")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant"}  # fmt: skip

PLAIN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def detect_layout(table: Table, text_column: str) -> Layout:
    columns = set(table.columns)
    if table.path.suffix.lower() == ".txt":
        return "text"
    by_columns: tuple[tuple[Layout, set[str]], ...] = (
        ("messages", {"messages"}), ("sharegpt", {"conversations"}),
        ("alpaca", {"instruction"}), ("prompt-completion", {"prompt"}),
    )  # fmt: skip
    for layout, needed in by_columns:
        if needed <= columns:
            return layout
    if text_column in columns:
        return "text"
    raise DataError(
        f"{table.path}: cannot tell the layout from the columns ({shown_list(table.columns)}); causal-lm reads "
        f"'messages' (chat), 'conversations' (ShareGPT), 'instruction'/'input'/'output' (Alpaca), "
        f"'prompt'/'completion', or plain text (a .txt file or a '{text_column}' column); or set data.format"
    )


def _text(value: Any, where: str, key: str, required: bool = True) -> str:
    if is_missing(value) or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataError(f"{where}: '{key}' is missing or empty; fill it in or remove the row")
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: '{key}' must be text, got {type(value).__name__} {value!r}")
    return value


class CausalLMTask(GenerativeTask):
    name = "causal-lm"
    peft_task_type = "CAUSAL_LM"
    shift = True

    def __init__(self, config: Config, labels: list[str] | None = None):
        super().__init__(config, labels)
        self.layout: Layout | None = config.data.format if config.data.format in LAYOUTS else None

    # ----------------------------------------------------------------- data
    def _file_format(self, path: str) -> str:
        fmt = self.config.data.format
        if fmt in FILE_FORMATS:
            return fmt
        if fmt == "text" and Path(path).suffix.lower() not in FORMATS:
            return "text"
        return "auto"

    def read(self, path: str, need_labels: bool = True) -> Table:
        """Read a file and turn every row into a record (text, conversation or prompt and
        completion), checking it; the first file read fixes the layout unless data.format does."""
        table = read_table(path, self._file_format(path))
        layout = self.layout or detect_layout(table, self.config.data.text_column)
        if layout in CHAT_LAYOUTS:  # a later file (validation, eval) may use another chat layout
            try:
                found = detect_layout(table, self.config.data.text_column)
                layout = found if found in CHAT_LAYOUTS else layout
            except DataError:
                pass
        self.layout = self.layout or layout
        table.rows = [self.record(table, i, layout, need_labels) for i in range(len(table))]
        return table

    def record(self, table: Table, i: int, layout: str, need_answer: bool = True) -> dict[str, Any]:
        """One row as {"text"}, {"prompt", "completion"} or {"messages"} (the last one the
        answer); raises DataError naming the row for anything malformed."""
        where = table.where(i)
        row = fill_placeholders(table.rows[i], self.config.data.fill, where)
        if layout == "text":
            column = "text" if table.path.suffix.lower() == ".txt" else self.config.data.text_column
            if column not in row:
                raise DataError(f"{where}: no '{column}' column; set data.text_column")
            return {"text": _text(row.get(column), where, column)}
        if layout == "prompt-completion":
            return {"prompt": _text(row.get("prompt"), where, "prompt"),
                    "completion": _text(row.get("completion"), where, "completion", need_answer)}  # fmt: skip
        if layout == "alpaca":
            messages = []
            system = _text(row.get("system"), where, "system", False)
            if system:
                messages.append({"role": "system", "content": system})
            history = row.get("history") or []
            if not isinstance(history, list) or not all(isinstance(h, list) and len(h) == 2 for h in history):
                raise DataError(f"{where}: 'history' must be a list of [question, answer] pairs")
            for n, (question, answer) in enumerate(history):
                messages.append({"role": "user", "content": _text(question, where, f"history[{n}][0]")})
                messages.append({"role": "assistant", "content": _text(answer, where, f"history[{n}][1]")})
            prompt = _text(row.get("instruction"), where, "instruction")
            extra = _text(row.get("input"), where, "input", False)
            messages.append({"role": "user", "content": f"{prompt}\n{extra}" if extra else prompt})
            output = _text(row.get("output"), where, "output", need_answer)
            if output:
                messages.append({"role": "assistant", "content": output})
            return {"messages": messages}
        key = "messages" if layout == "messages" else "conversations"
        turns = row.get(key)
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: '{key}' must be a non-empty list of turns")
        messages = []
        system = _text(row.get("system"), where, "system", False) if layout == "sharegpt" else ""
        if system:
            messages.append({"role": "system", "content": system})
        for n, turn in enumerate(turns):
            role_key, text_key = ("role", "content") if layout == "messages" else ("from", "value")
            if not isinstance(turn, dict) or role_key not in turn or text_key not in turn:
                raise DataError(f"{where}: {key}[{n}] must be an object with '{role_key}' and '{text_key}'")
            role = turn[role_key] if layout == "messages" else SHAREGPT_ROLES.get(str(turn[role_key]).lower())
            if role not in ("system", "user", "assistant"):
                choices = "system, user, assistant" if layout == "messages" else ", ".join(SHAREGPT_ROLES)
                raise DataError(
                    f"{where}: {key}[{n}].{role_key} is {turn[role_key]!r}; use one of: {choices}"
                )
            messages.append({"role": role, "content": _text(turn[text_key], where, f"{key}[{n}].{text_key}")})
        if need_answer and messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last turn of '{key}' must be the assistant's answer (the target)")
        return {"messages": messages}

    def load_splits(self, tokenizer: Any) -> Splits:
        d = self.config.data
        if not d.train:
            raise DataError(
                "no training data: set data.train=<file> (.txt, JSON, JSONL, CSV, TSV or Parquet)"
            )
        if d.packing and METHODS[self.config.method].VIRTUAL_TOKENS:
            raise ConfigError(f"data.packing does not work with method={self.config.method} (its virtual "
                              f"tokens would be shared by the packed examples); turn one of them off")  # fmt: skip
        if d.shots_per_class:
            raise ConfigError("data.shots_per_class is for classification; use data.max_train_samples")
        if d.augment.method != "none":
            raise ConfigError("data.augment is for classification; set data.augment.method=none")
        train = self.read(d.train)
        assert self.layout is not None  # `read` fixes it
        self.config.data.format = self.layout  # the resolved config records the layout
        self.template(tokenizer)
        splits = split_and_encode(self, train, None, tokenizer)
        if d.packing:
            splits.train = pack(splits.train, max_length(self.config))
        return splits

    # ----------------------------------------------------------------- encoding
    def template(self, tokenizer: Any) -> str:
        """The chat template in use; it is set on the tokenizer, which is saved with the run."""
        choice = self.config.data.template
        if choice == "auto":
            text = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else PLAIN_TEMPLATE
        elif choice == "plain":
            text = PLAIN_TEMPLATE
        else:
            path = Path(choice)
            if not path.is_file():
                raise ConfigError(f"data.template: {choice!r} is neither auto, plain nor a Jinja file")
            text = path.read_text(encoding="utf-8")
        tokenizer.chat_template = text
        return text

    def render(
        self, messages: list[dict[str, str]], tokenizer: Any, add_generation_prompt: bool = False
    ) -> str:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def encode(self, table: Table, tokenizer: Any, with_labels: bool = True) -> list[dict[str, Any]]:
        records = table.rows
        if self.layout == "text":
            return self._blocks([r["text"] for r in records], tokenizer)
        examples, dropped = [], 0
        limit = max_length(self.config)
        for i, r in enumerate(records):
            if "messages" in r:
                example = self._encode_chat(r["messages"], tokenizer, table.where(i))
            else:
                example = self._encode_completion(r["prompt"], r["completion"], tokenizer)
            example["input_ids"], example["labels"] = example["input_ids"][:limit], example["labels"][:limit]
            if all(t == IGNORE for t in example["labels"][1:]):
                dropped += 1
                continue
            examples.append(example)
        if dropped:
            say(f"{table.path}: {dropped} example(s) dropped: the answer starts after data.max_length={limit} "
                f"tokens")  # fmt: skip
        if not examples:
            raise DataError(f"{table.path}: no example has an answer within data.max_length={limit} tokens; "
                            f"raise data.max_length")  # fmt: skip
        return examples

    def _blocks(self, texts: list[str], tokenizer: Any) -> list[dict[str, Any]]:
        size = self.config.data.block_size or max_length(self.config)
        stream: list[int] = []
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream += ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        blocks = [stream[s : s + size] for s in range(0, len(stream), size)]
        return [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) >= 2]

    def _encode_completion(self, prompt: str, completion: str, tokenizer: Any) -> dict[str, Any]:
        head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tail = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        target = list(head) if self.config.data.train_on_prompt else [IGNORE] * len(head)
        return {"input_ids": head + tail, "labels": target + tail, "prompt": prompt, "reference": completion,
                "prompt_text": prompt}  # fmt: skip

    def _encode_chat(self, messages: list[dict[str, str]], tokenizer: Any, where: str) -> dict[str, Any]:
        text = self.render(messages, tokenizer)
        spans = []
        for n, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:n], tokenizer, add_generation_prompt=True)
            upto = self.render(messages[: n + 1], tokenizer)
            if not (text.startswith(upto) and upto.startswith(before)):
                raise ConfigError(
                    f"{where}: the chat template does not render this conversation turn by turn, so the "
                    f"answers cannot be located; set data.train_on_prompt=true, or data.template=plain"
                )
            spans.append((len(before), len(upto)))
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        if self.config.data.train_on_prompt:
            labels = list(ids)
        else:
            labels = [
                t if any(s <= a < e for s, e in spans) else IGNORE
                for t, (a, _) in zip(ids, enc["offset_mapping"])
            ]
        example: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if messages[-1]["role"] == "assistant":
            prompt = messages[:-1]
            example.update(prompt=prompt, reference=messages[-1]["content"],
                           prompt_text=self.render(prompt, tokenizer, add_generation_prompt=True))  # fmt: skip
        return example

    def encode_inputs(self, texts: list[str], tokenizer: Any, pairs: list[str] | None = None) -> list[dict]:
        """Prompts for generation: each text as the user's message (or raw text for text and
        prompt-completion runs)."""
        return [{"prompt_text": self.prompt_for(t, tokenizer), "prompt": t} for t in texts]

    def file_prompts(self, table: Table, tokenizer: Any) -> list[tuple[Any, str]]:
        """(what the row asks, the rendered prompt) for each record of a file read with
        `need_labels=False`; a conversation's final answer, when present, is left out."""
        out = []
        for r in table.rows:
            if "text" in r:
                out.append((r["text"], r["text"]))
            elif "prompt" in r:
                out.append((r["prompt"], r["prompt"]))
            else:
                messages = r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"]
                out.append((messages, self.render(messages, tokenizer, add_generation_prompt=True)))
        return out

    def prompt_for(self, text: str, tokenizer: Any, history: list[dict[str, str]] | None = None) -> str:
        if self.layout in ("text", "prompt-completion"):
            return text
        messages = list(history or [])
        system = self.config.generation.system
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        return self.render(
            [*messages, {"role": "user", "content": text}], tokenizer, add_generation_prompt=True
        )

    # ----------------------------------------------------------------- model
    def build_model(self, path: str) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, **self.pretrained_options())

    def collate(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded rows without an attention mask: causal attention never looks ahead, so
        the padding after a row's end cannot change its outputs (and sdpa keeps its fast path).
        Packed rows carry position ids that restart at each example."""
        batch = {"input_ids": pad_sequences([e["input_ids"] for e in examples], pad_id),
                 "labels": pad_sequences([e["labels"] for e in examples], IGNORE)}  # fmt: skip
        if "position_ids" in examples[0]:
            longest = batch["input_ids"].shape[1]
            batch["position_ids"] = torch.stack([
                torch.tensor(e["position_ids"] + list(range(longest - len(e["position_ids"]))))
                for e in examples
            ])  # fmt: skip
        return batch


def pack(examples: list[dict[str, Any]], capacity: int) -> list[dict[str, Any]]:
    """First-fit-decreasing packing of examples into rows of at most `capacity` tokens; each
    row gets position ids that restart at every example it holds."""
    rows: list[dict[str, Any]] = []
    for e in sorted(examples, key=lambda e: -len(e["input_ids"])):
        n = len(e["input_ids"])
        for row in rows:
            if len(row["input_ids"]) + n <= capacity:
                break
        else:
            row = {"input_ids": [], "labels": [], "position_ids": []}
            rows.append(row)
        row["input_ids"] += e["input_ids"]
        # the first token of an example is never a target of the previous one's last token
        row["labels"] += [IGNORE] + e["labels"][1:]
        row["position_ids"] += list(range(n))
    return rows
