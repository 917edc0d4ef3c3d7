"""The config loader: YAML, `key=value` overrides and kwargs, their precedence, and its errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tunelab.config import Config, field_docs, load_config, parse_override, save_config
from tunelab.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- sources


def test_defaults_without_any_source():
    assert load_config() == Config()


def test_yaml_file(tmp_path):
    path = write(
        tmp_path / "run.yaml",
        """
model: tiny
method: full
seed: 7
data:
  train: train.csv
  text_column: sentence
  labels: [neg, pos]
train:
  epochs: 2
  learning_rate: 1e-4   # YAML 1.1 reads this as a string; the loader turns it into a float
lora:
  target_modules: [query, value]
""",
    )
    config = load_config(path)
    assert (config.model, config.method, config.seed) == ("tiny", "full", 7)
    assert config.data.train == "train.csv" and config.data.text_column == "sentence"
    assert config.data.labels == ["neg", "pos"]
    assert config.train.epochs == 2.0 and isinstance(config.train.epochs, float)
    assert config.train.learning_rate == pytest.approx(1e-4)
    assert config.lora.target_modules == ["query", "value"]
    assert config.train.batch_size == Config().train.batch_size  # untouched keys keep defaults


def test_empty_yaml_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path / "empty.yaml", "# nothing yet\n")) == Config()


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("train.batch_size=8", "train.batch_size", 8),
        ("train.epochs=0.5", "train.epochs", 0.5),
        ("train.learning_rate=1e-4", "train.learning_rate", 1e-4),
        ("train.progress_bar=false", "train.progress_bar", False),
        ("train.max_grad_norm=null", "train.max_grad_norm", None),
        ("train.max_grad_norm=", "train.max_grad_norm", None),
        ("data.labels=[neg, pos]", "data.labels", ["neg", "pos"]),
        ("data.labels=[0, 1]", "data.labels", ["0", "1"]),
        ("data.text_column=sentence", "data.text_column", "sentence"),
        ("model=a=b", "model", "a=b"),  # only the first `=` splits
    ],
)
def test_override_values_are_yaml_scalars(text, key, value):
    config = load_config(overrides=[text])
    section, _, name = key.rpartition(".")
    got = getattr(getattr(config, section), name) if section else getattr(config, name)
    assert got == value


def test_parse_override():
    assert parse_override("data.max_length=256") == ("data.max_length", 256)
    assert parse_override(" seed = 3") == ("seed", 3)
    with pytest.raises(ConfigError, match=r"must look like key=value, e\.g\. train\.epochs=1"):
        parse_override("train.epochs")


def test_override_into_a_yaml_section_left_empty(tmp_path):
    """`train:` with every key commented out is null in YAML; overrides still go into it."""
    path = write(tmp_path / "run.yaml", "train:\n  # epochs: 3\n")
    assert load_config(path, ["train.epochs=1"]).train.epochs == 1.0


@pytest.mark.parametrize(
    ("kwargs", "check"),
    [
        ({"model": "tiny", "seed": 3}, lambda c: (c.model, c.seed) == ("tiny", 3)),
        (
            {"train": {"epochs": 1, "batch_size": 4}},
            lambda c: (c.train.epochs, c.train.batch_size) == (1.0, 4),
        ),
        ({"data": {"train": Path("a.csv")}}, lambda c: c.data.train == "a.csv"),
        (
            {"train.epochs": 1, "data.max_length": 64},
            lambda c: (c.train.epochs, c.data.max_length) == (1.0, 64),
        ),
        ({"epochs": 1}, lambda c: c.train.epochs == 1.0),
        ({"text_column": "sentence"}, lambda c: c.data.text_column == "sentence"),
        ({"rank": 4}, lambda c: c.lora.rank == 4),
        ({"train": "file.csv"}, lambda c: c.data.train == "file.csv" and c.train == Config().train),
        ({"train": Path("file.csv")}, lambda c: c.data.train == "file.csv"),
        ({"validation": Path("v.csv")}, lambda c: c.data.validation == "v.csv"),
        ({"train": "t.csv", "epochs": 2}, lambda c: (c.data.train, c.train.epochs) == ("t.csv", 2.0)),
    ],
)
def test_kwargs(kwargs, check):
    assert check(load_config(**kwargs))


def test_section_dict_merges_with_yaml_and_other_kwargs(tmp_path):
    path = write(tmp_path / "run.yaml", "train:\n  epochs: 5\n  batch_size: 32\n")
    config = load_config(path, train={"batch_size": 4}, warmup_ratio=0.0)
    assert (config.train.epochs, config.train.batch_size, config.train.warmup_ratio) == (5.0, 4, 0.0)


def test_kwargs_do_not_modify_the_callers_dict():
    section = {"batch_size": 4}
    load_config(train=section, epochs=1)
    assert section == {"batch_size": 4}


# ---------------------------------------------------------------------------- precedence


def test_precedence_kwargs_over_overrides_over_yaml(tmp_path):
    path = write(tmp_path / "run.yaml", "seed: 1\ntrain:\n  epochs: 5\n  batch_size: 32\n  log_steps: 7\n")
    config = load_config(path, ["train.epochs=2", "train.batch_size=8"], epochs=1)
    assert config.train.epochs == 1.0  # kwarg beats override and YAML
    assert config.train.batch_size == 8  # override beats YAML
    assert config.train.log_steps == 7 and config.seed == 1  # YAML beats defaults


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (
            {"overrides": ["data.txt_column=x"]},
            r"unknown key 'data\.txt_column'; did you mean 'data\.text_column'\? Valid keys: data\.train, ",
        ),
        ({"**": {"train.epoch": 1}}, r"unknown key 'train\.epoch'; did you mean 'train\.epochs'\?"),
        ({"**": {"lora.rnak": 1}}, r"unknown key 'lora\.rnak'; did you mean 'lora\.rank'\?"),
        ({"overrides": ["modle=x"]}, r"unknown key 'modle'; did you mean 'model'\?"),
        ({"**": {"trian.epochs": 1}}, r"unknown key 'trian'; did you mean 'train'\?"),
        (
            {"overrides": ["zzz=1"]},
            r"unknown key 'zzz'\. Valid keys: model, task, method, output_dir, seed, data, train, ",
        ),
    ],
)
def test_unknown_key_names_it_and_suggests_the_close_match(source, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=source.get("overrides"), **source.get("**", {}))


def test_unknown_key_in_yaml(tmp_path):
    path = write(tmp_path / "run.yaml", "data:\n  txt_column: sentence\n")
    with pytest.raises(
        ConfigError, match=r"unknown key 'data\.txt_column'; did you mean 'data\.text_column'"
    ):
        load_config(path)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=big", "train.batch_size: expected int or null, got 'big'"),
        ("train.batch_size=1.5", "train.batch_size: expected int or null, got 1.5"),
        ("train.batch_size=true", "train.batch_size: expected int or null, got True"),
        ("train.learning_rate=fast", "train.learning_rate: expected float or null, got 'fast'"),
        ("train.progress_bar=maybe", "train.progress_bar: expected bool, got 'maybe'"),
        ("data.text_column=null", "data.text_column: expected str, got None"),
        ("data.labels=neg", "data.labels: expected list of str or null, got 'neg'"),
        ("data={a: 1}", "unknown key 'data.a'"),
        ("data=file.csv", "data: expected a mapping of keys, got 'file.csv'"),
    ],
)
def test_wrong_type_names_key_expected_type_and_value(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=[override])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"method": "qlora"},
            "method: 'qlora' is not a valid choice; choose one of: full, freeze, lora, adapter, prefix, prompt, ia3",
        ),
        ({"optimizer": "adam"}, "train.optimizer: 'adam' is not a valid choice; choose one of: adamw, sgd"),
        (
            {"format": "xlsx"},
            "data.format: 'xlsx' is not a valid choice; choose one of: auto, csv, tsv, json, jsonl, parquet",
        ),
        (
            {"precision": "fp8"},
            "train.precision: 'fp8' is not a valid choice; choose one of: auto, fp32, bf16, fp16",
        ),
    ],
)
def test_bad_choice_lists_the_choices(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(**kwargs)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("train.epochs", 0, "train.epochs: 0.0 must be > 0"),
        ("train.epochs", -1, "train.epochs: -1.0 must be > 0"),
        ("train.batch_size", 0, "train.batch_size: 0 must be >= 1"),
        ("train.learning_rate", 0, "train.learning_rate: 0.0 must be > 0"),
        ("train.warmup_ratio", 1, "train.warmup_ratio: 1.0 must be in [0, 1)"),
        ("train.warmup_ratio", -0.1, "train.warmup_ratio: -0.1 must be in [0, 1)"),
        ("data.validation_split", 1.5, "data.validation_split: 1.5 must be in (0, 1)"),
        ("data.validation_split", 0, "data.validation_split: 0.0 must be in (0, 1)"),
        ("data.max_length", 1, "data.max_length: 1 must be >= 2"),
        ("data.max_train_samples", 0, "data.max_train_samples: 0 must be >= 1"),
        ("data.max_eval_samples", 0, "data.max_eval_samples: 0 must be >= 1"),
        ("lora.rank", 0, "lora.rank: 0 must be >= 1"),
        ("lora.dropout", 1.0, "lora.dropout: 1.0 must be in [0, 1)"),
    ],
)
def test_value_checks_name_the_key_the_value_and_the_range(key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(**{key: value})


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = write(tmp_path / "bad.yaml", "model: tiny\ndata:\n  train: a.csv\n   text_column: x\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:4:") + r"\d+: not valid YAML \("):
        load_config(path)


def test_yaml_whose_top_level_is_a_list(tmp_path):
    path = write(tmp_path / "list.yaml", "- model: tiny\n- seed: 1\n")
    with pytest.raises(
        ConfigError, match=re.escape(f"{path}: the top level must be a mapping of keys, got list")
    ):
        load_config(path)


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"config file not found: {path}")):
        load_config(path)


def test_dotted_key_through_a_value():
    with pytest.raises(ConfigError, match=re.escape("data.train.x: 'train' is a value, not a section")):
        load_config(train="a.csv", **{"data.train.x": 1})


# ---------------------------------------------------------------------------- saving, docs


def test_save_then_load_round_trips(tmp_path):
    config = load_config(
        overrides=["train.learning_rate=3e-5", "data.labels=[b, a]", "train.max_grad_norm=null"],
        model="tiny",
        method="full",
        seed=5,
        train="t.csv",
        text_column="sentence",
        epochs=0.5,
        max_steps=10,
        alpha=8,
        **{"lora.target_modules": ["query", "value"]},
    )
    path = tmp_path / "config.yaml"
    save_config(config, path)
    assert load_config(path) == config
    assert load_config(tmp_path / "config.yaml") != Config()


def test_every_leaf_field_has_a_doc():
    rows = field_docs()
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert {"model", "data.text_column", "train.epochs", "lora.rank"} <= set(keys)
    assert not [key for key, text, _ in rows if not text.strip()]
    assert all(
        "." not in key
        or key.split(".")[0]
        in {
            "data",
            "train",
            "classification",
            "mlm",
            "qa",
            "full",
            "freeze",
            "lora",
            "adapter",
            "prefix",
            "prompt",
            "ia3",
            "generation",
            "preference",
        }
        for key in keys
    )
    defaults = {key: default for key, _, default in rows}
    assert defaults["train.epochs"] == Config().train.epochs and defaults["data.text_column"] == "text"


def test_ambiguous_shortcut_asks_for_the_section():
    with pytest.raises(
        ConfigError,
        match=r"'target_modules' is in several sections; name one: lora.target_modules or ia3.target_modules",
    ):
        load_config(target_modules=["query"])


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lora.alpha", 0, r"lora.alpha: 0.0 must be > 0"),
        ("train.num_threads", 0, r"train.num_threads: 0 must be >= 1"),
        ("train.early_stopping_patience", 0, r"train.early_stopping_patience: 0 must be >= 1"),
    ],
)
def test_more_value_checks(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(**{key: value})


def test_a_folder_given_as_config_says_so(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(
        ConfigError, match=r"is a folder; give a YAML config file, .*tunelab train --resume RUN"
    ):
        load_config(tmp_path)


def test_metric_for_best_is_checked_at_load_against_the_task_metrics():
    with pytest.raises(ConfigError, match=r"train.metric_for_best: 'bleu' is not a classification validation "
                       r"metric; choose one of: auto, accuracy, .*f1_micro"):  # fmt: skip
        load_config(metric_for_best="bleu")
    with pytest.raises(ConfigError, match=r"'accuracy' is not a regression validation metric; .*mse, mae"):
        load_config(task="regression", metric_for_best="accuracy")
    with pytest.raises(ConfigError, match=r"'accuracy' is not a classification .*subset_accuracy"):
        load_config(multi_label=True, metric_for_best="accuracy")  # multi-label scores subset accuracy
    assert load_config(task="regression", metric_for_best="mae").train.metric_for_best == "mae"
    assert load_config(task="causal-lm", metric_for_best="perplexity").train.metric_for_best == "perplexity"


def test_precision_is_checked_against_this_machine_at_load(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"train.precision: fp16 needs a CUDA GPU; use bf16 or fp32 on CPU"):
        load_config(precision="fp16")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match=r"train.precision: this CPU has no fast bf16; use fp32 or auto"):
        load_config(precision="bf16")
    assert load_config(precision="auto").train.precision == "auto"


def test_every_range_check_sits_with_its_field_and_names_key_value_and_rule():
    from tunelab.config import field_checks

    checks = {key: check for key, _, check in field_checks(load_config())}
    assert len(checks) >= 38  # epochs, batch sizes, rates, lengths, sampling, method sizes ...
    for key in (
        "train.epochs",
        "lora.rank",
        "data.validation_split",
        "generation.top_p",
        "data.augment.factor",
    ):
        assert key in checks
    # each check rejects a value past its bound, with the key, the value and the rule in one line
    for key, bad in (("train.warmup_ratio", 1.0), ("generation.top_p", 1.5), ("data.max_length", 1)):
        with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: {bad!r} {re.escape(checks[key].rule)}$"):
            load_config(overrides=[f"{key}={bad}"])
    # None passes where the field allows it (null means "not set")
    assert load_config(overrides=["train.max_steps=null"]).train.max_steps is None
