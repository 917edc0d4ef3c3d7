"""causal-lm and seq2seq: data layouts, answer-only targets, packing, the target-only loss,
generation metrics, and train / eval / predict / chat through the CLI on tiny random models."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from tunelab.cli import main
from tunelab.config import load_config
from tunelab.errors import ConfigError, DataError
from tunelab.methods import METHODS, plain_weights
from tunelab.metrics import generation_metrics
from tunelab.models import load_tokenizer
from tunelab.run import load, seed_everything
from tunelab.tasks import TASKS
from tunelab.tasks.causal_lm import pack
from tunelab.tasks.generative import IGNORE

from .conftest import write_tiny_llama, write_tiny_seq2seq

ANSWER = "good great fine"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def alpaca_rows(n):
    words = ["movie", "film", "plot", "acting"]
    return [{"instruction": f"the {words[i % 4]} was", "input": "", "output": ANSWER} for i in range(n)]


def task_for(model, **kw):
    config = load_config(model=str(model), task="causal-lm", progress_bar=False, precision="fp32", **kw)
    return config, TASKS["causal-lm"](config)


def encoded(model, rows, tmp_path, name="data.json", **kw):
    config, task = task_for(model, **kw)
    tokenizer = load_tokenizer(str(model))
    path = rows if not isinstance(rows, list) else write_json(tmp_path / name, rows)
    table = task.read(str(path))
    task.template(tokenizer)
    return task, tokenizer, task.encode(table, tokenizer)


def targets(tokenizer, example):
    return tokenizer.decode(
        [t for t, label in zip(example["input_ids"], example["labels"]) if label != IGNORE]
    )


# ------------------------------------------------------------------------------ data


@pytest.mark.parametrize(
    "row, layout, messages",
    [
        ({"instruction": "a", "input": "b", "output": "c", "system": "s", "history": [["q", "r"]]}, "alpaca",
         [("system", "s"), ("user", "q"), ("assistant", "r"), ("user", "a\nb"), ("assistant", "c")]),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "c"}]}, "messages",
         [("user", "a"), ("assistant", "c")]),
        ({"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "c"}], "system": "s"},
         "sharegpt", [("system", "s"), ("user", "a"), ("assistant", "c")]),
    ],
)  # fmt: skip
def test_chat_layouts_are_detected_and_read_as_messages(row, layout, messages, llama, tmp_path):
    config, task = task_for(llama)
    table = task.read(str(write_json(tmp_path / "d.json", [row])))
    assert task.layout == layout
    assert [(m["role"], m["content"]) for m in table.rows[0]["messages"]] == messages


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"instruction": "a", "output": ""}], "(row 1): 'output' is missing or empty"),
        ([{"instruction": "a", "output": "b"}, {"instruction": 3, "output": "b"}], "(row 2): 'instruction' must be text"),
        ([{"instruction": "a", "output": "b", "history": ["x"]}], "'history' must be a list of [question, answer]"),
        ([{"messages": [{"role": "robot", "content": "a"}]}], "messages[0].role is 'robot'; use one of: system, user"),
        ([{"messages": [{"role": "user", "content": "a"}]}], "the last turn of 'messages' must be the assistant's"),
        ([{"messages": []}], "'messages' must be a non-empty list"),
        ([{"conversations": [{"from": "human"}]}], "conversations[0] must be an object with 'from' and 'value'"),
        ([{"question": "a", "answer": "b"}], "cannot tell the layout from the columns (question, answer)"),
        ([{"instruction": "I am {{name}}", "output": "b"}], "(row 1): placeholder {{name}} has no value; set data.fill.name"),
    ],
)  # fmt: skip
def test_malformed_rows_name_the_row_and_the_fix(rows, message, llama, tmp_path):
    config, task = task_for(llama)
    with pytest.raises(DataError) as e:
        task.read(str(write_json(tmp_path / "bad.json", rows)))
    assert message in str(e.value)


def test_placeholders_are_filled_from_data_fill(llama, tmp_path):
    rows = [{"instruction": "who are you", "output": "I am {{name}}, made by {{ author }}."}]
    config, task = task_for(llama, **{"data.fill": {"name": "Ada", "author": "Lab"}})
    table = task.read(str(write_json(tmp_path / "d.json", rows)))
    assert table.rows[0]["messages"][-1]["content"] == "I am Ada, made by Lab."


def test_only_the_answer_and_end_of_turn_are_targets(llama, tmp_path):
    rows = [{"instruction": "the movie was", "output": ANSWER}]
    task, tokenizer, (example,) = encoded(llama, rows, tmp_path)
    assert targets(tokenizer, example) == f"{ANSWER} [SEP]"  # [SEP] is this tokenizer's eos
    assert (
        example["prompt_text"] == "### Instruction:\nthe movie was\n\n### Response:\n"
    )  # the plain template
    assert example["reference"] == ANSWER

    task, tokenizer, (example,) = encoded(llama, rows, tmp_path, **{"data.train_on_prompt": True})
    assert all(label != IGNORE for label in example["labels"])


def test_every_answer_of_a_multi_turn_conversation_is_a_target(llama, tmp_path):
    row = {"messages": [{"role": "user", "content": "the movie"}, {"role": "assistant", "content": "good"},
                        {"role": "user", "content": "the plot"}, {"role": "assistant", "content": "bad"}]}  # fmt: skip
    task, tokenizer, (example,) = encoded(llama, [row], tmp_path)
    assert targets(tokenizer, example) == "good [SEP] bad [SEP]"


def test_prompt_completion_is_raw_text_with_the_completion_as_target(llama, tmp_path):
    rows = [{"prompt": "the movie was", "completion": "good"}]
    task, tokenizer, (example,) = encoded(llama, rows, tmp_path)
    assert task.layout == "prompt-completion"
    assert tokenizer.decode(example["input_ids"]) == "the movie was good [SEP]"
    assert targets(tokenizer, example) == "good [SEP]"


def test_plain_text_is_joined_with_eos_and_cut_into_blocks(llama, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("the movie was good\n\nthe plot was bad\n")
    task, tokenizer, blocks = encoded(llama, path, tmp_path, **{"data.block_size": 4})
    assert task.layout == "text"
    stream = [t for b in blocks for t in b["input_ids"]]
    assert tokenizer.decode(stream) == "the movie was good [SEP] the plot was bad [SEP]"
    assert [len(b["input_ids"]) for b in blocks] == [4, 4, 2]
    assert all(b["labels"] == b["input_ids"] for b in blocks)


def test_answers_cut_off_by_max_length_are_dropped(llama, tmp_path):
    rows = [
        {"instruction": "the movie was " * 20, "output": "good"},
        {"instruction": "the", "output": "good"},
    ]
    task, tokenizer, examples = encoded(llama, rows, tmp_path, **{"data.max_length": 16})
    assert len(examples) == 1


# ------------------------------------------------------------------------------ loss


def test_target_only_loss_equals_the_models_own_loss(llama, tmp_path):
    task, tokenizer, examples = encoded(llama, alpaca_rows(3), tmp_path)
    seed_everything(0)
    model = task.build_model(str(llama)).eval()
    batch = task.collate(examples, tokenizer.pad_token_id)
    labels = batch["labels"]
    with torch.no_grad():
        ours = task.loss(model, dict(batch)) / task.units(batch)
        reference = model(input_ids=batch["input_ids"], labels=labels).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_packed_examples_do_not_see_each_other(llama, tmp_path):
    rows = alpaca_rows(4) + [{"instruction": "a dull and grim film", "output": "bad awful"}]
    task, tokenizer, examples = encoded(llama, rows, tmp_path)
    seed_everything(0)
    model = task.build_model(str(llama)).eval()
    rows_packed = pack(examples, capacity=64)
    assert len(rows_packed) < len(examples)
    with torch.no_grad():
        separate = sum(float(task.loss(model, task.collate([e], 0))) for e in examples)
        packed = float(task.loss(model, task.collate(rows_packed, tokenizer.pad_token_id)))
        units = sum(task.units(task.collate([e], 0)) for e in examples)
    assert task.units(task.collate(rows_packed, 0)) == units
    assert packed == pytest.approx(separate, rel=1e-5)


def test_soft_prompt_methods_score_the_real_positions(llama, tmp_path):
    """Prompt tuning prepends virtual tokens: the target-only loss must still line up."""
    config, task = task_for(llama, method="prompt", **{"prompt.num_virtual_tokens": 3})
    task, tokenizer, examples = encoded(llama, alpaca_rows(2), tmp_path, method="prompt")
    seed_everything(0)
    model = METHODS["prompt"].apply(task.build_model(str(llama)), config, task).eval()
    batch = task.collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = task.loss(model, dict(batch)) / task.units(batch)
        reference = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ metrics


def test_generation_metrics_on_hand_checked_cases():
    same = generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert same["bleu"] == pytest.approx(100.0) and same["rougeL"] == 1.0 and same["exact_match"] == 1.0
    none = generation_metrics(["the cat sat"], ["dogs run fast"])
    assert none["bleu"] == 0.0 and none["rouge1"] == 0.0 and none["exact_match"] == 0.0
    half = generation_metrics(["a b c d"], ["a b x y"])
    assert half["rouge1"] == pytest.approx(0.5) and half["rouge2"] == pytest.approx(1 / 3)
    assert generation_metrics(["Yes."], [" yes"])["exact_match"] == 1.0  # case, space, end punctuation
    chinese = generation_metrics(["细胞是生物的基本单位"], ["细胞是基本单位"])
    assert chinese["rouge1"] == pytest.approx(2 * 7 / (10 + 7)) and chinese["bleu"] > 0


# ------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def chat_run(llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat-run")
    train = write_json(folder / "train.json", alpaca_rows(48))
    test = write_json(folder / "test.json", alpaca_rows(8))
    out = folder / "run"
    code = main(["train", f"model={llama}", "task=causal-lm", "method=full", f"data.train={train}",
                 f"data.test={test}", "train.epochs=6", "train.learning_rate=3e-3", "train.precision=fp32",
                 "train.progress_bar=false", "generation.eval_max_new_tokens=6", f"output_dir={out}"])  # fmt: skip
    assert code == 0
    return out, test


def test_causal_lm_learns_and_reports_against_the_untuned_model(chat_run):
    out, _ = chat_run
    report = json.loads((out / "eval.json").read_text())
    test, base = report["test"], report["baseline"]["test"]
    assert test["loss"] < 0.5 * base["loss"]
    assert test["perplexity"] == pytest.approx(math.exp(test["loss"]))
    assert test["exact_match"] == 1.0 and base["exact_match"] == 0.0
    assert {"bleu", "rouge1", "rouge2", "rougeL"} <= set(test) and test["generated"] == 8
    assert "loss" in report["baseline"]["validation"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and samples[0]["generation"] == ANSWER and "baseline" in samples[0]
    assert "| prompt | reference | generation | un-tuned model |" in (out / "samples.md").read_text()
    config = load_config(out / "config.yaml")
    assert config.data.format == "alpaca"  # the detected layout is recorded


def test_predict_eval_and_chat_on_a_causal_lm_run(chat_run, tmp_path, capsys):
    out, test = chat_run
    assert main(["predict", str(out), "the plot was"]) == 0
    assert capsys.readouterr().out.strip() == ANSWER
    assert main(["predict", str(out), "--file", str(test), "--output", str(tmp_path / "p.jsonl")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and lines[0]["generation"] == ANSWER

    assert main(["eval", str(out), "--data", str(test), "--samples", "3"]) == 0
    printed = capsys.readouterr().out
    assert "un-tuned" in printed and "rougeL" in printed
    metrics = json.loads((out / "eval-test.json").read_text())
    assert metrics["exact_match"] == 1.0 and metrics["baseline"]["loss"] > metrics["loss"]
    assert metrics["generated"] == 3 and metrics["baseline"]["generated"] == 3
    assert (out / "samples-test.md").is_file()

    chat = subprocess.run([sys.executable, "-m", "tunelab", "chat", str(out), "--max-new-tokens", "6"],
                          input="the movie was\n/reset\nthe film was\n/exit\nnever read\n", capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count(f"assistant> {ANSWER}") == 2 and "(conversation cleared)" in chat.stdout


def test_chat_and_bad_generation_options_are_refused(chat_run, trained_classification, capsys):
    out, _ = chat_run
    assert main(["predict", str(out), "the plot", "--top-p", "1.5"]) == 2
    assert "generation.top_p: 1.5 must be in (0, 1]" in capsys.readouterr().err
    assert main(["chat", str(trained_classification)]) == 2
    assert "chat needs a causal-lm run" in capsys.readouterr().err


@pytest.fixture(scope="module")
def trained_classification(tmp_path_factory, sentiment_files, tiny_bert):
    out = tmp_path_factory.mktemp("cls") / "run"
    load_run = main(["train", f"model={tiny_bert}", f"data.train={sentiment_files['train']}", "train.max_steps=2",
                     "train.progress_bar=false", f"output_dir={out}"])  # fmt: skip
    assert load_run == 0
    return out


@pytest.mark.parametrize("method", ["lora", "freeze", "adapter", "ia3", "prefix", "prompt"])
def test_every_method_trains_a_causal_lm_and_round_trips(method, llama, tmp_path):
    train = write_json(tmp_path / "train.json", alpaca_rows(24))
    run_dir = tmp_path / "run"
    code = main(["train", f"model={llama}", "task=causal-lm", f"method={method}", f"data.train={train}",
                 "train.epochs=2", "train.progress_bar=false", "generation.eval_samples=2",
                 "generation.eval_max_new_tokens=3", "generation.compare_base=false", f"output_dir={run_dir}"])  # fmt: skip
    assert code == 0
    report = json.loads((run_dir / "eval.json").read_text())
    run = load(run_dir)
    again = run.evaluate(train, baseline=False)
    assert set(report["validation"]) >= {"loss", "perplexity", "rougeL"}
    assert math.isfinite(again["loss"])
    if METHODS[method].merge is not None and not plain_weights(METHODS[method]):
        assert report["merge"]["max_abs_diff"] < 1e-4


def test_packing_trains_through_the_cli(llama, tmp_path):
    train = write_json(tmp_path / "train.json", alpaca_rows(24))
    code = main(["train", f"model={llama}", "task=causal-lm", "method=full", f"data.train={train}",
                 "data.packing=true", "data.max_length=48", "train.epochs=1", "train.progress_bar=false",
                 "generation.eval_samples=0", f"output_dir={tmp_path / 'run'}"])  # fmt: skip
    assert code == 0
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report["train"]["train_examples"] < 21  # 21 training rows share fewer packed rows
    with pytest.raises(ConfigError, match="packing does not work with method=prompt"):
        config, task = task_for(llama, method="prompt", **{"data.packing": True, "data.train": str(train)})
        task.load_splits(load_tokenizer(str(llama)))


@pytest.mark.parametrize("kind", ["t5", "bart"])
def test_seq2seq_trains_saves_loads_and_generates(kind, tmp_path, capsys):
    import random

    model = write_tiny_seq2seq(tmp_path / kind, kind)
    rng = random.Random(0)
    words = ["good", "bad", "movie", "plot", "film", "happy", "sad", "dark"]
    rows = []
    for _ in range(96):
        picked = rng.sample(words, 3)
        rows.append({"source": " ".join(picked), "target": " ".join(reversed(picked))})
    train = write_json(tmp_path / "train.json", rows)
    out = tmp_path / "run"
    code = main(["train", f"model={model}", "task=seq2seq", "method=full", f"data.train={train}",
                 "train.epochs=15", "train.learning_rate=3e-3", "train.progress_bar=false",
                 "generation.eval_max_new_tokens=6", f"output_dir={out}"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["validation"]["loss"] < 0.8 * report["baseline"]["validation"]["loss"]
    capsys.readouterr()
    assert main(["predict", str(out), "good movie sad"]) == 0
    generated = capsys.readouterr().out.strip()
    run = load(out)
    assert run.predict("good movie sad")[0]["generation"] == generated  # the reloaded run generates the same
    assert generated and set(generated.split()) <= set(words)
    lora = main(["train", f"model={model}", "task=seq2seq", "method=lora", f"data.train={train}",
                 "train.max_steps=3", "train.progress_bar=false", "generation.eval_samples=2",
                 f"output_dir={tmp_path / 'lora'}"])  # fmt: skip
    assert lora == 0
    assert json.loads((tmp_path / "lora" / "eval.json").read_text())["merge"]["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_trains_the_same(method, llama, tmp_path):
    """Recomputing activations changes memory, not the maths: the same losses step by step."""
    train = write_json(tmp_path / "train.json", alpaca_rows(24))
    losses = {}
    for flag in ("false", "true"):
        out = tmp_path / f"run-{flag}"
        assert main(["train", f"model={llama}", "task=causal-lm", f"method={method}", f"data.train={train}",
                     "train.max_steps=4", "train.log_steps=1", "train.precision=fp32", "train.progress_bar=false",
                     f"train.gradient_checkpointing={flag}", "generation.eval_samples=0",
                     "generation.compare_base=false", f"output_dir={out}"]) == 0  # fmt: skip
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [e["loss"] for e in lines if "split" not in e]
    assert len(losses["true"]) == 4
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)
