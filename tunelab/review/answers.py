"""The two sides of a review: prompts from a file, and the answers of a run directory, an exported
folder, or (`--baseline`) the model a run started from, all decoded greedily with the run's
generation settings and chat template, so the two sides differ only in their weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.console import say
from tunelab.data import read_table
from tunelab.errors import DataError, TunelabError
from tunelab.run import Run
from tunelab.serve.loading import load_served

BATCH = 8  # prompts per generate call


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt file (one a line) or a CSV/TSV/JSON/JSONL file with a `prompt` column
    (or Alpaca's `instruction` and optional `input`).

    Raises:
        DataError: the file is missing, empty, or a row has no prompt (naming the row).
    """
    path = Path(path)
    if path.suffix == ".txt" and path.is_file():
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise DataError(f"--prompts {path}: no prompts (one a line)")
        return prompts
    table = read_table(path)
    prompts = []
    for i, row in enumerate(table.rows):
        prompt = row.get("prompt") or row.get("instruction")
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{table.where(i)}: no prompt; give each row a 'prompt' (or 'instruction') text")
        extra = row.get("input") if "prompt" not in row else None
        prompts.append(f"{prompt}\n{extra}" if isinstance(extra, str) and extra.strip() else prompt)
    return prompts


def load_side(path: str | Path) -> Any:
    """A loaded generative model (run directory or exported folder).

    Raises:
        TunelabError: nothing servable at `path`, or a model that does not generate text.
    """
    if not Path(path).exists():
        raise TunelabError(f"{path}: no such run or model folder")
    run = load_served(path)
    if not getattr(run.task, "generative", False):
        raise TunelabError(
            f"{path}: a {run.config.task} model; review compares the text two generative models write"
        )
    return run


def generate_all(run: Any, prompts: list[str], model: Any = None) -> list[str]:
    """Greedy answers of `run` (or of `model`, with the run's tokenizer and template) to `prompts`."""
    rendered = [run.task.prompt_for(p, run.tokenizer) for p in prompts]
    texts: list[str] = []
    for start in range(0, len(rendered), BATCH):
        chunk = rendered[start : start + BATCH]
        if model is None:
            texts += run.generate(chunk)
        else:
            texts += run.task.generate_texts(model, run.tokenizer, chunk, run.device, run.dtype)
    return [t.strip() for t in texts]


def answers(a: str, b: str | None, prompts: list[str]) -> tuple[list[str], list[str]]:
    """Both sides' answers; with `b` None, side B is the model run `a` started from."""
    run_a = load_side(a)
    say(f"review: {a} answers {len(prompts)} prompts")
    first = generate_all(run_a, prompts)
    if b is None:
        if not isinstance(run_a, Run) or not (Path(a) / "config.yaml").is_file():
            raise TunelabError(
                f"--baseline: {a} is not a tunelab run, so the model it started from is unknown; give B"
            )
        say(f"review: the starting model ({run_a.config.model}) answers them")
        base = run_a.task.base_model().to(run_a.device).eval()
        return first, generate_all(run_a, prompts, base)
    run_b = load_side(b)
    say(f"review: {b} answers them")
    return first, generate_all(run_b, prompts)
