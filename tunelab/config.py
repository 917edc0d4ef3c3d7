"""The run configuration: typed dataclasses, read from YAML, `key=value` overrides and kwargs.

Every field has a one-line doc (the `doc` metadata) that the config reference
(docs/reference/config.md) and `tunelab train --help` show. Unknown keys, wrong types and bad
values are rejected when the config is built, with the valid keys or choices listed, so
nothing fails deep inside training.

The loader is hand-written (about 150 lines) rather than pydantic/omegaconf because we need
exactly three things, typed dataclasses, dotted overrides and errors that name the key and
the fix, and this keeps the dependency list short.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from tunelab.device import bf16_supported, pick_device
from tunelab.errors import ConfigError
from tunelab.metrics import task_metrics


@dataclass(frozen=True)
class Check:
    """A rule a field's value must meet (None passes wherever the field allows None)."""

    test: Callable[[Any], bool]
    rule: str  # completes "<key>: <value> ...", e.g. "must be >= 1"


def at_least(low: int) -> Check:
    return Check(lambda v: v >= low, f"must be >= {low}")


POSITIVE = Check(lambda v: v > 0, "must be > 0")
SHARE = Check(lambda v: 0 <= v < 1, "must be in [0, 1)")
OPEN_UNIT = Check(lambda v: 0 < v < 1, "must be in (0, 1)")
UPPER_UNIT = Check(lambda v: 0 < v <= 1, "must be in (0, 1]")
ROWS = Check(lambda v: v >= 1, "must be >= 1 (or null for all rows)")


def doc(text: str, default: Any = None, check: Check | None = None, **kw: Any) -> Any:
    """A dataclass field with a one-line description and, with `check`, the rule its value
    must meet (checked by `validate` when the config is built)."""
    metadata = {"doc": text, "check": check}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class AugmentConfig:
    method: Literal["none", "eda"] = doc(
        "Augment training rows: `eda` = random deletion/swap/insertion/synonym replacement.", "none"
    )
    factor: int = doc("Augmented copies per training row (the original is kept).", 2, check=at_least(1))
    p_delete: float = doc("EDA: share of words deleted.", 0.1)
    p_swap: float = doc("EDA: share of words swapped.", 0.1)
    p_insert: float = doc("EDA: share of words inserted (synonyms of words in the text).", 0.1)
    p_synonym: float = doc(
        "EDA: share of words replaced by synonyms (the model's embedding neighbours).", 0.1
    )


@dataclass
class DataConfig:
    train: str | None = doc("Training data file (CSV, TSV, JSON, JSONL or Parquet).")
    validation: str | None = doc(
        "Validation file; when empty, `validation_split` of train is held out (stratified)."
    )
    test: str | None = doc("Test file, evaluated once with the best model at the end.")
    format: Literal[
        "auto", "csv", "tsv", "json", "jsonl", "parquet", "conll", "text",
        "alpaca", "messages", "sharegpt", "prompt-completion", "pairs", "unpaired",
    ] = doc(
        "File format (`text`: plain text, one document per line), or for causal-lm the record layout "
        "(`alpaca`, `messages`, `sharegpt`, `prompt-completion`), for preference `pairs` (prompt, chosen, "
        "rejected) or `unpaired` (prompt, completion, label); `auto` picks from the extension and columns.",
        "auto",
    )  # fmt: skip
    text_column: str = doc("Column holding the input text.", "text")
    text_pair_column: str | None = doc("Optional second text column (sentence pairs, NLI).")
    label_column: str = doc("Column holding the label (string or integer; a number for regression).", "label")
    label_columns: list[str] | None = doc("Multi-label: several 0/1 columns, one per label.")
    label_separator: str = doc("Multi-label: separator of the labels in one text cell.", "|")
    tokens_column: str = doc("Token classification (JSON/JSONL): column with the list of words.", "tokens")
    tags_column: str = doc("Token classification (JSON/JSONL): column with the list of tags.", "tags")
    labels: list[str] | None = doc("Label names in order; default: sorted labels of the train file.")
    max_train_samples: int | None = doc("Use at most this many training rows (seeded shuffle).", check=ROWS)
    max_eval_samples: int | None = doc("Use at most this many validation/test rows (seeded).", check=ROWS)
    validation_split: float = doc(
        "Share of train held out when no validation file is given.", 0.1, check=OPEN_UNIT
    )
    pad_to_multiple_of: int = doc(
        "Round each classification batch's padded length up to a multiple of this: fewer distinct shapes "
        "(each new one costs kernel set-up time and cached memory on CPU), aligned sizes on GPU.",
        4,
        check=at_least(1),
    )
    max_length: int | None = doc(
        "Truncate inputs to this many tokens; default 128, and 512 for causal-lm and seq2seq.",
        check=at_least(2),
    )
    block_size: int | None = doc(
        "causal-lm and masked-lm on plain text: cut the token stream into blocks of this many tokens; "
        "default: max_length.",
        check=at_least(2),
    )
    template: str = doc(
        "causal-lm chat template: `auto` (the tokenizer's, else a plain one), `plain`, or a Jinja file.",
        "auto",
    )
    train_on_prompt: bool = doc(
        "causal-lm: also compute the loss on prompt/user tokens, not only the answers.", False
    )
    packing: bool | None = doc(
        "causal-lm: pack short examples into full rows (attention stays within each example); masked-lm: "
        "concatenate the texts into block_size blocks (false: one text per row); null: on for masked-lm only.",
        None,
    )
    fill: dict[str, str] | None = doc("Replace `{{key}}` placeholders in the texts, e.g. data.fill.name=Ada.")
    source_column: str = doc("seq2seq: column holding the input text.", "source")
    target_column: str = doc("seq2seq: column holding the target text.", "target")
    shots_per_class: int | None = doc(
        "Few-shot: keep this many training rows per class (seeded).", check=at_least(1)
    )
    question_column: str = doc("question-answering (flat rows): column holding the question.", "question")
    context_column: str = doc(
        "question-answering (flat rows): column holding the context passage.", "context"
    )
    answers_column: str = doc(
        "question-answering (flat rows): column of `{text: [...], answer_start: [...]}` (empty lists: "
        "no answer).",
        "answers",
    )
    doc_stride: int = doc(
        "question-answering: tokens shared by consecutive windows of a context longer than max_length.",
        128,
        check=at_least(1),
    )
    fix_offsets: bool = doc(
        "question-answering: when an answer's text is not at its answer_start, use its nearest occurrence "
        "in the context instead of stopping with an error.",
        False,
    )
    check: bool = doc(
        "Check the data at the start of `train` (counts, rows cut by max_length, train/test overlap, the "
        "end-of-turn target) and print a short summary; `tunelab data check` prints the whole report.",
        True,
    )
    cache: bool = doc(
        "classification/regression: keep the tokenized splits as Arrow files in tunelab's cache folder, "
        "memory-mapped (rows cost disk, not RAM) and reused by later runs on the same files, tokenizer and "
        "settings; the files are read in chunks. false: read and tokenize into memory every run.",
        True,
    )
    num_workers: int = doc(
        "Processes that tokenize the data when the cache is built (`datasets` map's num_proc).",
        1,
        check=at_least(1),
    )
    streaming: bool = doc(
        "Read the training file as training goes (CSV, TSV, JSONL, text or Parquet larger than memory), "
        "shuffled through a seeded buffer, without a pass over it first; needs train.max_steps and "
        "data.validation (classification: data.labels); see docs/streaming.md.",
        False,
    )
    shuffle_buffer: int = doc(
        "data.streaming: rows held in the shuffle buffer (more mixes better and holds more in memory).",
        10000,
        check=at_least(1),
    )
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TrainConfig:
    epochs: float = doc("Passes over the training data (fractions allowed).", 3.0, check=POSITIVE)
    max_steps: int | None = doc("Stop after this many optimizer steps (overrides epochs).", check=at_least(1))
    max_minutes: float | None = doc(
        "Stop training after this many minutes (a time budget); the best model so far is kept.",
        check=POSITIVE,
    )
    batch_size: int | None = doc(
        "Examples per forward pass (per process); default 16, and 8 for causal-lm and seq2seq (long rows).",
        check=at_least(1),
    )
    gradient_accumulation: int = doc("Forward passes per optimizer step.", 1, check=at_least(1))
    eval_batch_size: int = doc("Examples per forward pass at evaluation.", 128, check=at_least(1))
    learning_rate: float | None = doc(
        "Peak learning rate; default: the method's own (see docs/methods.md).", check=POSITIVE
    )
    optimizer: Literal["adamw", "sgd"] = doc("Optimizer.", "adamw")
    weight_decay: float = doc("Decoupled weight decay (never on biases and norms).", 0.01, check=at_least(0))
    schedule: Literal["linear", "cosine", "constant"] = doc("Decay after warmup.", "linear")
    warmup_ratio: float = doc("Share of steps spent warming up the learning rate.", 0.1, check=SHARE)
    max_grad_norm: float | None = doc("Clip gradients to this global norm; null turns it off.", 1.0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = doc(
        "Compute precision; `auto` uses bf16 autocast on a GPU with bf16, and on a CPU with AMX, or whose "
        "bf16 matrix products are at least 1.2x faster than float32 by a calibration measured once per "
        "machine and cached (`TUNELAB_RECALIBRATE=1` measures again; `env.json` records the choice); "
        "else fp32.",
        "auto",
    )
    gradient_checkpointing: bool | Literal["auto"] = doc(
        "Recompute activations in the backward pass instead of storing them: far less memory on long rows; "
        "`auto`: the memory plan decides (generative tasks; off for the others).",
        "auto",
    )
    memory_limit_mb: float | Literal["auto", "off", False] = doc(
        "Peak memory (RSS, MB per process) that training must fit: before a generative task trains on a CPU, "
        "a plan picks gradient checkpointing and token-budget micro-batches so the predicted peak fits "
        "(docs/training.md#memory); `auto`: this process's memory plus 70% of what the machine has "
        "available; `off` (or false, or 0): no plan.",
        "auto",
        check=Check(lambda v: isinstance(v, str) or v >= 0, "must be >= 0 (MB), auto or off"),
    )
    fast_kernels: bool = doc(
        "tunelab's CPU speed-ups (modules swapped in; env.json's `speed` says which applied): padding left "
        "out of BERT-family encoders, the last layer computing only the position a classifier reads, eager "
        "attention on short rows, fused LoRA and frozen-linear products (all exact to float rounding), and "
        "cheaper dropout masks (the same drop rate, other random numbers); false: the model's own code.",
        True,
    )
    cache_frozen_layers: bool = doc(
        "freeze only: frozen layers run without dropout, computed once over the training rows (faster; not "
        "the same computation as running them with dropout every step).",
        True,
    )
    length_bucketing: bool = doc("Batch examples of similar length (shuffled buckets) to cut padding.", True)
    eval_steps: int | None = doc("Evaluate every N optimizer steps (besides each epoch).", check=at_least(1))
    eval_each_epoch: bool = doc("Evaluate on validation at the end of every epoch.", True)
    metric_for_best: str = doc("Validation metric that picks the best model; `auto`: the task's.", "auto")
    early_stopping_patience: int | None = doc(
        "Stop after this many evaluations without improvement; null: never stop early.", check=at_least(1)
    )
    log_steps: int = doc(
        "Write training loss to metrics.jsonl every N optimizer steps.", 10, check=at_least(1)
    )
    num_threads: int | None = doc("CPU threads for torch; default: torch's choice.", check=at_least(1))
    checkpoint_steps: int | None = doc(
        "Save a resumable checkpoint every N steps (and at each epoch end); null: epoch ends only.",
        500,
        check=at_least(1),
    )
    keep_checkpoints: int = doc(
        "How many checkpoints to keep while training (they go when it ends).", 2, check=at_least(1)
    )
    distributed: Literal["ddp", "fsdp"] = doc(
        "With several processes: `ddp` replicates the model; `fsdp` shards it (models that don't fit).", "ddp"
    )
    deterministic: bool = doc("Use PyTorch's deterministic algorithms only (slower on some GPUs).", False)
    resume: Literal["never", "auto"] = doc(
        "`auto`: continue from the latest checkpoint of an unfinished run in output_dir.", "never"
    )
    progress_bar: bool = doc("Show a progress bar with loss, throughput and ETA.", True)
    report_to: list[Literal["tensorboard", "mlflow", "trackio"]] = doc(
        "Experiment trackers that get metrics.jsonl's scalars, the config and eval.json (rank 0): "
        "`tensorboard` (<run>/tensorboard), `mlflow`, `trackio` (its local store); see docs/training.md.",
        [],
    )
    mlflow_uri: str | None = doc("MLflow tracking URI; default: a file store `mlruns` beside the run folder.")


@dataclass
class ClassificationConfig:
    multi_label: bool = doc("Each row may carry any number of labels (a list, or separated text).", False)
    threshold: float | None = doc(
        "Multi-label decision threshold; null: tuned on validation.", check=OPEN_UNIT
    )


@dataclass
class MlmConfig:
    probability: float = doc("masked-lm: share of tokens chosen for prediction (80% [MASK], 10% random, "
                             "10% kept).", 0.15, check=OPEN_UNIT)  # fmt: skip
    whole_word: bool = doc("masked-lm: choose whole words (every sub-token of a chosen word).", False)
    top_k: int = doc("masked-lm predict: candidate tokens listed for each [MASK].", 5, check=at_least(1))


@dataclass
class QaConfig:
    max_answer_length: int = doc("question-answering: longest answer span, in tokens.", 30, check=at_least(1))
    n_best: int = doc(
        "question-answering: start and end candidates per window when searching for the best span.",
        20,
        check=at_least(1),
    )
    null_threshold: float | None = doc(
        "question-answering with unanswerable questions: answer only when the best span's score beats the "
        "no-answer score by more than this; null: tuned on validation (saved in the run).",
    )


@dataclass
class FullConfig:
    train_embeddings: bool = doc(
        "Also train the input word-embedding table (frozen by default: on short fine-tuning data most rows "
        "never get a gradient, and skipping it speeds steps up; always trained when tied to the output layer).",
        False,
    )


@dataclass
class FreezeConfig:
    trainable_layers: int = doc(
        "How many of the top transformer layers train (with the head).", 2, check=at_least(0)
    )
    train_embeddings: bool = doc("Also train the input embeddings.", False)


@dataclass
class LoraConfig:
    rank: int = doc("Rank of the low-rank update.", 16, check=at_least(1))
    alpha: float = doc("Scaling numerator: the update is scaled by alpha / rank.", 32.0, check=POSITIVE)
    dropout: float = doc("Dropout on the LoRA input.", 0.0, check=SHARE)
    target_modules: list[str] | str = doc(
        "Linear layers to adapt: names, `all-linear`, or `auto` (attention + FFN).", "auto"
    )
    use_dora: bool = doc("DoRA: learn a magnitude per output too (Liu et al., 2024).", False)
    use_rslora: bool = doc("rsLoRA: scale by alpha / sqrt(rank) instead of alpha / rank.", False)
    quantize: Literal["none", "4bit"] = doc(
        "`4bit`: QLoRA, the frozen base loaded in 4-bit NF4 (bitsandbytes) with LoRA on top; needs a CUDA "
        "GPU and `pip install 'tunelab[gpu]'`.",
        "none",
    )


@dataclass
class AdapterConfig:
    reduction_factor: int = doc("Bottleneck width = hidden size / reduction_factor.", 16, check=at_least(1))
    placement: Literal["houlsby", "pfeiffer"] = doc(
        "houlsby: after attention and FFN; pfeiffer: after FFN only.", "houlsby"
    )


@dataclass
class PrefixConfig:
    num_virtual_tokens: int = doc(
        "Prefix length: key/value vectors added to every layer.", 20, check=at_least(1)
    )
    projection: bool = doc("Reparameterise the prefix through a 2-layer MLP (Li & Liang, 2021).", False)


@dataclass
class PromptConfig:
    num_virtual_tokens: int = doc("Soft prompt length, in embedding vectors.", 20, check=at_least(1))
    init_text: str | None = doc("Initialise the soft prompt from this text's token embeddings.")


@dataclass
class Ia3Config:
    target_modules: list[str] | str = doc(
        "Layers to rescale: names, or `auto` (keys, values and FFN output, per peft).", "auto"
    )


@dataclass
class GenerationConfig:
    max_new_tokens: int = doc(
        "Longest answer generated by predict, chat and serve, in tokens.", 256, check=at_least(1)
    )
    do_sample: bool = doc("Sample instead of greedy decoding.", False)
    temperature: float = doc("Sampling temperature (with do_sample).", 0.7, check=POSITIVE)
    top_p: float = doc(
        "Nucleus sampling: keep the smallest set of tokens with this total probability.",
        0.9,
        check=UPPER_UNIT,
    )
    top_k: int = doc("Sample among the k most likely tokens; 0 turns it off.", 50, check=at_least(0))
    repetition_penalty: float = doc("Penalise tokens already generated (1.0: none).", 1.0, check=POSITIVE)
    system: str | None = doc("System prompt for predict and chat; default: the one used in training.")
    eval_samples: int = doc(
        "Rows per eval split that are generated for BLEU/ROUGE/exact match (0: off).", 100, check=at_least(0)
    )
    eval_max_new_tokens: int = doc("Longest generation when scoring eval rows.", 128, check=at_least(1))
    compare_base: bool = doc("Also score the un-tuned model on the same rows (eval.json `baseline`).", True)


@dataclass
class PreferenceConfig:
    loss: Literal["dpo", "ipo", "orpo", "simpo", "kto"] = doc(
        "preference: the objective (`dpo`, `ipo`, `orpo`, `simpo`, `kto`; see docs/preference.md).", "dpo"
    )
    beta: float = doc("preference: the loss's temperature (how far from the reference; ORPO's odds-ratio "
                      "weight).", 0.1, check=POSITIVE)  # fmt: skip
    gamma: float = doc("preference, SimPO: the target reward margin.", 0.5,
                       check=Check(lambda v: v >= 0, "must be >= 0"))  # fmt: skip
    sft_weight: float = doc(
        "preference, dpo and ipo: add this times the chosen answers' token-mean negative log-likelihood "
        "(TRL's `sft` loss term; RPO), which keeps the model fluent and ending its answers.",
        0.0,
        check=Check(lambda v: v >= 0, "must be >= 0"),
    )
    precompute_reference: bool = doc(
        "preference (dpo, ipo, kto): compute the reference model's log-probabilities once, before the first "
        "step, and reuse them every epoch.",
        False,
    )


MethodName = Literal["full", "freeze", "lora", "adapter", "prefix", "prompt", "ia3"]


@dataclass
class Config:
    model: str = doc("Built-in name (minilm-l6), local folder, or hub id.", "minilm-l6")
    task: Literal[
        "classification",
        "regression",
        "token-classification",
        "causal-lm",
        "seq2seq",
        "masked-lm",
        "question-answering",
        "preference",
    ] = doc("What the model learns to do.", "classification")
    method: MethodName = doc("What trains (see docs/methods.md).", "lora")
    output_dir: str | None = doc("Run directory; default runs/<model>-<method>-<time>.")
    seed: int = doc("Seed for data order, splits, initialisation and dropout.", 42)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    classification: ClassificationConfig = field(default_factory=ClassificationConfig)
    mlm: MlmConfig = field(default_factory=MlmConfig)
    qa: QaConfig = field(default_factory=QaConfig)
    full: FullConfig = field(default_factory=FullConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    ia3: Ia3Config = field(default_factory=Ia3Config)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)


# ---------------------------------------------------------------------------- building


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if typing.get_origin(tp) is dict:
        return f"mapping of {_type_name(typing.get_args(tp)[1])}"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
        choices = ", ".join(str(a) for a in typing.get_args(tp))
        raise ConfigError(f"{key}: {value!r} is not a valid choice; choose one of: {choices}")
    elif origin is list:
        if isinstance(value, list):
            return [_coerce(v, typing.get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return {str(k): _coerce(v, typing.get_args(tp)[1], f"{key}.{k}") for k, v in value.items()}
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, os.PathLike):  # Path objects inside section dicts
            return os.fspath(value)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    else:
        raise TypeError(f"unsupported annotation {tp} on {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _shown(key: str) -> str:
    """A key quoted for a one-line message (escaped when it holds a newline or the like)."""
    return f"'{key}'" if key.isprintable() else repr(key)


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrong types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else "."
            raise ConfigError(
                f"unknown key {_shown(prefix + str(key))}{hint} Valid keys: {', '.join(prefix + n for n in names)}"
            )
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:  # a missing section, or an empty one in YAML (`train:` with nothing under it)
            child = node[part] = {}
        if not isinstance(child, dict):
            where = dotted if dotted.isprintable() else repr(dotted)
            raise ConfigError(f"{where}: {_shown(part)} is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`data.max_length=256` -> ("data.max_length", 256); values are read as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.epochs=1")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def _section_fields() -> dict[str, list[str]]:
    """Field name -> the sections that have it (for kwarg shortcuts like `epochs=1`)."""
    seen: dict[str, list[str]] = {}
    for name, tp in typing.get_type_hints(Config).items():
        if dataclasses.is_dataclass(tp):
            for sub in dataclasses.fields(tp):
                seen.setdefault(sub.name, []).append(name)
    return seen


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    **kwargs: Any,
) -> Config:
    """Build a Config from a YAML file, then `key=value` overrides, then Python kwargs.

    Kwargs take top-level keys (`model=`, `method=`), whole sections as dicts (`data={...}`),
    dotted keys via `**{"train.epochs": 1}`, or any section field whose name is unique
    (`epochs=1`, `text_column="sentence"`); `train="file.csv"` (a string) means `data.train`.

    Raises:
        ConfigError: unreadable YAML, unknown key, wrong type or invalid value.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            hint = (
                " (to resume an unfinished run: tunelab train --resume RUN)"
                if (path / "config.yaml").is_file()
                else ""
            )
            raise ConfigError(
                f"{path} is a folder; give a YAML config file, e.g. {path / 'config.yaml'}{hint}"
            )
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        if path.suffix.lower() in DATA_SUFFIXES:
            raise _data_as_config(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
            problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line
            raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save the config as UTF-8") from None
        if isinstance(loaded, list) and path.suffix.lower() == ".json":
            raise _data_as_config(path)
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        tree = loaded or {}
    for text in overrides or []:
        _set_dotted(tree, *parse_override(text))
    shortcuts = _section_fields()
    for key, value in kwargs.items():
        if key == "train" and isinstance(value, (str, Path)):
            key = "data.train"
        if "." not in key and key not in {f.name for f in dataclasses.fields(Config)} and key in shortcuts:
            sections = shortcuts[key]
            if len(sections) > 1:
                options = " or ".join(f"{section}.{key}" for section in sections)
                raise ConfigError(f"'{key}' is in several sections; name one: {options}")
            key = f"{sections[0]}.{key}"
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, dict):
            value = dict(value)  # later kwargs must not write into the caller's dict
        if isinstance(value, dict) and isinstance(tree.get(key), dict):
            tree[key].update(value)
        else:
            _set_dotted(tree, key, value)
    config = _build(Config, tree)
    validate(config)
    return config


DATA_SUFFIXES = {".csv", ".tsv", ".jsonl", ".parquet", ".txt", ".conll", ".bio", ".iob"}


def _data_as_config(path: Path) -> ConfigError:
    return ConfigError(
        f"{path} looks like a data file, not a YAML config; give it as the training data: "
        f"tunelab train data.train={path} (add task=... model=..., or a config file first)"
    )


def check_columns(config: Config) -> None:
    """The label column may not also be an input: the model would read the answer."""
    d = config.data
    if config.task not in ("classification", "regression"):
        return
    labels = d.label_columns or [d.label_column]
    for key, column in (("data.text_column", d.text_column), ("data.text_pair_column", d.text_pair_column)):
        if column in labels:
            label_key = "data.label_columns" if d.label_columns else "data.label_column"
            raise ConfigError(
                f"{key} and {label_key} both name the column '{column}': the model would read the "
                f"answer; point {key} at the input text (or {label_key} at the labels)"
            )


def validate(config: Config) -> None:
    """Value checks beyond types: each field's own `check` (declared with the field), then
    the checks that span fields or need the machine. Raises ConfigError naming the key, the
    value and the valid range."""
    for key, value, check in field_checks(config):
        if value is not None and not check.test(value):
            raise ConfigError(f"{key}: {value!r} {check.rule}")
    check_metric(config)
    check_columns(config)
    check_precision(config.train.precision)
    check_trackers(config.train.report_to)
    check_quantize(config)
    check_streaming(config)


def field_checks(section: Any, prefix: str = "") -> list[tuple[str, Any, Check]]:
    """(dotted key, value, check) for every field of `section` and its sub-sections that declares a check."""
    found = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            found += field_checks(value, f"{prefix}{f.name}.")
        elif f.metadata.get("check") is not None:
            found.append((prefix + f.name, value, f.metadata["check"]))
    return found


def check_metric(config: Config) -> None:
    """`train.metric_for_best` names a metric the task scores at validation."""
    metric = config.train.metric_for_best
    names = task_metrics(config.task, config.classification.multi_label)
    if metric != "auto" and metric not in names:
        raise ConfigError(f"train.metric_for_best: '{metric}' is not a {config.task} validation metric; "
                          f"choose one of: auto, {', '.join(names)}")  # fmt: skip


def check_trackers(names: Sequence[str]) -> None:
    """Each tracker of `train.report_to` has its library installed (checked without importing it)."""
    for name in names:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"train.report_to: {name} is not installed; pip install 'tunelab[{name}]' "
                              f"(or pip install {'mlflow-skinny' if name == 'mlflow' else name})")  # fmt: skip


def check_precision(precision: str) -> None:
    """`train.precision` is one this machine's device computes in (fp16 needs a GPU; bf16
    needs bf16 kernels)."""
    device = pick_device()
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
    if precision == "bf16" and not bf16_supported(device):
        raise ConfigError(f"train.precision: this {device.type.upper()} has no fast bf16; use fp32 or auto")


QUANTIZE_NEEDS = "lora.quantize=4bit needs a CUDA GPU and bitsandbytes (pip install 'tunelab[gpu]')"


def check_quantize(config: Config) -> None:
    """`lora.quantize=4bit` (QLoRA) is for method=lora, on a CUDA GPU with bitsandbytes installed
    (checked without importing it), so a CPU run stops here rather than after loading the model."""
    if config.lora.quantize == "none":
        return
    if config.method != "lora":
        raise ConfigError(f"lora.quantize=4bit applies to method=lora, not method={config.method}; "
                          f"set method=lora or lora.quantize=none")  # fmt: skip
    if config.train.distributed == "fsdp":  # FSDP would shard the packed 4-bit weights as plain bytes
        raise ConfigError("lora.quantize=4bit does not combine with train.distributed=fsdp; use ddp")
    if pick_device().type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(QUANTIZE_NEEDS)


STREAMING_TASKS = ("classification", "regression")


def check_streaming(config: Config) -> None:
    """`data.streaming` reads the training file once per pass, as it trains: refuse, at load,
    the settings that need the whole file first."""
    d, t = config.data, config.train
    if not d.streaming:
        return
    if config.task not in STREAMING_TASKS:
        raise ConfigError(f"data.streaming supports task={' and task='.join(STREAMING_TASKS)}, not "
                          f"task={config.task}; set data.streaming=false")  # fmt: skip
    if t.max_steps is None:
        raise ConfigError("data.streaming needs train.max_steps (the schedule's length: a stream's rows, and so "
                          "its steps per epoch, are not counted before training); set train.max_steps=N")  # fmt: skip
    if not d.validation:
        raise ConfigError("data.streaming needs data.validation=<file> (holding out data.validation_split of a "
                          "stream would need a pass over it first)")  # fmt: skip
    if config.task == "classification" and not (d.labels or d.label_columns):
        raise ConfigError("data.streaming with task=classification needs data.labels (the label set is "
                          "otherwise read from the whole train file); list them, e.g. data.labels=[neg,pos]")  # fmt: skip
    refused = {
        "data.max_train_samples": (d.max_train_samples is not None, "bound training with train.max_steps"),
        "data.shots_per_class": (d.shots_per_class is not None, "set data.streaming=false"),
        "data.augment.method": (d.augment.method != "none", "set data.augment.method=none"),
        "data.format": (d.format == "json" or (d.format == "auto" and str(d.train or "").lower().endswith(".json")),
                        "convert the file to JSONL (one object per line)"),
    }  # fmt: skip
    for key, (bad, fix) in refused.items():
        if bad:
            raise ConfigError(f"{key} needs the whole training file, so it does not apply with "
                              f"data.streaming; {fix}")  # fmt: skip


GENERATIVE_TASKS = ("causal-lm", "seq2seq", "preference")
CAUSAL_LM_TASKS = ("causal-lm", "preference")  # a preference run is a causal LM: exported and served as one


def max_length(config: Config) -> int:
    """`data.max_length`, or the task's default when it is not set."""
    if config.data.max_length is not None:
        return config.data.max_length
    if config.task == "question-answering":  # question and context share each window
        return 384
    return 512 if config.task in GENERATIVE_TASKS else 128


def batch_size(config: Config) -> int:
    """`train.batch_size`, or the task's default when it is not set."""
    if config.train.batch_size is not None:
        return config.train.batch_size
    return 8 if config.task in GENERATIVE_TASKS else 16


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: Path) -> None:
    """Write whole or not at all (a temporary name, then renamed): a crash mid-write never
    leaves half a config for `--resume` to read as a different one."""
    part = path.with_name(f".{path.name}.partial")
    part.write_text(yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True))
    os.replace(part, path)


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(dotted key, doc, default) for every leaf field: the config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            rows += field_docs(hints[f.name], f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        else:
            assert callable(f.default_factory)  # every config field has a default or a factory
            default = f.default_factory()
        rows.append((prefix + f.name, f.metadata.get("doc", ""), default))
    return rows
