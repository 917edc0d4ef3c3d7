"""task=preference: the data layouts and their row errors, each loss against TRL's own trainer
on the same batch of a tiny random Llama, the precomputed reference, training with each loss
from one `tunelab train`, and starting from a causal-lm run."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import yaml

from tunelab.cli import main
from tunelab.compare import metric_of
from tunelab.config import load_config
from tunelab.errors import ConfigError, DataError
from tunelab.models import load_tokenizer
from tunelab.run import load
from tunelab.tasks import TASKS
from tunelab.tasks.generative import IGNORE
from tunelab.tasks.preference import unpair

from .conftest import NEGATIVE, POSITIVE, write_tiny_llama

SUBJECTS = ["movie", "film", "plot", "acting"]
SFT_WEIGHT = 0.6
LOSSES = ["dpo", "ipo", "orpo", "simpo", "kto"]
TRL_LOSSES = [*LOSSES, "dpo+sft"]  # dpo+sft: DPO with preference.sft_weight, TRL's ["sigmoid", "sft"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def pair_rows(n):
    """The chosen answer praises (and ends with "!"), the rejected one does not."""
    return [{"prompt": f"the {SUBJECTS[i % 4]} was", "chosen": f"{POSITIVE[i % 8]} {POSITIVE[(i + 3) % 8]} !",
             "rejected": f"{NEGATIVE[i % 8]} {NEGATIVE[(i + 5) % 8]} ."} for i in range(n)]  # fmt: skip


def write_json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def task_for(model, **kw):
    config = load_config(model=str(model), task="preference", progress_bar=False, precision="fp32", **kw)
    return config, TASKS["preference"](config)


def encoded(model, rows, tmp_path, **kw):
    config, task = task_for(model, **kw)
    tokenizer = load_tokenizer(str(model))
    table = task.read(str(write_json(tmp_path / "data.json", rows)))
    task.template(tokenizer)
    return task, tokenizer, task.encode(table, tokenizer)


def targets(tokenizer, ids, labels):
    return tokenizer.decode([t for t, label in zip(ids, labels) if label != IGNORE], skip_special_tokens=True)


# ------------------------------------------------------------------------------ data

USER = {"role": "user", "content": "the plot was"}
GOOD, BAD = {"role": "assistant", "content": "good great"}, {"role": "assistant", "content": "bad sad"}


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "the plot was", "chosen": "good great", "rejected": "bad sad"},
        {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
        {"chosen": [USER, GOOD], "rejected": [USER, BAD]},  # the prompt inside the conversations
    ],
)
def test_pair_layouts_score_only_the_answers(row, llama, tmp_path):
    task, tokenizer, [example] = encoded(llama, [row], tmp_path)
    assert task.layout == "pairs"
    assert targets(tokenizer, example["input_ids"], example["labels"]) == "good great"
    assert targets(tokenizer, example["rejected_ids"], example["rejected_labels"]) == "bad sad"
    # the shared prompt is the same tokens in both rows
    start = example["labels"].index(next(t for t in example["labels"] if t != IGNORE))
    assert example["input_ids"][:start] == example["rejected_ids"][:start]


def test_unpaired_rows_and_pairs_as_kto_rows(llama, tmp_path):
    rows = [{"prompt": "the plot was", "completion": "good great", "label": True},
            {"prompt": [USER], "completion": [BAD], "label": "false"}]  # fmt: skip
    task, tokenizer, examples = encoded(llama, rows, tmp_path)
    assert task.layout == "unpaired" and [e["desirable"] for e in examples] == [True, False]
    _, _, pairs = encoded(llama, pair_rows(2), tmp_path)
    rows = unpair(pairs)
    assert [r["desirable"] for r in rows] == [True, False, True, False]
    assert rows[1]["input_ids"] == pairs[0]["rejected_ids"]
    # the KL rows read each prompt with the answer of the row before it (in groups of a batch)
    task.kl_rows(rows)
    assert targets(tokenizer, rows[1]["kl_ids"], rows[1]["kl_labels"]) == targets(
        tokenizer, rows[0]["input_ids"], rows[0]["labels"]
    )


@pytest.mark.parametrize(
    "rows, phrase",
    [
        ([{"prompt": "a", "chosen": "good", "rejected": "bad"}, {"prompt": "a", "chosen": "good"}],
         "(row 2): 'rejected' is missing"),
        ([{"prompt": "a", "chosen": "good", "rejected": "good"}], "(row 1): 'chosen' and 'rejected' are the same"),
        ([{"prompt": "a", "chosen": "good", "rejected": "bad"}, {"prompt": "a", "chosen": "", "rejected": "bad"}],
         "(row 2): 'chosen' is empty"),
        ([{"prompt": "a", "chosen": [{"role": "robot", "content": "x"}], "rejected": "bad"}],
         "(row 1): chosen[0].role is 'robot'"),
        ([{"prompt": "a", "chosen": [USER, GOOD], "rejected": "bad"}], "(row 1): 'chosen' must hold only"),
        ([{"chosen": [USER, GOOD], "rejected": [{"role": "user", "content": "x"}, BAD]}],
         "(row 1): no 'prompt'; then 'chosen' and 'rejected' must be conversations"),
        ([{"prompt": "a", "completion": "good", "label": "maybe"}], "(row 1): 'label' must be true"),
        ([{"prompt": "a", "answer": "good"}], "cannot tell the layout"),
        ([{"prompt": "a", "chosen": 3, "rejected": "bad"}], "(row 1): 'chosen' must be text or a list"),
    ],
)  # fmt: skip
def test_malformed_rows_are_named(rows, phrase, llama, tmp_path):
    _, task = task_for(llama)
    with pytest.raises(DataError, match=None) as error:
        task.read(str(write_json(tmp_path / "bad.json", rows)))
    assert phrase in str(error.value)


def test_unpaired_rows_need_kto(llama, tmp_path):
    path = write_json(tmp_path / "u.json", [{"prompt": "a", "completion": "good", "label": True}] * 4)
    _, task = task_for(llama, train=str(path))
    with pytest.raises(ConfigError, match="preference.loss=kto"):
        task.load_splits(load_tokenizer(str(llama)))


def test_compare_scores_preference_runs_by_held_out_reward_accuracy():
    assert metric_of(load_config(task="preference")) == ("reward_accuracy", True)


# ------------------------------------------------------------------------------ the losses against TRL


def noisy_copy(model, seed=1, scale=0.2):
    """The policy: the starting weights moved a little, so its log-probs differ from the reference's."""
    policy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator))
    return policy


def trl_loss(loss, policy, reference, tokenizer, batch, examples, tmp_path, beta, gamma):
    """TRL's loss on the same token rows (its own trainer, its own log-prob computation)."""
    from datasets import Dataset

    common = {"output_dir": str(tmp_path / "trl"), "report_to": "none", "bf16": False, "use_cpu": True,
              "per_device_train_batch_size": len(examples), "beta": beta}  # fmt: skip
    strings = Dataset.from_list([{"prompt": "the plot was", "chosen": "good", "rejected": "bad"}] * 2)
    real = (torch.arange(batch["input_ids"].shape[1])[None, :] < batch["lengths"][:, None]).long()
    answers = (batch["labels"] != IGNORE).long()
    if loss in ("dpo", "ipo", "dpo+sft"):
        from trl import DPOConfig, DPOTrainer

        kinds = {"dpo": {"loss_type": ["sigmoid"]}, "ipo": {"loss_type": ["ipo"]},
                 "dpo+sft": {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, SFT_WEIGHT]}}  # fmt: skip
        args = DPOConfig(**kinds[loss], **common)
        trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=strings,
                             processing_class=tokenizer)  # fmt: skip
        inputs = {"input_ids": batch["input_ids"], "attention_mask": real, "completion_mask": answers}
        return trainer._compute_loss(trainer.model, inputs, False)
    if loss == "kto":
        from trl import KTOConfig, KTOTrainer

        unpaired = Dataset.from_list([{"prompt": "the plot was", "completion": "good", "label": True},
                                      {"prompt": "the plot was", "completion": "bad", "label": False}])  # fmt: skip
        trainer = KTOTrainer(model=policy, ref_model=reference, args=KTOConfig(**common), train_dataset=unpaired,
                             processing_class=tokenizer)  # fmt: skip
        kl_real = torch.zeros_like(batch["kl_input_ids"])
        for n, e in enumerate(examples):
            kl_real[n, : len(e["kl_ids"])] = 1
        inputs = {"input_ids": batch["input_ids"], "attention_mask": real, "completion_mask": answers,
                  "KL_input_ids": batch["kl_input_ids"], "KL_attention_mask": kl_real,
                  "KL_completion_mask": (batch["kl_labels"] != IGNORE).long(), "label": batch["desirable"]}  # fmt: skip
        return trainer._compute_loss(trainer.model, inputs, False)
    pairs = len(examples)
    halves = {"chosen": slice(0, pairs), "rejected": slice(pairs, 2 * pairs)}
    inputs = {f"{side}_{key}": value[rows] for side, rows in halves.items()
              for key, value in (("input_ids", batch["input_ids"]), ("attention_mask", real),
                                 ("labels", batch["labels"]))}  # fmt: skip
    if loss == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=gamma, **common)
        trainer = CPOTrainer(model=policy, args=args, train_dataset=strings, processing_class=tokenizer)
    else:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        trainer = ORPOTrainer(model=policy, args=ORPOConfig(**common), train_dataset=strings,
                              processing_class=tokenizer)  # fmt: skip
    return trainer.get_batch_loss_metrics(trainer.model, inputs)[0]


@pytest.mark.parametrize("loss", TRL_LOSSES)
def test_each_loss_matches_trl_on_the_same_batch(loss, llama, tmp_path):
    from transformers import AutoModelForCausalLM

    beta, gamma = 0.3, 0.7
    task, tokenizer, examples = encoded(llama, pair_rows(6), tmp_path, **{
        "preference.loss": loss.removesuffix("+sft"), "preference.beta": beta, "preference.gamma": gamma,
        "preference.sft_weight": SFT_WEIGHT if loss.endswith("+sft") else 0.0})  # fmt: skip
    if loss == "kto":
        examples = task.kl_rows(unpair(examples))  # 12 rows: desirable and undesirable
    reference = AutoModelForCausalLM.from_pretrained(llama).eval()
    policy = noisy_copy(reference).eval()
    task.reference = reference  # full fine-tuning's frozen copy
    batch = task.collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        ours = task.losses(policy, dict(batch)).mean()
        theirs = trl_loss(
            loss, policy, copy.deepcopy(reference), tokenizer, batch, examples, tmp_path, beta, gamma
        )
    assert float(ours) == pytest.approx(float(theirs), abs=1e-5)
    # not a loss that ignores the policy: the reference against itself scores otherwise
    with torch.no_grad():
        assert abs(float(task.losses(reference, dict(batch)).mean()) - float(ours)) > 1e-3


def test_the_precomputed_reference_gives_the_same_loss(llama, tmp_path):
    from tunelab.methods import METHODS
    from tunelab.run import build_model

    train = write_json(tmp_path / "pairs.json", pair_rows(12))
    losses = []
    for precompute in (False, True):
        config, task = task_for(llama, train=str(train), **{"preference.loss": "kto",
                                                             "preference.precompute_reference": precompute})  # fmt: skip
        tokenizer = load_tokenizer(str(llama))
        splits = task.load_splits(tokenizer)
        model = build_model(config, task, METHODS["lora"], str(llama), tokenizer)
        with torch.no_grad():
            for p in (p for n, p in model.named_parameters() if "lora_B" in n):
                p.add_(0.1)  # adapters that change the outputs: the reference is the model without them
        batch = task.collate(splits.train[:8], tokenizer.pad_token_id)
        losses.append(float(task.loss(model, batch)))
        assert (task.reference_table is not None) == precompute
    assert losses[1] == pytest.approx(losses[0], abs=1e-6)


# ------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    return write_json(folder / "train.json", pair_rows(32)), write_json(
        folder / "validation.json", pair_rows(8)
    )


def train_args(llama, files, out, loss, *extra):
    train, validation = files
    return ["train", f"model={llama}", "task=preference", "method=lora", f"data.train={train}",
            f"data.validation={validation}", f"preference.loss={loss}", "train.epochs=3",
            "train.learning_rate=5e-3", "train.precision=fp32", "train.progress_bar=false", "data.max_length=60",
            "generation.eval_samples=2", "generation.eval_max_new_tokens=4", f"output_dir={out}", *extra]  # fmt: skip


@pytest.mark.parametrize("loss", LOSSES)
def test_each_loss_trains_from_one_command(loss, llama, pair_files, tmp_path):
    out = tmp_path / loss
    extra = ["preference.precompute_reference=true"] if loss in ("dpo", "kto") else []
    assert main(train_args(llama, pair_files, out, loss, *extra)) == 0
    report = json.loads((out / "eval.json").read_text())
    tuned, base = report["validation"], report["baseline"]["validation"]
    assert {"reward_accuracy", "reward_margin", "logps_chosen", "logps_rejected"} <= set(tuned) & set(base)
    assert tuned["pairs"] == 8
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in log if "split" not in e]
    assert losses[-1] < losses[0]
    # the tuned model prefers the chosen answers more than the starting model does
    assert tuned["logps_chosen"] - tuned["logps_rejected"] > base["logps_chosen"] - base["logps_rejected"]
    assert tuned["reward_accuracy"] >= base["reward_accuracy"]
    assert load_config(out / "config.yaml").data.format == "pairs"


def test_preference_starts_from_a_causal_lm_run(llama, pair_files, tmp_path):
    sft = tmp_path / "sft"
    rows = [{"instruction": r["prompt"], "output": r["chosen"]} for r in pair_rows(16)]
    data = write_json(tmp_path / "sft.json", rows)
    assert main(["train", f"model={llama}", "task=causal-lm", "method=lora", f"data.train={data}",
                 "train.max_steps=3", "train.precision=fp32", "train.progress_bar=false",
                 "generation.eval_samples=0", f"output_dir={sft}"]) == 0  # fmt: skip
    out = tmp_path / "dpo"
    assert main([*train_args(llama, pair_files, out, "dpo"), f"model={sft}", "train.epochs=1"]) == 0
    assert (sft / "encoder" / "config.json").is_file()  # the SFT adapters, folded once
    assert load_config(out / "config.yaml").model == str(sft)
    assert "baseline" in json.loads((out / "eval.json").read_text())


def test_the_metrics_read_rewards_the_way_the_loss_defines_them():
    # (policy chosen, policy rejected, reference chosen, reference rejected, chosen tokens, rejected tokens)
    pairs = [np.array([-2.0, -6.0, -3.0, -3.0, 2.0, 4.0]), np.array([-5.0, -4.0, -5.0, -4.0, 5.0, 4.0])]
    dpo = TASKS["preference"](load_config(task="preference", **{"preference.beta": 0.5})).metrics(pairs, [])
    # rewards 0.5 x (policy - reference): (0.5, -1.5) and (0, 0), a tie that counts half
    assert dpo["reward_accuracy"] == 0.75 and dpo["reward_margin"] == pytest.approx(1.0)
    assert dpo["logps_chosen"] == -3.5 and dpo["pairs"] == 2
    simpo = TASKS["preference"](load_config(task="preference", **{"preference.loss": "simpo"})).metrics(
        pairs, []
    )
    # rewards 0.1 x mean token log-prob: (-0.1, -0.15) and (-0.1, -0.1)
    assert simpo["reward_accuracy"] == 0.75 and simpo["reward_margin"] == pytest.approx(0.025)
    # unpaired rows: (policy, reference, tokens, desirable): right when the reward has the label's sign
    rows = [
        np.array([-1.0, -2.0, 2.0, 1.0]),
        np.array([-1.0, -2.0, 2.0, 0.0]),
        np.array([-3.0, -2.0, 2.0, 0.0]),
    ]
    kto = TASKS["preference"](load_config(task="preference", **{"preference.loss": "kto"})).metrics(rows, [])
    assert kto["reward_accuracy"] == pytest.approx(2 / 3) and kto["rows"] == 3


def test_full_fine_tuning_compares_with_a_frozen_copy(llama, pair_files, tmp_path):
    out = tmp_path / "full"
    assert main([*train_args(llama, pair_files, out, "dpo"), "method=full", "train.learning_rate=1e-3"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["baseline"]["validation"]["reward_margin"] == 0  # the reference against itself
    assert report["validation"]["reward_margin"] > 0
    # loaded again, the run still compares with the model it started from, not with itself
    again = load(out).evaluate(pair_files[1], baseline=False)
    assert again["reward_margin"] == pytest.approx(report["validation"]["reward_margin"], abs=1e-4)


def compare_config(llama, pair_files, tmp_path):
    """A small preference config for compare, its runs under tmp_path/compare-run."""
    train, validation = pair_files
    config = tmp_path / "pref.yaml"
    config.write_text(
        f"model: {llama}\ntask: preference\noutput_dir: {tmp_path / 'run'}\n"
        f"data: {{train: {train}, validation: {validation}, max_length: 60}}\n"
        "train: {precision: fp32, progress_bar: false, learning_rate: 0.005}\n"
        "generation: {eval_samples: 0}\n"
    )
    return config


def test_compare_runs_preference_configs(llama, pair_files, tmp_path, capsys):
    config = compare_config(llama, pair_files, tmp_path)
    assert main(["compare", str(config), "--methods", "none,lora", "--epochs", "2"]) == 0
    report = (tmp_path / "compare-run" / "report.md").read_text()
    assert "validation reward_accuracy" in report
    assert "| none | 0.5000 |" in report  # the starting model against itself: every pair a tie


def test_compare_rows_are_methods_and_losses(llama, pair_files, tmp_path, capsys):
    config = compare_config(llama, pair_files, tmp_path)
    assert main(["compare", str(config), "--methods", "lora", "--losses", "dpo,ipo", "--epochs", "1"]) == 0
    folder = tmp_path / "compare-run"
    report = (folder / "report.md").read_text()
    assert "| lora+dpo |" in report and "| lora+ipo |" in report
    saved = {p.name: yaml.safe_load((p / "config.yaml").read_text())["preference"]["loss"]
             for p in folder.iterdir() if p.is_dir() and p.name.startswith("lora")}  # fmt: skip
    assert saved == {"lora-dpo-seed42": "dpo", "lora-ipo-seed42": "ipo"}
    capsys.readouterr()
    assert main(["compare", str(config), "--methods", "lora", "--losses", "dpo,nope"]) == 2
    assert "--losses: unknown nope" in capsys.readouterr().err
