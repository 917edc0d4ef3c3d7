"""`tunelab export RUN --gguf`: a causal-LM run as one GGUF file for llama.cpp, Ollama and LM Studio,
with an Ollama `Modelfile` beside it, checked in llama.cpp before it is reported.

    OUT/
      <run>-<quant>.gguf   merged weights, tokenizer (with its pre-tokenizer), chat template,
                           bos / eos ids and the end-of-turn token (eot) that stops a turn
      Modelfile            FROM, the chat template as Ollama's TEMPLATE, PARAMETER stop
      export.json          what was written and the check's figures
      README.md            the model card

The adapters are merged first (the method's own `merge`). f16 / bf16 / q8_0 are written by the
`gguf` library; q4_0 and q4_k_m are quantized from an f16 file by llama.cpp
(`pip install llama-cpp-python`). The check (`check.py`) runs the file in llama.cpp, or, without
llama-cpp-python, in transformers' GGUF loader, on held-out prompts of the run: at f16 the greedy
answers must be identical to tunelab's, at q8_0 / bf16 agree on >= 95% of the first 32 tokens.
Everything is written to a hidden sibling folder and renamed into place only when the check passes.

    convert.py    the model and tokenizer as GGUF (what the gguf library does not do itself)
    check.py      the comparison with the merged model, in llama.cpp or transformers
    modelfile.py  the Modelfile, with the Jinja chat template as an Ollama Go template
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

from tunelab.config import CAUSAL_LM_TASKS, load_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.generation import END_OF_TURN, stop_token_ids
from tunelab.gguf_export.check import check_gguf, has_llama_cpp, threads
from tunelab.gguf_export.convert import (
    DIRECT_QUANTS,
    QUANTS,
    architecture_of,
    import_gguf,
    quantize,
    write_gguf,
)
from tunelab.gguf_export.modelfile import modelfile
from tunelab.methods import METHODS
from tunelab.model_card import write_model_card
from tunelab.models import quiet_transformers, resolve_model
from tunelab.outputs import check_writable
from tunelab.run import Run
from tunelab.tasks.base import split_tables

__all__ = ["QUANTS", "export_gguf", "heldout_prompts"]
LLAMA_CPP_HINT = "pip install llama-cpp-python"
FALLBACK_PROMPTS = ["Give three tips for staying healthy.", "What is the capital of France?",
                    "Write a haiku about the sea.", "Explain what a list is in Python."]  # fmt: skip


def check_request(run_dir: Path, out: Path, quant: str) -> Any:
    """Refuse what cannot work before anything is loaded or written; returns the run's config.

    Raises:
        TunelabError: an existing output folder, an unknown quant, a run that is not a mergeable
            causal-LM of a covered architecture, or a missing package.
    """
    if out.exists():
        raise TunelabError(f"{out} already exists; choose another --out or remove it")
    check_writable(out, f"--out {out}")  # before loading: a file in the way, read-only, /proc
    if quant not in QUANTS:
        raise TunelabError(f"--quant {quant}: choose one of {', '.join(QUANTS)}")
    if not (run_dir / "config.yaml").is_file():
        raise TunelabError(f"{run_dir} is not a finished tunelab run: it needs config.yaml and model/")
    config = load_config(run_dir / "config.yaml")
    if config.task not in CAUSAL_LM_TASKS:
        other = "--onnx or --merge" if config.task != "seq2seq" else "--merge"
        raise TunelabError(f"GGUF export is for causal-lm decoders; {run_dir} is a {config.task} run; "
                           f"use {other}")  # fmt: skip
    if METHODS[config.method].merge is None:
        mergeable = ", ".join(name for name, m in METHODS.items() if m.merge is not None)
        raise TunelabError(f"GGUF holds plain weights, and method {config.method} cannot be merged into them; "
                           f"train with one of: {mergeable}")  # fmt: skip
    from transformers import AutoConfig

    with quiet_transformers():
        hf = AutoConfig.from_pretrained(resolve_model(config.model))
    architecture_of(hf, str(run_dir))
    import_gguf()
    if quant not in DIRECT_QUANTS and not has_llama_cpp():
        raise ConfigError(f"--quant {quant} is made by llama.cpp's quantizer: {LLAMA_CPP_HINT} "
                          f"(or use --quant {'/'.join(DIRECT_QUANTS)})")  # fmt: skip
    return config


def heldout_prompts(run: Any, n: int = 8) -> list[str]:
    """Up to `n` prompts the run did not train on: the test file, the validation file, or the
    validation share held out of the training file (the same rows training held out); a
    conversation's prompt is rendered with the chat template, up to the assistant's answer.
    Fixed questions stand in when the data files are no longer where the run read them."""
    d, task = run.config.data, run.task
    table = None
    for path in (d.test, d.validation):
        if path and Path(path).is_file():
            table = task.read(path)
            break
    if table is None and d.train and Path(d.train).is_file():
        table = split_tables(task, task.read(d.train), None)[1]
    if table is None:  # the data files have moved: fixed questions
        return [task.prompt_for(text, run.tokenizer) for text in FALLBACK_PROMPTS][:n]
    examples = task.encode(table, run.tokenizer)
    prompts = [e["prompt_text"] for e in examples if e.get("prompt_text")]
    if not prompts:  # plain text: the start of each held-out block
        prompts = [run.tokenizer.decode(e["input_ids"][:24]) for e in examples]
    return prompts[:n]


def end_of_turn(tokenizer: Any) -> int | None:
    """The token that ends a turn in the chat template (`<|im_end|>`, `<|eot_id|>` ...), else eos."""
    for token_id in stop_token_ids(tokenizer):
        if tokenizer.convert_ids_to_tokens(token_id) in END_OF_TURN:
            return token_id
    eos: int | None = tokenizer.eos_token_id
    return eos


def export_gguf(run_dir: str | Path, out: str | Path, quant: str = "f16", say: Any = print,
                prompts: int | list[str] = 8) -> dict[str, Any]:  # fmt: skip
    """Write and check a GGUF export of a finished causal-LM run; returns the report.

    `prompts`: how many held-out prompts the check runs (`heldout_prompts`), or the rendered
    prompt texts themselves.

    Raises:
        TunelabError: the request cannot be met (see `check_request`), or the GGUF model does not
            reproduce the merged model's greedy answers; nothing is left at `out` then.
    """
    run_dir, out = Path(run_dir), Path(out)
    check_request(run_dir, out, quant)
    run = Run.load(run_dir)
    run.model.to("cpu").float()
    merge = METHODS[run.config.method].merge
    assert merge is not None, "check_request refused methods without a merge"
    merged = merge(copy.deepcopy(run.model)).eval()
    texts = prompts if isinstance(prompts, list) else heldout_prompts(run, prompts)
    eot = end_of_turn(run.tokenizer)
    name = f"{run_dir.resolve().name}-{quant}.gguf"
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if quant in DIRECT_QUANTS:
            written = write_gguf(merged, run.tokenizer, tmp / name, quant, run_dir.name, eot)
        else:
            source = tmp / f".{run_dir.name}-f16.gguf"
            written = write_gguf(merged, run.tokenizer, source, "f16", run_dir.name, eot)
            quantize(source, tmp / name, quant, threads())
            source.unlink()
        text, modelfile_report = modelfile(name, run.tokenizer, stop_token_ids(run.tokenizer))
        (tmp / "Modelfile").write_text(text, encoding="utf-8")
        check = check_gguf(tmp / name, merged, run.tokenizer, texts, quant)
        if not check["passed"]:
            raise TunelabError(failure(check, out))
        report = {"kind": "gguf", "file": name, "quant": quant, "bytes": (tmp / name).stat().st_size,
                  "architecture": written.architecture, "tokenizer": written.tokenizer_model,
                  "pre_tokenizer": written.pre_tokenizer, "bos_token_id": run.tokenizer.bos_token_id,
                  "eos_token_id": run.tokenizer.eos_token_id, "eot_token_id": eot, "modelfile": modelfile_report,
                  "check": check, "method": run.config.method, "task": run.config.task,
                  "loads_with": "llama.cpp / llama-cpp-python, Ollama (ollama create NAME -f Modelfile), LM Studio"}  # fmt: skip
        (tmp / "export.json").write_text(json.dumps(report, indent=2) + "\n")
        note = (f"Run in {check['engine']} on {check['prompts']} held-out prompts next to the merged model: "
                f"greedy tokens agree on {check['greedy_agreement']:.1%} of the first {check['new_tokens']} "
                f"({quant}), max logit difference {check['max_logit_diff']:.3g}.")  # fmt: skip
        write_model_card(run, tmp, "gguf", {**report, "card_notes": [note]})  # README.md: the model card
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"tunelab: GGUF ({quant}) checked in {check['engine']} on {check['prompts']} held-out prompts: greedy "
        f"tokens agree on {check['greedy_agreement']:.1%} of the first {check['new_tokens']}, max logit "
        f"difference {check['max_logit_diff']:.3g}; written to {out} ({name}, Modelfile)")  # fmt: skip
    return report


def failure(check: dict[str, Any], out: Path) -> str:
    if check.get("tokenizer_agrees") is False:
        return (f"GGUF check failed: llama.cpp tokenizes the held-out prompts differently from the run's "
                f"tokenizer; nothing was written to {out}")  # fmt: skip
    return (f"GGUF check failed in {check['engine']}: greedy tokens agree on {check['greedy_agreement']:.1%} "
            f"(needs {check['required_agreement']:.0%}), max logit difference {check['max_logit_diff']:.3g}; "
            f"nothing was written to {out}")  # fmt: skip
