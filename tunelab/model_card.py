"""The model card every export writes: a `README.md` in Hugging Face's format, YAML metadata
(`base_model`, `license`, `tags`, `datasets`, `metrics`, and the scores as a `model-index`)
over a Markdown body that says what the model is, what it was trained on (data files and
their SHA-256), how (method and hyper-parameters), how well it scores (eval.json, beside the
un-tuned baseline where the run scored one), what it is for, and how to load it.

The card is built with `huggingface_hub`'s `ModelCard` / `ModelCardData` (transformers depends
on huggingface_hub), so `ModelCard.load(folder / "README.md")` reads it back and the Hub shows
its metadata. The body is composed here rather than from a Jinja template: each export kind
has its own loading code and checks, and plain functions keep that readable.

    write_model_card(run, folder, kind, extra)   kind: merged | adapter | onnx | gguf
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from tunelab.config import GENERATIVE_TASKS, batch_size, max_length, to_dict

KINDS = ("merged", "adapter", "onnx", "gguf")
# built-in model names -> (Hugging Face hub id, license of the weights)
BUILTIN_BASES = {
    "minilm-l6": ("sentence-transformers/all-MiniLM-L6-v2", "apache-2.0"),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
}
# task -> (the Hub's pipeline tag, the transformers Auto class that loads it)
PIPELINES = {
    "classification": ("text-classification", "AutoModelForSequenceClassification"),
    "regression": ("text-classification", "AutoModelForSequenceClassification"),
    "token-classification": ("token-classification", "AutoModelForTokenClassification"),
    "causal-lm": ("text-generation", "AutoModelForCausalLM"),
    "preference": ("text-generation", "AutoModelForCausalLM"),
    "seq2seq": ("text2text-generation", "AutoModelForSeq2SeqLM"),
}
LIBRARIES = {"merged": "transformers", "adapter": "peft", "onnx": "onnx", "gguf": "gguf"}
INTENDED_USE = {
    "classification": "assigning the trained labels to texts like those in the training data",
    "regression": "scoring texts like those in the training data on the trained scale",
    "token-classification": "tagging the words of texts like those in the training data with the trained tags",
    "causal-lm": "answering prompts in the style and domain of the training data",
    "preference": "answering prompts the way the preferred answers of the training pairs do",
    "seq2seq": "turning source texts into target texts like those in the training data",
}
# hyper-parameters shown in the card's table (the whole config.yaml follows it, folded)
TRAIN_KEYS = ("learning_rate", "epochs", "max_steps", "gradient_accumulation", "optimizer",
              "schedule", "warmup_ratio", "weight_decay", "precision")  # fmt: skip


def write_model_card(run: Any, folder: str | Path, kind: str, extra: dict[str, Any] | None = None) -> Path:
    """Write `folder/README.md`, the model card of an export of `run`.

    Args:
        run: the loaded run (`tunelab.run.Run`): its config, path (for env.json and eval.json) and task.
        folder: the export folder being written (a temporary `.NAME.partial` folder is named as NAME).
        kind: "merged", "adapter", "onnx" or "gguf": picks the loading code, tags and library.
        extra: the export's report (export.json); the card reads `max_abs_diff`/`examples` (the
            reload check), for ONNX `held_out`/`models`, for GGUF `file`/`quant`, and `card_notes`
            (Markdown lines added under "Export check").

    Returns:
        The path of the card.

    Raises:
        ValueError: an unknown `kind` (a programming error, not a user's).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown export kind {kind!r}; one of {', '.join(KINDS)}")
    folder, extra = Path(folder), dict(extra or {})
    name = folder.name.removeprefix(".").removesuffix(".partial")
    evaluation = _read_json(Path(run.path) / "eval.json")
    env = _read_json(Path(run.path) / "env.json")
    data = card_data(run, kind, name, evaluation)
    body = "\n".join([
        f"# {name}", "",
        *_summary(run, kind, data, evaluation), "",
        *_training_data(run, env, evaluation), "",
        *_hyper_parameters(run, evaluation), "",
        *_evaluation(run, evaluation), "",
        *_export_check(kind, extra), "",
        *_intended_use(run, kind), "",
        *_how_to_load(run, kind, name, data, extra), "",
    ])  # fmt: skip
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    path = folder / "README.md"
    card.save(path)
    return path


def card_data(run: Any, kind: str, name: str, evaluation: dict[str, Any]) -> ModelCardData:
    """The card's YAML metadata: base model, license, tags, data files, metric names, and
    the run's scores on each held-out split as `model-index` entries."""
    config = run.config
    base, license_id = base_model(config.model)
    pipeline_tag = PIPELINES.get(config.task, ("", ""))[0] or None
    files = data_files(config)
    results = []
    for split in ("validation", "test"):
        for metric, value in scalar_metrics(evaluation.get(split, {})).items():
            source = files.get(split) or f"{files.get('train', 'train')} (held-out share)"
            results.append(EvalResult(task_type=pipeline_tag or config.task, dataset_type=Path(source).name,
                                      dataset_name=source, dataset_split=split, metric_type=metric,
                                      metric_value=value))  # fmt: skip
    metrics = sorted({r.metric_type for r in results})
    tags = ["tunelab", config.task, config.method, kind] + (["peft"] if kind == "adapter" else [])
    return ModelCardData(
        base_model=base, license=license_id, library_name=LIBRARIES[kind], pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(tags)), datasets=list(dict.fromkeys(files.values())) or None,
        metrics=metrics or None, model_name=name, eval_results=results or None,
    )  # fmt: skip


def base_model(model: str) -> tuple[str, str]:
    """(what `base_model` names, the weights' license) for a run's `model:`: the hub id of a
    built-in model; for an earlier run, that run's own base; a local folder's path, with the
    license its own card declares ("unknown" when it declares none); a hub id as given."""
    seen = 0
    while (Path(model) / "config.yaml").is_file() and seen < 8:  # runs chain: model: names an earlier run
        model = str(yaml.safe_load((Path(model) / "config.yaml").read_text()).get("model", model))
        seen += 1
    if model in BUILTIN_BASES:
        return BUILTIN_BASES[model]
    readme = Path(model) / "README.md"
    if readme.is_file():
        try:
            declared = ModelCard.load(readme, ignore_metadata_errors=True).data.license
        except (ValueError, yaml.YAMLError):  # a card we cannot read declares nothing we can use
            declared = None
        return model, str(declared or "unknown")
    return model, "unknown"


def data_files(config: Any) -> dict[str, str]:
    """split -> the data file a run's config names for it."""
    d = config.data
    return {split: str(path) for split, path in (("train", d.train), ("validation", d.validation),
                                                 ("test", d.test)) if path}  # fmt: skip


def scalar_metrics(scores: dict[str, Any]) -> dict[str, float]:
    """The single-number metrics of one split of eval.json (per-class tables, confusion
    matrices and counts left out)."""
    return {k: float(v) for k, v in scores.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "num_examples"}  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _summary(run: Any, kind: str, data: ModelCardData, evaluation: dict[str, Any]) -> list[str]:
    config, trained = run.config, evaluation.get("train", {})
    lines = [f"A `{config.task}` model fine-tuned from `{data.base_model}` with "
             f"tunelab (method `{config.method}`), exported as **{kind}**.", "",
             f"- **Base model:** `{data.base_model}` (license: {data.license})",
             f"- **Method:** `{config.method}`" + _method_settings(config)]  # fmt: skip
    if trained.get("trainable_params") and trained.get("total_params"):
        share = 100 * trained["trainable_params"] / trained["total_params"]
        lines.append(f"- **Trainable parameters:** {trained['trainable_params']:,} of "
                     f"{trained['total_params']:,} ({share:.2f}%)")  # fmt: skip
    labels = config.data.labels
    if labels and config.task in ("classification", "token-classification"):
        lines.append(f"- **Labels:** {', '.join(f'`{label}`' for label in labels)}")
    lines.append(f"- **Run:** `{run.path}`")
    return lines


def _method_settings(config: Any) -> str:
    section = getattr(config, config.method, None)
    if section is None or not hasattr(section, "__dataclass_fields__"):
        return ""
    values = ", ".join(f"{k} {v}" for k, v in vars(section).items())
    return f" ({values})" if values else ""


def _training_data(run: Any, env: dict[str, Any], evaluation: dict[str, Any]) -> list[str]:
    hashes = env.get("data_sha256", {})
    lines = ["## Training data", "", "| split | file | SHA-256 |", "| --- | --- | --- |"]
    for split, path in data_files(run.config).items():
        lines.append(f"| {split} | `{path}` | `{hashes.get(split, 'not recorded')}` |")
    d = run.config.data
    rows = evaluation.get("train", {}).get("train_examples")
    notes = []
    if rows:
        notes.append(f"{rows:,} training rows were used")
    if not d.validation:
        notes.append(f"validation is a seeded {d.validation_split:.0%} share of the training file "
                     f"(seed {run.config.seed})")  # fmt: skip
    if d.max_train_samples:
        notes.append(f"at most {d.max_train_samples:,} training rows (seeded subset)")
    if notes:
        lines += ["", "; ".join(notes).capitalize() + "."]
    return lines


def _hyper_parameters(run: Any, evaluation: dict[str, Any]) -> list[str]:
    config = run.config
    train = to_dict(config)["train"]
    rows = [("seed", config.seed), ("max_length", max_length(config)), ("batch_size", batch_size(config))]
    rows += [(key, train[key]) for key in TRAIN_KEYS if train.get(key) is not None]
    used_lr = evaluation.get("train", {}).get("learning_rate")
    if train.get("learning_rate") is None and used_lr:
        rows.append(("learning_rate (the method's default)", used_lr))
    full = yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True).rstrip()
    return ["## Hyper-parameters", "", "| setting | value |", "| --- | --- |",
            *(f"| {k} | {v} |" for k, v in rows), "",
            "<details><summary>The run's whole config.yaml</summary>", "", "```yaml", full, "```", "",
            "</details>"]  # fmt: skip


def _evaluation(run: Any, evaluation: dict[str, Any]) -> list[str]:
    baseline = evaluation.get("baseline", {})
    splits = [s for s in ("validation", "test") if scalar_metrics(evaluation.get(s, {}))]
    if not splits:
        return ["## Evaluation", "", "The run recorded no held-out scores (eval.json)."]
    with_base = any(scalar_metrics(baseline.get(s, {})) for s in splits)
    header = "| split | metric | fine-tuned |" + (" un-tuned base model |" if with_base else "")
    lines = ["## Evaluation", "", f"Scores from the run's eval.json (`{run.config.task}` metrics).", "",
             header, "| --- | --- | --- |" + (" --- |" if with_base else "")]  # fmt: skip
    for split in splits:
        base = scalar_metrics(baseline.get(split, {}))
        for metric, value in scalar_metrics(evaluation[split]).items():
            cell = f" {base[metric]:.4f} |" if metric in base else (" — |" if with_base else "")
            lines.append(f"| {split} | {metric} | {value:.4f} |{cell}")
    return lines


def _export_check(kind: str, extra: dict[str, Any]) -> list[str]:
    lines = ["## Export check", ""]
    if kind == "onnx" and extra.get("models"):
        held = extra.get("held_out", {})
        metric = extra.get("metric", "")
        lines += [f"On the run's {held.get('split', 'held-out')} split ({held.get('examples', '?')} rows), "
                  f"this machine ({extra.get('threads', '?')} threads):", "",
                  f"| model | file | {metric} | labels agreeing with PyTorch | batch-1 ms | batch-32 ms | MB |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        for label, m in extra["models"].items():
            agree = "—" if m.get("label_agreement") is None else f"{m['label_agreement']:.2%}"
            lines.append(f"| {label} | `{m.get('file', '—')}` | {m.get('metric_value', float('nan')):.4f} | "
                         f"{agree} | {m['latency_ms']['batch_1']:.2f} | "
                         f"{m['latency_ms']['batch_32']:.1f} | {m.get('size_mb', 0):.1f} |")  # fmt: skip
    elif "max_abs_diff" in extra:
        lines.append(f"Reloaded the way the code below loads it and run on {extra.get('examples', '?')} "
                     f"held-out inputs next to the training-time model: logits differ by at most "
                     f"{extra['max_abs_diff']:.2e}.")  # fmt: skip
    lines += [str(note) for note in extra.get("card_notes", [])]
    if len(lines) == 2:
        lines.append("See export.json in this folder.")
    return lines + ["", "The full report is `export.json` in this folder."]


def _intended_use(run: Any, kind: str) -> list[str]:
    config = run.config
    use = INTENDED_USE.get(config.task, "the task it was trained on")
    lines = ["## Intended use and limitations", "",
             f"Intended for {use}. It was fine-tuned on the files listed above only: expect lower "
             f"quality on other domains, languages or label definitions, and measure it on your own "
             f"held-out data before relying on it.", "",
             "It inherits the limitations and biases of its base model and of its training data; the "
             "scores above come from held-out rows of the same data, not from an independent audit."]  # fmt: skip
    if config.task in GENERATIVE_TASKS:
        lines.append("")
        lines.append("Generated text can be fluent and wrong: do not use it where a false answer causes harm "
                     "without a person checking it.")  # fmt: skip
    if kind in ("onnx", "gguf"):
        lines.append("")
        lines.append("Quantized files trade a little accuracy for speed and size: the export check above "
                     "says how much, on this run's held-out rows.")  # fmt: skip
    return lines


def _how_to_load(run: Any, kind: str, name: str, data: ModelCardData, extra: dict[str, Any]) -> list[str]:
    config = run.config
    auto = PIPELINES.get(config.task, ("", "AutoModel"))[1]
    generative = config.task in GENERATIVE_TASKS
    use = 'inputs = tokenizer(["a text to label"], return_tensors="pt")\nprint(model(**inputs).logits)'
    if generative:
        use = ('inputs = tokenizer("Hello!", return_tensors="pt")\n'
               "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))")  # fmt: skip
    if kind == "merged":
        code = (f"from transformers import AutoTokenizer, {auto}\n\n"
                f'model = {auto}.from_pretrained("{name}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n{use}')  # fmt: skip
    elif kind == "adapter":
        labels = "" if generative else f", num_labels={len(config.data.labels or ['value'])}"
        code = (f"from peft import PeftModel\nfrom transformers import AutoTokenizer, {auto}\n\n"
                f'base = {auto}.from_pretrained("{data.base_model}"{labels})\n'
                f'model = PeftModel.from_pretrained(base, "{name}")  # the trained head is in the adapter\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n{use}')  # fmt: skip
    elif kind == "onnx":
        file = extra.get("files", {}).get("int8") or extra.get("files", {}).get("fp32", "model.onnx")
        code = ("import numpy as np\nimport onnxruntime\nfrom transformers import AutoTokenizer\n\n"
                f'session = onnxruntime.InferenceSession("{name}/{file}")\n'
                f'tokenizer = AutoTokenizer.from_pretrained("{name}")\n'
                'batch = tokenizer(["a text to label"], padding=True, return_tensors="np")\n'
                "inputs = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}\n"
                'print(session.run(["logits"], inputs)[0])')  # fmt: skip
    else:
        file = extra.get("file", "model.gguf")
        code = ("from llama_cpp import Llama  # pip install llama-cpp-python\n\n"
                f'llm = Llama(model_path="{name}/{file}")\n'
                'print(llm.create_chat_completion(messages=[{"role": "user", "content": "Hello!"}]))')  # fmt: skip
    lines = ["## How to load", "", "```python", code, "```", ""]
    if kind == "gguf":
        lines += ["With Ollama: `ollama create my-model -f Modelfile`, then `ollama run my-model`.", ""]
    lines.append(f"Or serve it over HTTP with tunelab: `tunelab serve {name}`" if kind in ("merged", "onnx")
                 else f"Or serve the run with tunelab: `tunelab serve {run.path}`")  # fmt: skip
    return lines
