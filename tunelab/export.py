"""`tunelab export`: a finished run as an artifact the rest of the ecosystem loads, checked
before it is reported.

- `--merge`: a plain Hugging Face folder (safetensors, config with `id2label`, tokenizer with
  the chat template used in training, generation config that stops at the end of a turn),
  loadable by `AutoModelFor...from_pretrained(DIR)` without tunelab.
- `--adapter-only`: the PEFT adapter folder (with the trained task head as
  `modules_to_save`), loadable by `peft.PeftModel.from_pretrained(base, DIR)`.
- `--onnx [--int8]` (encoders): ONNX Runtime graphs, in `onnx_export.py`.
- `--gguf [--quant ...]` (causal-lm decoders): one GGUF file for llama.cpp and Ollama, with a
  Modelfile, checked in llama.cpp; in `gguf_export/`.

Every export also writes its model card, `README.md` (`model_card.py`).

Each export is written to a hidden sibling folder, reloaded the way a user would load it
(plain transformers / peft, no tunelab code), run on a few held-out inputs next to the
training-time model, and moved into place only when the logits agree within tolerance; the
report (`export.json` inside the folder) records the difference.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from tunelab.checkpoint import crash_point
from tunelab.config import CAUSAL_LM_TASKS
from tunelab.errors import TunelabError
from tunelab.generation import stop_token_ids
from tunelab.methods import METHODS
from tunelab.methods.common import output_logits
from tunelab.model_card import base_model, write_model_card
from tunelab.models import BUILTIN_MODELS, resolve_model
from tunelab.outputs import check_writable, write_error
from tunelab.run import Run

AUTO_CLASSES = {
    "classification": "AutoModelForSequenceClassification",
    "regression": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "causal-lm": "AutoModelForCausalLM",
    "preference": "AutoModelForCausalLM",
    "seq2seq": "AutoModelForSeq2SeqLM",
    "masked-lm": "AutoModelForMaskedLM",
    "question-answering": "AutoModelForQuestionAnswering",
}
TOLERANCE = 1e-3  # max |logit difference| between the export and the training-time model (fp32)
PROBE_TEXTS = ["The service was quick and friendly.", "Angela Merkel visited Paris last week.",
               "Give three tips for staying healthy.", "It rained all day, so we stayed in."]  # fmt: skip


def auto_class(task: str) -> Any:
    import transformers

    return getattr(transformers, AUTO_CLASSES[task])


def probe_examples(run: Any, n: int = 8) -> list[dict[str, Any]]:
    """A few held-out inputs for the check: rows of the run's test / validation / train file
    when it is still there, else fixed sentences."""
    d = run.config.data
    for path in (d.test, d.validation, d.train):
        if path and Path(path).is_file():
            try:
                examples = run.task.encode(run.task.read(path), run.tokenizer)
            except Exception:  # noqa: BLE001 - a changed file only means we fall back to fixed texts
                continue
            if examples:
                return examples[:n]
    examples = run.task.encode_inputs(PROBE_TEXTS, run.tokenizer)
    for e in examples:
        if "input_ids" not in e:  # causal-lm prompts are text until tokenized
            e["input_ids"] = run.tokenizer(e["prompt_text"], add_special_tokens=False)["input_ids"]
    return examples[:n]


@torch.no_grad()
def max_difference(a: torch.nn.Module, b: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    a.eval()
    b.eval()
    return float((output_logits(a(**batch)) - output_logits(b(**batch))).abs().max())


def export(run_dir: str | Path, out: str | Path, merge: bool, say: Any = print) -> dict[str, Any]:
    """Write and verify an export of a finished run; returns the check report.

    Raises:
        TunelabError: the method cannot be exported that way, the destination exists, or
            the reloaded export does not reproduce the run's outputs.
    """
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise TunelabError(f"--out: {out} already exists; choose another --out or remove it")
    tmp = out.parent / f".{out.name}.partial"
    check_writable(out, f"--out {out}")  # before loading: a file in the way, read-only, /proc
    run = Run.load(run_dir)
    method = run.config.method
    module = METHODS[method]
    mergeable = "/".join(name for name, m in METHODS.items() if m.merge is not None)
    peft_and_mergeable = " or ".join(
        name for name, m in METHODS.items() if m.PEFT_FORMAT and m.merge is not None
    )
    if merge and module.merge is None:
        other = " use --adapter-only (a PEFT folder) instead," if module.PEFT_FORMAT else ""
        raise TunelabError(f"method {method} cannot be merged into the base weights (its extra parameters are "
                           f"not a change of existing weights);{other} or train with {mergeable}")  # fmt: skip
    if not merge and not module.PEFT_FORMAT:
        hint = ("use --merge (the run already is plain weights)" if module.PLAIN_WEIGHTS
                else f"its adapters have no PEFT format; train with {peft_and_mergeable} to get one")  # fmt: skip
        raise TunelabError(f"method {method} has no PEFT adapter to export; {hint}")
    run.model.to("cpu").float()
    batch = run.task.probe_batch(probe_examples(run), run.tokenizer.pad_token_id)
    shutil.rmtree(tmp, ignore_errors=True)  # an export interrupted before it could clean up
    made = [p for p in (out.parent, *out.parent.parents) if not p.exists()]  # removed again on failure
    try:
        tmp.mkdir(parents=True)
        if merge:
            report = _export_merged(run, module, tmp, batch)
        else:
            report = _export_adapter(run, tmp, batch)
        crash_point("export-write")  # test hook (tests/test_crash.py)
        report.update(_chat_check(run, tmp))
        (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
        write_model_card(run, tmp, report["kind"], report)  # README.md: the Hugging Face model card
        if report["max_abs_diff"] > TOLERANCE:
            raise TunelabError(f"export check failed: the reloaded export's logits differ from the run's by "
                               f"{report['max_abs_diff']:.3g} (tolerance {TOLERANCE:g}); nothing was written to {out}")  # fmt: skip
        crash_point("export-rename")
        tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # innermost first: the folders this export created on the way
            with contextlib.suppress(OSError):
                folder.rmdir()
        error = None if isinstance(e, TunelabError) or not isinstance(e, Exception) else write_error(e, out)
        if error is not None:  # a full disk or a read-only place: one line; SafetensorError is no OSError
            raise TunelabError(f"{error}; nothing was written to {out}") from None
        raise
    say(f"tunelab: export checked on {report['examples']} held-out inputs: logits differ from the run's by at "
        f"most {report['max_abs_diff']:.2e}; written to {out}")  # fmt: skip
    return report


def _export_merged(run: Any, module: Any, tmp: Path, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    merged = module.merge(copy.deepcopy(run.model)).eval()
    merged.save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    if run.task.generative:
        _generation_config(run, tmp)
    reloaded = auto_class(run.config.task).from_pretrained(tmp, dtype=torch.float32)
    return {"kind": "merged", "loads_with": f"transformers.{AUTO_CLASSES[run.config.task]}.from_pretrained",
            "max_abs_diff": max_difference(run.model, reloaded, batch), "examples": batch["input_ids"].shape[0],
            "method": run.config.method, "task": run.config.task}  # fmt: skip


def _export_adapter(run: Any, tmp: Path, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    from peft import PeftModel

    run.model.save_pretrained(tmp)
    run.tokenizer.save_pretrained(tmp)
    names = portable_base(run.config.model)
    adapter_config = tmp / "adapter_config.json"  # PEFT wrote the base's folder inside this machine's venv
    settings = json.loads(adapter_config.read_text())
    settings["base_model_name_or_path"] = names.get("base_model_hub_id", names["base_model"])
    adapter_config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    base = run.task.build_model(resolve_model(run.config.model))  # the same head shape (labels) as training
    reloaded = PeftModel.from_pretrained(base, str(tmp))  # reads the adapter_config.json shipped
    return {"kind": "adapter", "loads_with": "peft.PeftModel.from_pretrained", **names,
            "max_abs_diff": max_difference(run.model, reloaded, batch), "examples": batch["input_ids"].shape[0],
            "method": run.config.method, "task": run.config.task}  # fmt: skip


def portable_base(model: str) -> dict[str, str]:
    """How an export names its base model so that it means the same on another machine: a
    built-in model by its built-in name (with the hub id of the same weights), a hub model by
    its id, a local folder or an earlier run as the config gave it."""
    if model in BUILTIN_MODELS:
        return {"base_model": model, "base_model_hub_id": base_model(model)[0]}
    return {"base_model": model}


def _generation_config(run: Any, folder: Path) -> None:
    """Make plain `generate` stop where tunelab stops: at eos or the template's end of turn."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(folder)
    except OSError:
        config = GenerationConfig()
    config.eos_token_id = stop_token_ids(run.tokenizer)
    config.pad_token_id = run.tokenizer.pad_token_id
    config.save_pretrained(folder)


def _chat_check(run: Any, folder: Path) -> dict[str, Any]:
    """For chat runs: the saved template and end-of-turn tokens are those used in training."""
    if run.config.task not in CAUSAL_LM_TASKS:
        return {}
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(folder)
    same_template = saved.chat_template == run.tokenizer.chat_template
    stops, saved_stops = stop_token_ids(run.tokenizer), stop_token_ids(saved)
    if not same_template or stops != saved_stops:
        raise TunelabError(f"export check failed: the saved tokenizer's chat template or end-of-turn tokens "
                           f"({saved_stops}) differ from training's ({stops})")  # fmt: skip
    return {"chat_template": "same as training", "stop_token_ids": stops}
