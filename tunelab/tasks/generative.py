"""What the text-generating tasks (causal-lm, seq2seq) share: the token-level loss computed only
where there are targets, held-out loss and perplexity, and scoring generations against
references (BLEU, ROUGE, exact match) for the tuned and the un-tuned model.

The loss does not let the model compute its output layer at every position: a forward
pre-hook on the output layer keeps only the hidden states of positions that carry a target,
so the vocabulary-wide projection (49k columns for SmolLM2) and its log-softmax run on those
alone. In instruction data only the answers carry targets, which is typically a small share
of the tokens; no library offers this for arbitrary Hugging Face models, hence the hook.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
import torch.nn.functional as F

from tunelab.config import Config
from tunelab.device import autocast, to_device
from tunelab.errors import DataError
from tunelab.generation import generate, generation_kwargs
from tunelab.metrics import generation_metrics
from tunelab.models import resolve_model
from tunelab.tasks.base import TaskBase

if TYPE_CHECKING:
    from transformers import PreTrainedModel

IGNORE = -100  # label of positions without a target
PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


@contextmanager
def only_positions(model: torch.nn.Module, mask: torch.Tensor) -> Iterator[None]:
    """While active, the model's output layer sees only the hidden states where `mask` is true
    (a (batch, length) bool tensor), and so returns logits of shape (selected, vocab).
    Soft-prompt methods prepend virtual tokens: the mask is padded on the left to match."""

    def select(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        keep = mask
        if hidden.shape[1] > keep.shape[1]:
            keep = F.pad(keep, (hidden.shape[1] - keep.shape[1], 0), value=False)
        return (hidden[keep], *args[1:])

    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    handle = cast("PreTrainedModel", inner).get_output_embeddings().register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def fill_placeholders(value: Any, fill: dict[str, str] | None, where: str) -> Any:
    """Replace `{{key}}` in every string of a row (nested lists/dicts too) from `data.fill`."""
    if isinstance(value, str):
        if "{{" not in value:
            return value

        def replace(match: re.Match[str]) -> str:
            key = match.group(1)
            if not fill or key not in fill:
                raise DataError(f"{where}: placeholder {{{{{key}}}}} has no value; set data.fill.{key}=...")
            return fill[key]

        return PLACEHOLDER.sub(replace, value)
    if isinstance(value, list):
        return [fill_placeholders(v, fill, where) for v in value]
    if isinstance(value, dict):
        return {k: fill_placeholders(v, fill, where) for k, v in value.items()}
    return value


def pad_sequences(rows: list[list[int]], value: int) -> torch.Tensor:
    longest = max(len(r) for r in rows)
    out = torch.full((len(rows), longest), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class GenerativeTask(TaskBase):
    """The shared part of causal-lm and seq2seq; subclasses read rows, encode and render prompts."""

    generative = True
    default_metric = "loss"
    head_modules: tuple[str, ...] = ()  # the output layer is pretrained: no fresh head
    shift = True  # causal: position t predicts token t+1

    def __init__(self, config: Config, labels: list[str] | None = None):
        self.config = config
        self.labels = None

    # ----------------------------------------------------------------- training
    def units(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss terms: the tokens that carry a target."""
        labels = batch["labels"]
        return int(((labels[:, 1:] if self.shift else labels) != IGNORE).sum())

    def targets(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask of positions whose output is scored, the target token at each of them)."""
        if not self.shift:
            mask = labels != IGNORE
            return mask, labels[mask]
        mask = torch.zeros_like(labels, dtype=torch.bool)
        mask[:, :-1] = labels[:, 1:] != IGNORE
        return mask, labels[:, 1:][labels[:, 1:] != IGNORE]

    def token_losses(
        self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, ...]:
        """(per-target negative log-likelihoods, row index of each target)."""
        labels = batch.pop("labels")
        mask, target = self.targets(labels)
        with only_positions(model, mask):
            # no KV cache: nothing is generated, and a cache turns off transformers' packed-row masking
            logits = model(**batch, use_cache=False).logits
        rows = mask.nonzero()[:, 0]
        return F.cross_entropy(logits.float(), target, reduction="none"), rows

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed token cross-entropy over the targets (the loop divides by `units`)."""
        losses, _ = self.token_losses(model, batch)
        return losses.sum()

    # ----------------------------------------------------------------- evaluation
    @torch.inference_mode()
    def outputs(self, model: torch.nn.Module, examples: list[dict[str, Any]], pad_id: int, batch_size: int,
                device: torch.device, dtype: torch.dtype | None) -> list[np.ndarray]:  # fmt: skip
        """(summed negative log-likelihood, target count) of each example."""
        was_training = model.training
        model.eval()
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        out: list[np.ndarray] = [np.zeros(2)] * len(examples)
        step = max(1, batch_size // 8)  # long rows, and vocabulary-wide logits at each target
        for s in range(0, len(order), step):
            chunk = order[s : s + step]
            batch = to_device(self.collate([examples[i] for i in chunk], pad_id), device)
            with autocast(device, dtype):
                losses, rows = self.token_losses(model, batch)
            sums = torch.zeros(len(chunk), dtype=torch.float64).index_add_(
                0, rows.cpu(), losses.double().cpu()
            )
            counts = torch.bincount(rows.cpu(), minlength=len(chunk))
            for row, i in enumerate(chunk):
                out[i] = np.array([float(sums[row]), float(counts[row])])
        model.train(was_training)
        return out

    def metrics(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> dict[str, Any]:
        """Mean token loss and perplexity over all targets of the split."""
        total = np.sum(outputs, axis=0) if outputs else np.zeros(2)
        loss = float(total[0] / max(total[1], 1))
        return {"loss": loss, "perplexity": float(math.exp(min(loss, 700.0))), "tokens": int(total[1])}

    def calibrate(self, outputs: list[np.ndarray], examples: list[dict[str, Any]]) -> dict[str, Any]:
        return {}

    def probe_batch(self, examples: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
        """At most 8 examples cut to 64 tokens: full-vocabulary logits at every position are big."""
        short = [{k: v[:64] if isinstance(v, list) else v for k, v in e.items()} for e in examples[:8]]
        return super().probe_batch(short, pad_id)

    def predictions(self, outputs: list[Any], examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"generation": text} for text in outputs]

    # ----------------------------------------------------------------- generation
    def prompt_text(self, example: dict[str, Any], tokenizer: Any) -> str:
        raise NotImplementedError

    def generate_texts(self, model: torch.nn.Module, tokenizer: Any, prompts: list[str], device: torch.device,
                       dtype: torch.dtype | None, max_new_tokens: int | None = None, streamer: Any = None,
                       progress: Any = None, options: Any = None, stop: tuple[str, ...] = ()) -> list[str]:  # fmt: skip
        """Decode with the run's `generation` settings, or `options` (a GenerationConfig) when given;
        each row stops at eos, end of turn, or any of the `stop` strings (which stay in the text)."""
        kwargs = generation_kwargs(options or self.config.generation, tokenizer, max_new_tokens)
        return generate(model, tokenizer, prompts, kwargs, device, dtype, encoder_decoder=not self.shift,
                        streamer=streamer, progress=progress, stop=stop)  # fmt: skip

    def scored_rows(self, examples: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The examples generation metrics are computed on: those with a prompt and a reference,
        at most `generation.eval_samples` (the first ones, so every model sees the same rows)."""
        return [e for e in examples if "reference" in e][: self.config.generation.eval_samples]

    def score_generations(self, model: torch.nn.Module, tokenizer: Any, examples: list[dict[str, Any]],
                          device: torch.device, dtype: torch.dtype | None) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
        """BLEU / ROUGE / exact match of the model's generations on `scored_rows(examples)`."""
        rows = self.scored_rows(examples)
        if not rows:
            return {}, []
        generations = self.generate_texts(model, tokenizer, [e["prompt_text"] for e in rows], device, dtype,
                                          self.config.generation.eval_max_new_tokens)  # fmt: skip
        return generation_metrics([e["reference"] for e in rows], generations), generations

    def evaluate_model(self, model: torch.nn.Module, tokenizer: Any, examples: list[dict[str, Any]],
                       device: torch.device, dtype: torch.dtype | None,
                       generate: bool = True) -> tuple[dict[str, Any], list[str]]:  # fmt: skip
        """Loss, perplexity and (with `generate`) generation metrics of one model on one split."""
        metrics = self.metrics(
            self.outputs(
                model, examples, tokenizer.pad_token_id, self.config.train.eval_batch_size, device, dtype
            ),
            examples,
        )
        if not generate:
            return metrics, []
        scores, generations = self.score_generations(model, tokenizer, examples, device, dtype)
        return {**metrics, **scores}, generations

    def base_model(self) -> torch.nn.Module:
        """The un-tuned pretrained model, for the baseline rows of the report."""
        return self.build_model(resolve_model(self.config.model))


def write_samples(path: Path, examples: list[dict[str, Any]], generations: list[str],
                  baseline: list[str] | None) -> None:  # fmt: skip
    """The prompt / reference / generation table: JSON lines, and a Markdown table beside it."""
    import json

    rows = []
    for i, (e, text) in enumerate(zip(examples, generations)):
        row = {"prompt": e["prompt"], "reference": e["reference"], "generation": text}
        if baseline is not None:
            row["baseline"] = baseline[i]
        rows.append(row)
    path.with_suffix(".jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))

    def cell(text: str) -> str:
        text = " ".join(str(text).split())
        return (text[:300] + "...") if len(text) > 300 else text.replace("|", "\\|")

    header = ["prompt", "reference", "generation"] + (["un-tuned model"] if baseline is not None else [])
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r[k]) for k in ("prompt", "reference", "generation", "baseline")
                                       if k in r) + " |")  # fmt: skip
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
