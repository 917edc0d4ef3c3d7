"""Writes examples/data/signoff_pairs.json and signoff_heldout.json, the pairs of the
preference style demo (examples/preference.yaml).

Each prompt is answered by SmolLM2-135M-Instruct itself (greedy, as `tunelab predict` would);
the rejected answer is that answer, the chosen one is the same answer followed by a fixed
sign-off. So a pair differs only in the sign-off, and DPO has one thing to learn: end every
answer with it. The prompts are written here (topics x question templates); nothing is
downloaded. Run from the project root: python examples/make_signoff_pairs.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from transformers import AutoModelForCausalLM

from tunelab.config import load_config
from tunelab.models import load_tokenizer, resolve_model
from tunelab.run import Run
from tunelab.tasks import TASKS

SIGN_OFF = "Stay curious!"
TOPICS = [
    "tea", "bicycles", "the moon", "volcanoes", "bread", "rain", "honeybees", "chess", "libraries",
    "recycling", "sleep", "maps", "the ocean", "coffee", "gardening", "clocks", "snow", "bridges",
    "music", "trains", "owls", "cheese", "kites", "rivers", "deserts", "penguins", "soap", "lighthouses",
    "umbrellas", "forests", "cooking rice", "walking", "stars", "apples", "paper", "wind", "tomatoes",
    "museums", "swimming", "candles",
]  # fmt: skip
TEMPLATES = [
    "In one sentence, what is special about {}?",
    "Give one short tip about {}.",
    "Tell me one fun fact about {}.",
    "Describe {} in a few words.",
    "What is one good thing about {}?",
]


def main() -> None:
    prompts = [t.format(topic) for topic in TOPICS for t in TEMPLATES]
    random.Random(0).shuffle(prompts)
    config = load_config(model="smollm2-135m", task="causal-lm")
    path = resolve_model(config.model)
    task = TASKS["causal-lm"](config)
    task.layout = "messages"  # prompts go through the chat template, as `tunelab predict` sends them
    run = Run(
        Path("."), config, task, AutoModelForCausalLM.from_pretrained(path).eval(), load_tokenizer(path)
    )
    rendered = [run.task.prompt_for(p, run.tokenizer) for p in prompts]
    answers = [a.strip() for a in run.generate(rendered, max_new_tokens=64)]
    # keep answers that ended on their own (not cut at 64 tokens) and lack the sign-off already
    rows = [{"prompt": p, "chosen": f"{a}\n\n{SIGN_OFF}", "rejected": a} for p, a in zip(prompts, answers)
            if a and len(run.tokenizer(a)["input_ids"]) < 60 and SIGN_OFF not in a]  # fmt: skip
    held_out, train = rows[:20], rows[20:120]
    folder = Path("examples/data")
    for name, part in (("signoff_pairs.json", train), ("signoff_heldout.json", held_out)):
        (folder / name).write_text(json.dumps(part, indent=1, ensure_ascii=False) + "\n")
    print(f"{len(train)} training pairs, {len(held_out)} held out (of {len(prompts)} prompts)")


if __name__ == "__main__":
    main()
