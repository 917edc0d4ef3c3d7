#!/usr/bin/env python
"""Extractive question answering on real sentences: a SQuAD-v2-format set built from CoNLL-2003.

Each sentence of CoNLL-2003 (train for training, dev for evaluation) gets questions that ask
for the entity of one type ("Which organisation is mentioned?" and paraphrases, per type:
person, organisation, location, other name). Where the sentence holds an entity of that
type, every one of them is a gold answer (the first is the training target); a question about
a type the sentence lacks is unanswerable. About a third of the questions are unanswerable.
Then minilm-l6 trains with `tunelab train` (full fine-tuning unless --methods says more) and
the official-style metrics (EM, F1, HasAns/NoAns) come from eval.json.

    python benchmarks/qa_conll.py [--train-questions 4000] [--eval-questions 1000] [--methods full]

Writes the sets and runs to runs/qa_conll/ (the sets as SQuAD v2.0 JSON), one JSON line per run
to benchmarks/results/qa_conll.jsonl, and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import tunelab

QUESTIONS = {
    "PER": ["Which person is mentioned?", "Who is named in the sentence?", "Which person does the text mention?"],
    "ORG": ["Which organisation is mentioned?", "What organization is named?", "Which company, team or body appears?"],
    "LOC": ["Which place is mentioned?", "What location is named?", "Which country, city or region appears?"],
    "MISC": ["Which other name is mentioned (a nationality, event or title)?", "What miscellaneous name appears?",
             "Which name that is not a person, place or organisation is mentioned?"],
}  # fmt: skip


def sentences(path: Path) -> list[tuple[list[str], list[str]]]:
    """(tokens, BIO tags) of each sentence of a CoNLL file."""
    out, tokens, tags = [], [], []
    for line in path.read_text(encoding="utf-8").splitlines() + [""]:
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if tokens:
                out.append((tokens, tags))
            tokens, tags = [], []
            continue
        tokens.append(fields[0])
        tags.append(fields[-1])
    return out


def entities(tokens: list[str], tags: list[str]) -> tuple[str, dict[str, list[tuple[str, int]]]]:
    """The sentence as text (tokens joined by spaces) and its entities per type as (text, start)."""
    starts, text = [], ""
    for token in tokens:
        starts.append(len(text) + (1 if text else 0))
        text = f"{text} {token}" if text else token
    found: dict[str, list[tuple[str, int]]] = {}
    i = 0
    while i < len(tags):
        if tags[i].startswith(("B-", "I-")):
            kind, j = tags[i][2:], i + 1
            while j < len(tags) and tags[j] == f"I-{kind}":
                j += 1
            start, end = starts[i], starts[j - 1] + len(tokens[j - 1])
            found.setdefault(kind, []).append((text[start:end], start))
            i = j
        else:
            i += 1
    return text, found


def build(path: Path, n: int, seed: int) -> dict:
    """A SQuAD v2.0 dict of about `n` questions over the file's sentences (5+ tokens)."""
    rng = random.Random(seed)
    pool = [s for s in sentences(path) if len(s[0]) >= 5]
    rng.shuffle(pool)
    paragraphs, count = [], 0
    for tokens, tags in pool:
        if count >= n:
            break
        text, found = entities(tokens, tags)
        present = [k for k in QUESTIONS if k in found]
        absent = [k for k in QUESTIONS if k not in found]
        asked = [rng.choice(present)] if present else []
        if absent and (not present or rng.random() < 0.5):
            asked.append(rng.choice(absent))
        qas = []
        for kind in asked:
            answers = [{"text": t, "answer_start": s} for t, s in found.get(kind, [])]
            qas.append({"id": f"{path.stem}-{count}", "question": rng.choice(QUESTIONS[kind]), "answers": answers,
                        "is_impossible": not answers})  # fmt: skip
            count += 1
        if qas:
            paragraphs.append({"context": text, "qas": qas})
    return {"version": "v2.0", "data": [{"title": f"conll2003-{path.stem}", "paragraphs": paragraphs}]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "conll2003")
    )
    parser.add_argument("--train-questions", type=int, default=4000)
    parser.add_argument("--eval-questions", type=int, default=1000)
    parser.add_argument("--methods", default="full")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/qa_conll.jsonl")
    parser.add_argument("--work", default="runs/qa_conll", help="where the built sets and the runs go")
    args = parser.parse_args()
    data, folder = Path(args.data), Path(args.work)
    folder.mkdir(parents=True, exist_ok=True)
    train_file, eval_file = folder / "train.json", folder / "dev.json"
    train_file.write_text(json.dumps(build(data / "train.txt", args.train_questions, seed=0)))
    eval_file.write_text(json.dumps(build(data / "dev.txt", args.eval_questions, seed=1)))
    rows = []
    for method in args.methods.split(","):
        run = tunelab.train(model="minilm-l6", task="question-answering", method=method.strip(),
                            output_dir=str(folder / f"run-{method.strip()}"), overwrite=True,
                            **{"data.train": str(train_file), "data.validation": str(eval_file),
                               "data.max_length": 128, "data.doc_stride": 32, "train.epochs": args.epochs,
                               "train.batch_size": 32, "train.num_threads": args.threads})  # fmt: skip
        report = json.loads((run.path / "eval.json").read_text())
        row = {"method": method.strip(), **report["validation"], "null_threshold": run.config.qa.null_threshold,
               "train_questions": args.train_questions, "eval_questions": args.eval_questions,
               "epochs": args.epochs, "runtime_s": report["train"]["runtime_s"],
               "trainable_params": report["train"]["trainable_params"]}  # fmt: skip
        rows.append(row)
        with open(args.out, "a") as log:
            log.write(json.dumps(row) + "\n")
    print("| method | EM | F1 | HasAns F1 | NoAns EM | training time |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['method']} | {r['exact_match']:.3f} | {r['f1']:.3f} | {r.get('HasAns_f1', 0):.3f} | "
            f"{r.get('NoAns_exact', 0):.3f} | {r['runtime_s'] / 60:.1f} min |"
        )


if __name__ == "__main__":
    main()
