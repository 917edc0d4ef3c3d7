"""What the methods share: finding a model's transformer blocks and its head, saving and
loading only the parameters that trained, the `peft` plumbing, and the merge check.

Blocks are found by structure, not by architecture names (`tunelab.models.block_stacks`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from tunelab.models import resolve_model

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

TRAINED_FILE = "trained.safetensors"


def hidden_size(model: nn.Module) -> int:
    config = model.config
    for key in ("hidden_size", "d_model", "n_embd", "dim"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    raise ValueError(f"cannot tell the hidden size of {type(model).__name__}")


def head_names(model: nn.Module, task: Any) -> list[str]:
    """Names of the task-head modules present in the model (e.g. `classifier`, `bert.pooler`)."""
    wanted = set(task.head_modules)
    names: list[str] = []
    for name, _ in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if last in wanted and not any(name.startswith(n + ".") for n in names):
            names.append(name)
    return names


def freeze_all_but(model: nn.Module, prefixes: list[str]) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(any(name == q or name.startswith(q + ".") for q in prefixes))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, out_dir: Path) -> None:
    """Save the trained parameters only, plus the model config (label names, sizes)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(out_dir / TRAINED_FILE))
    cast("PreTrainedModel", model).config.save_pretrained(out_dir)


def load_trainable(model: nn.Module, model_dir: Path) -> nn.Module:
    """Load saved trained parameters into a freshly built (and adapted) model."""
    from safetensors.torch import load_file

    state = load_file(str(model_dir / TRAINED_FILE))
    missing = set(state) - {n for n, _ in model.named_parameters()}
    if missing:
        raise ValueError(
            f"{model_dir / TRAINED_FILE} holds parameters the model lacks: {sorted(missing)[:5]}"
        )
    model.load_state_dict(state, strict=False)
    return model


def base_model(config: Any, task: Any) -> nn.Module:
    """The pretrained model of the run's config, with a fresh task head."""
    return task.build_model(resolve_model(config.model))


# ------------------------------------------------------------------------------- peft


def peft_apply(model: nn.Module, task: Any, peft_config: Any) -> nn.Module:
    from peft import get_peft_model

    return get_peft_model(model, peft_config)


def peft_save(model: nn.Module, out_dir: Path) -> None:
    cast("PeftModel", model).save_pretrained(str(out_dir))


def peft_load(config: Any, task: Any, model_dir: Path) -> nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model(config, task), str(model_dir))


def peft_merge(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights and return the plain transformers model.

    Done as merge + unwrap by hand: peft's `merge_and_unload` fails for IA3 when a module
    with children (a BERT pooler) is in `modules_to_save`."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import ModulesToSaveWrapper

    peft_model = cast("PeftModel", model)
    peft_model.merge_adapter()
    base = peft_model.get_base_model()
    for name, module in reversed(list(base.named_modules())):
        if isinstance(module, ModulesToSaveWrapper):
            plain = module.modules_to_save[module.active_adapters[0]]
        elif isinstance(module, BaseTunerLayer):
            plain = module.get_base_layer()
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, child, plain)
    return base


def output_logits(output: Any) -> torch.Tensor:
    """A model output's scores as one float tensor: `logits`, or for span heads (question
    answering) the start and end logits side by side."""
    logits = getattr(output, "logits", None)
    if logits is None:
        logits = torch.stack([output.start_logits, output.end_logits], -1)
    return logits.float()


@torch.no_grad()
def merge_checked(method: Any, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[nn.Module, float]:
    """Merge with `method.merge` and return (merged model, max |logits difference|) on `batch`.

    Raises:
        ValueError: the method cannot be merged into plain weights.
    """
    if method.merge is None:
        raise ValueError(f"{method.__name__.rsplit('.', 1)[-1]} cannot be merged into the base weights")
    model.eval()
    before = output_logits(model(**batch))
    merged = method.merge(model).eval()
    return merged, float((before - output_logits(merged(**batch))).abs().max())
