#!/usr/bin/env python
"""Does masked-LM domain adaptation help few-shot classification? AG News with minilm-l6.

1. Adapt: `task=masked-lm` on the AG News training texts without their labels (minilm-l6,
   full fine-tuning, --mlm-epochs), reporting the held-out masked-token perplexity beside the
   un-tuned model's.
2. Classify: with 16 and 64 labelled examples per class, over --seeds seeds, fine-tune (full)
   from minilm-l6 and from the adapted run (`model: <the MLM run>`), then score accuracy on a
   fixed --test-rows slice of the AG News test set. Mean ± std, whichever way it comes out.

    python benchmarks/mlm_study.py [--seeds 5] [--shots 16,64] [--mlm-rows 10000] [--test-rows 2000]

Writes one JSON line per run to benchmarks/results/mlm_study.jsonl and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import statistics
import tempfile
from pathlib import Path

import tunelab


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def write_tsv(path: Path, rows: list[dict[str, str]], columns: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(columns)
        writer.writerows([[r[c].replace("\t", " ") for c in columns] for r in rows])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "agnews")
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--shots", default="16,64")
    parser.add_argument("--mlm-rows", type=int, default=10000)
    parser.add_argument("--mlm-epochs", type=float, default=1)
    parser.add_argument("--test-rows", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--out", default="benchmarks/results/mlm_study.jsonl")
    parser.add_argument("--work", default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    data = Path(args.data)
    train_rows, test_rows = read_tsv(data / "train.tsv"), read_tsv(data / "test.tsv")
    random.Random(0).shuffle(test_rows)
    with tempfile.TemporaryDirectory() as tmp, open(args.out, "a") as log:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        texts = write_tsv(work / "texts.tsv", train_rows[: args.mlm_rows], ["text"])
        test = write_tsv(work / "test.tsv", test_rows[: args.test_rows], ["text", "label"])
        labelled = write_tsv(work / "train.tsv", train_rows, ["text", "label"])
        adapted = tunelab.train(model="minilm-l6", task="masked-lm", method="full", output_dir=str(work / "mlm"),
                                overwrite=True, **{"data.train": str(texts), "data.block_size": 128,
                                                   "train.epochs": args.mlm_epochs, "train.batch_size": 32})  # fmt: skip
        report = json.loads((adapted.path / "eval.json").read_text())
        mlm = {"step": "mlm", "tuned": report["validation"], "untuned": report["baseline"]["validation"],
               "runtime_s": report["train"]["runtime_s"]}  # fmt: skip
        log.write(json.dumps(mlm) + "\n")
        log.flush()
        results: dict[tuple[int, str], list[float]] = {}
        for shots in (int(s) for s in args.shots.split(",")):
            for start, model in (("minilm-l6", "minilm-l6"), ("adapted", str(adapted.path))):
                for seed in range(args.seeds):
                    run = tunelab.train(model=model, task="classification", method="full", seed=seed, overwrite=True,
                                        output_dir=str(work / f"cls-{start}-{shots}-{seed}"),
                                        **{"data.train": str(labelled), "data.test": str(test),
                                           "data.shots_per_class": shots, "train.epochs": args.epochs,
                                           "train.progress_bar": False})  # fmt: skip
                    accuracy = json.loads((run.path / "eval.json").read_text())["test"]["accuracy"]
                    results.setdefault((shots, start), []).append(accuracy)
                    log.write(json.dumps({"step": "classify", "shots": shots, "start": start, "seed": seed,
                                          "accuracy": accuracy}) + "\n")  # fmt: skip
                    log.flush()
    print("| held-out masked tokens | loss | perplexity | accuracy |\n| --- | --- | --- | --- |")
    for name in ("untuned", "tuned"):
        m = mlm[name]
        print(f"| {name} | {m['loss']:.3f} | {m['perplexity']:.1f} | {m['accuracy']:.3f} |")
    print("\n| shots per class | from minilm-l6 | from the adapted encoder |\n| --- | --- | --- |")
    for shots in sorted({s for s, _ in results}):
        cells = []
        for start in ("minilm-l6", "adapted"):
            values = results[(shots, start)]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {spread:.3f}")
        print(f"| {shots} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
