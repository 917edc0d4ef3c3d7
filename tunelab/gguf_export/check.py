"""The check of a GGUF export against the merged model it came from, on held-out prompts.

tunelab's merged model (float32) decodes each prompt greedily; the GGUF file then reads every
prompt + answer in one pass, and at each answer position its most likely token must be the one
tunelab chose (the greedy answers are then identical token for token when every position agrees).
The file runs in llama.cpp (llama-cpp-python) where that is installed, which also tokenizes the
prompts to show the vocabulary and pre-tokenizer match; otherwise transformers' GGUF loader reads
it back into PyTorch. The report names which check ran.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.models import quiet_transformers

NEW_TOKENS = 32  # greedy tokens compared per prompt
PROMPT_TOKENS = 256  # longer prompts keep their last PROMPT_TOKENS tokens
# the share of the first NEW_TOKENS greedy tokens the GGUF model must pick as tunelab does
REQUIRED_AGREEMENT = {"f16": 1.0, "bf16": 0.95, "q8_0": 0.95}  # 4-bit files: measured and reported only


def has_llama_cpp() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


@torch.no_grad()
def greedy(model: torch.nn.Module, prompt: list[int], n_new: int = NEW_TOKENS) -> list[int]:
    """tunelab's greedy answer: the argmax token at each step, never stopping early (stop tokens
    are compared like any other)."""
    past, ids, out = None, torch.tensor([prompt]), []
    for _ in range(n_new):
        step = model(input_ids=ids, past_key_values=past, use_cache=True)
        past = step.past_key_values
        token = int(step.logits[0, -1].argmax())
        out.append(token)
        ids = torch.tensor([[token]])
    return out


@torch.no_grad()
def torch_logits(model: torch.nn.Module, sequence: list[int]) -> np.ndarray:
    logits: np.ndarray = model(input_ids=torch.tensor([sequence])).logits[0].float().numpy()
    return logits


def llama_cpp_run(
    path: Path, sequences: list[list[int]], tokenizer: Any, texts: list[str]
) -> tuple[list[np.ndarray], bool]:
    """llama.cpp's logits at every position of each sequence, and whether it tokenizes `texts`
    (special tokens included) to the run tokenizer's ids."""
    from llama_cpp import Llama  # optional dependency: has_llama_cpp() decided that it is here

    longest = max(len(s) for s in sequences)
    llm = Llama(model_path=str(path), n_ctx=longest + 8, n_batch=longest + 8, n_ubatch=longest + 8,
                logits_all=True, n_threads=torch.get_num_threads(), verbose=False)  # fmt: skip
    try:
        out = []
        for sequence in sequences:
            llm.reset()
            llm.eval(sequence)
            out.append(np.array(llm.scores[: len(sequence)], dtype=np.float32))
        same = all(
            llm.tokenize(t.encode(), add_bos=False, special=True)
            == tokenizer(t, add_special_tokens=False)["input_ids"]
            for t in texts
        )
        return out, same
    finally:
        llm.close()


def transformers_logits(path: Path, sequences: list[list[int]]) -> list[np.ndarray]:
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.eval()
    return [torch_logits(model, s) for s in sequences]


def check_gguf(path: Path, merged: torch.nn.Module, tokenizer: Any, prompts: list[str], quant: str,
               engine: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Compare the GGUF file at `path` with `merged` on `prompts` (rendered prompt texts).

    Returns the report: engine, prompts, new tokens, greedy agreement (share of positions where the
    GGUF model's top token is tunelab's greedy token), whether every answer is identical, the max
    logit difference, the required agreement and whether it passed. `engine` forces "llama.cpp" or
    "transformers" (default: llama.cpp when installed).
    """
    engine = engine or ("llama.cpp" if has_llama_cpp() else "transformers")
    merged.eval()
    starts, sequences = [], []
    for text in prompts:
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"][-PROMPT_TOKENS:]
        starts.append(len(prompt))
        sequences.append(prompt + greedy(merged, prompt))
    tokenizer_agrees = None
    if engine == "llama.cpp":
        theirs, tokenizer_agrees = llama_cpp_run(path, sequences, tokenizer, prompts)
    else:
        theirs = transformers_logits(path, sequences)
    agree, total, identical, max_diff = 0, 0, 0, 0.0
    for start, sequence, other in zip(starts, sequences, theirs):
        ours = torch_logits(merged, sequence)
        answer = np.array(sequence[start:])
        picks = other[start - 1 : len(sequence) - 1].argmax(-1)
        agree += int((picks == answer).sum())
        total += len(answer)
        identical += int((picks == answer).all())
        max_diff = max(max_diff, float(np.abs(ours - other).max()))
    agreement = agree / total
    required = REQUIRED_AGREEMENT.get(quant)
    report: dict[str, Any] = {
        "engine": engine if engine == "llama.cpp" else "transformers (GGUF loader)",
        "prompts": len(prompts),
        "new_tokens": NEW_TOKENS,
        "greedy_agreement": round(agreement, 4),
        "identical_answers": identical,
        "max_logit_diff": round(max_diff, 5),
        "required_agreement": required,
        "passed": required is None or agreement >= required,
    }
    if tokenizer_agrees is not None:
        report["tokenizer_agrees"] = tokenizer_agrees
        report["passed"] = report["passed"] and tokenizer_agrees
    return report


def threads() -> int:
    return max(1, min(os.cpu_count() or 1, torch.get_num_threads()))
