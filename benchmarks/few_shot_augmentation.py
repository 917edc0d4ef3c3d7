#!/usr/bin/env python
"""What EDA augmentation buys in few-shot SST-2 classification with minilm-l6.

For 16 and 64 shots per class, with and without `data.augment.method=eda`, over 5 seeds:
fine-tune (full, 10 epochs), then report test accuracy (the 872-row SST-2 test set) as
mean ± std. The seed picks the shots, the initialisation and the augmentation.

    python benchmarks/few_shot_augmentation.py [--data ../shared/data/sst2] [--seeds 5]

Prints a Markdown table (the one in benchmarks/README.md) and writes the per-run numbers as JSON lines.
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


def write_validation(data: Path, folder: Path, n: int = 200) -> Path:
    """A fixed 200-row validation file (from validation.tsv) for picking the best epoch."""
    with open(data / "validation.tsv", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, body = rows[0], rows[1:]
    random.Random(0).shuffle(body)
    path = folder / "validation.tsv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerows([header] + body[:n])
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2")
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--shots", default="16,64")
    parser.add_argument("--epochs", type=float, default=10)
    parser.add_argument("--factor", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/few_shot_augmentation.jsonl")
    args = parser.parse_args()
    data = Path(args.data)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    results: dict[tuple[int, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, open(args.out, "w") as log:
        validation = write_validation(data, Path(tmp))
        for shots in (int(s) for s in args.shots.split(",")):
            for augment in ("none", "eda"):
                for seed in range(args.seeds):
                    run = tunelab.train(
                        model="minilm-l6", method="full", seed=seed, output_dir=f"{tmp}/run", overwrite=True,
                        train=str(data / "train.tsv"), validation=str(validation), test=str(data / "test.tsv"),
                        text_column="sentence", shots_per_class=shots, epochs=args.epochs, progress_bar=False,
                        **{"data.augment.method": augment, "data.augment.factor": args.factor},
                    )  # fmt: skip
                    report = json.loads((run.path / "eval.json").read_text())
                    accuracy = report["test"]["accuracy"]
                    results.setdefault((shots, augment), []).append(accuracy)
                    line = {"shots_per_class": shots, "augment": augment, "factor": args.factor, "seed": seed,
                            "test_accuracy": accuracy, "train_examples": report["train"]["train_examples"]}  # fmt: skip
                    log.write(json.dumps(line) + "\n")
                    log.flush()
                    print(json.dumps(line), flush=True)
    print(f"\n| shots per class | no augmentation | EDA x{args.factor} | difference |")
    print("| --- | --- | --- | --- |")
    for shots in sorted({s for s, _ in results}):
        plain, eda = results[(shots, "none")], results[(shots, "eda")]

        def show(xs: list[float]) -> str:
            return f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0:.3f}"

        diff = statistics.mean(eda) - statistics.mean(plain)
        print(f"| {shots} | {show(plain)} | {show(eda)} | {diff:+.3f} |")


if __name__ == "__main__":
    main()
