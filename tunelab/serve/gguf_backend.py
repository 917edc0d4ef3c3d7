"""Serving a GGUF file (`tunelab export --gguf`) through llama-cpp-python, behind the same endpoints.

`GgufRun` has what the worker and the routes ask of a loaded run (`ServedRun`): the causal-LM task
renders chat prompts with the file's own chat template, the tokenizer (transformers reads it from
the GGUF file) counts tokens and decodes the stream, and `generate` runs llama.cpp: greedy, or
sampling with the request's temperature and top-p, stopping at the file's end-of-generation tokens
(eos, end of turn) or a stop string. Streamed answers go through the same streamer object
transformers' `generate` would write to, so the routes stream both backends alike.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from tunelab.config import load_config
from tunelab.errors import ConfigError, TunelabError
from tunelab.models import quiet_transformers
from tunelab.tasks import TASKS

INSTALL_HINT = "serving a GGUF file needs llama-cpp-python: pip install llama-cpp-python"
CONTEXT = 4096  # tokens of context llama.cpp allocates (at most the model's own)


def gguf_file(path: Path) -> Path | None:
    """The GGUF file at `path`: the file itself, or the only .gguf in an export folder."""
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.yaml").is_file() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise TunelabError(f"{path} holds {len(found)} GGUF files; serve one of them by its path")
        return found[0] if found else None
    return None


class GgufRun:
    """A GGUF causal LM run by llama.cpp, with the interface of a loaded run."""

    def __init__(self, path: Path, file: Path, threads: int | None = None) -> None:
        from llama_cpp import Llama, llama_vocab_is_eog  # optional dependency: load_gguf checked it
        from transformers import AutoTokenizer

        self.path, self.file = path, file
        with quiet_transformers():
            self.tokenizer = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        overrides: dict[str, Any] = {"model": str(file.parent), "task": "causal-lm", "method": "full",
                                     "data.format": "messages" if self.tokenizer.chat_template else "text"}  # fmt: skip
        self.config = load_config(**overrides)
        self.task = TASKS["causal-lm"](self.config)
        self.llm = Llama(model_path=str(file), n_ctx=CONTEXT, n_threads=threads or torch.get_num_threads(),
                         verbose=False)  # fmt: skip
        vocab = self.llm._model.vocab  # llama-cpp-python exposes the vocabulary handle only here
        self.is_end = lambda token: bool(llama_vocab_is_eog(vocab, token))

    def predict(self, texts: list[str], pairs: list[str] | None = None) -> list[dict[str, Any]]:
        raise TunelabError("a GGUF model generates text: use /v1/chat/completions or /v1/completions")

    def generate(self, prompts: list[str], streamer: Any = None, max_new_tokens: int | None = None,
                 options: Any = None, stop: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
        """The answer to each rendered prompt, one after another; `streamer` (a transformers
        streamer) receives the prompt, then each new token, then its end."""
        options = options or self.config.generation
        limit = max_new_tokens or options.max_new_tokens
        sampling = {"temp": options.temperature if options.do_sample else 0.0, "top_p": options.top_p or 1.0,
                    "top_k": options.top_k or 0, "min_p": 0.0, "repeat_penalty": options.repetition_penalty}  # fmt: skip
        answers = []
        for prompt in prompts:
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            if streamer is not None:
                streamer.put(torch.tensor([ids]))
            new: list[int] = []
            try:
                for token in self.llm.generate(ids, reset=True, **sampling):
                    if self.is_end(token):
                        break
                    new.append(token)
                    if streamer is not None:
                        streamer.put(torch.tensor([token]))
                    if len(new) >= limit or (stop and any(s in self.tokenizer.decode(new) for s in stop)):
                        break
            finally:
                if streamer is not None:
                    streamer.end()
            answers.append(str(self.tokenizer.decode(new, skip_special_tokens=True)).strip())
        return answers


def load_gguf(path: Path) -> GgufRun | None:
    """A GgufRun for a .gguf file or an export folder holding one; None when `path` holds none.

    Raises:
        ConfigError: llama-cpp-python is not installed.
    """
    file = gguf_file(path)
    if file is None:
        return None
    if importlib.util.find_spec("llama_cpp") is None:
        raise ConfigError(INSTALL_HINT)
    return GgufRun(path, file)
