#!/usr/bin/env python
"""Data at scale: classification CSVs of 100k, 500k and 2M rows, the first 200 steps of one
epoch, today's in-memory path (data.cache=false, "before") against the Arrow token cache
("after": its first run builds the cache, the second reuses it; then the default settings, with
the data check that reads a file's first 100k rows), and against `data.streaming` (with a
1000-row validation file, since a stream holds nothing out).

    python benchmarks/data_scale.py [--rows 100000,500000,2000000] [--steps 200] [--workers 1]
                                    [--modes "before;after, 1st run;..."]

Each run is its own process (a child of this script), so its peak RSS (ru_maxrss from wait4)
is its own. The model is a tiny random BERT built from a config (nothing downloads), so the
data path, not the model, is what grows with the file. Every run holds out the default 10% for
validation but scores only 1000 of those rows (data.max_eval_samples), and data.check is off
(its report reads the whole file into memory: see docs/data-at-scale.md). Time to first step
is from the child's start to the end of its first optimizer step. Prints a Markdown table and
appends the raw results to benchmarks/results/data_scale.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data_scale.jsonl"
POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy", "bright", "warm", "clever", "moving"]
NEGATIVE = ["bad", "awful", "poor", "dull", "grim", "sad", "dark", "cold", "clumsy", "boring"]
FILLER = ("the movie was very a film plot and it really so acting story scenes cast director music "
          "long short ending start middle character dialogue camera light sound script pace tone "
          "felt seemed looked became kept made gave took showed left quite rather too almost").split()  # fmt: skip
# each mode's own settings; the rest are the same for all (see main)
MODES = {
    "before": ["data.cache=false", "data.check=false"],
    "after, 1st run": ["data.cache=true", "data.check=false"],
    "after, 2nd run": ["data.cache=true", "data.check=false"],
    "after, data check on": ["data.cache=true", "data.check=true"],  # the defaults: the check reads 100k rows
    "streaming": ["data.streaming=true", "data.labels=[negative,positive]"],  # + a validation file
}


def write_model(folder: Path) -> Path:
    """A random 2-layer BERT (hidden 64) with a WordPiece vocabulary of the generated words."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + POSITIVE + NEGATIVE + FILLER
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128)  # fmt: skip
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(folder)
    return folder


def write_csv(path: Path, rows: int, seed: int = 0) -> Path:
    """Synthetic reviews (6 to 24 words; one sentiment word decides the label), two labels."""
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            label = "positive" if i % 2 else "negative"
            words = rng.choices(FILLER, k=rng.randint(5, 23))
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if i % 2 else NEGATIVE))
            writer.writerow([" ".join(words) + ".", label])
    return path


def child(spec_path: str) -> None:
    """One measured run (in this process): train, and note when the first optimizer step ended."""
    began = time.perf_counter()
    spec = json.loads(Path(spec_path).read_text())
    import tunelab.loop as loop

    first: list[float] = []
    step = loop.train_step

    def timed(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = step(*args, **kwargs)
        if not first:
            first.append(time.perf_counter() - began)
        return out

    loop.train_step = timed  # type: ignore[assignment]
    import tunelab

    run = tunelab.train(overrides=spec["overrides"], overwrite=True)
    report = json.loads((run.path / "eval.json").read_text())
    Path(spec["out"]).write_text(json.dumps({
        "first_step_s": round(first[0], 2), "wall_s": round(time.perf_counter() - began, 2),
        "samples_per_s": report["train"]["samples_per_s"], "steps": report["train"]["steps"],
        "accuracy": report["validation"]["accuracy"],
    }))  # fmt: skip


def measure(overrides: list[str], work: Path, env: dict[str, str]) -> dict:
    spec, out = work / "spec.json", work / "out.json"
    out.unlink(missing_ok=True)
    spec.write_text(json.dumps({"overrides": overrides, "out": str(out)}))
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    stderr = proc.stderr.read() if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"run failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(out.read_text())
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    result["reused"] = "cached tokens reused" in stderr
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="100000,500000,2000000")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1, help="data.num_workers of the cached runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default=";".join(MODES), help="';'-separated, of: " + "; ".join(MODES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    sizes = [int(n) for n in args.rows.split(",")]
    modes = [m.strip() for m in args.modes.split(";")]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        parser.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    results = []
    with tempfile.TemporaryDirectory(prefix="tunelab-data-scale-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "TUNELAB_CACHE_DIR": str(work / "cache"), "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        model = write_model(work / "model")
        validation = write_csv(work / "validation.csv", 1000, seed=1)  # streaming holds nothing out of train
        for rows in sizes:
            data = write_csv(work / f"train-{rows}.csv", rows)
            size_mb = data.stat().st_size / 2**20
            for mode in modes:
                own = MODES[mode] + ([f"data.validation={validation}"] if mode == "streaming" else [])
                overrides = [f"model={model}", "task=classification", "method=full", f"data.train={data}",
                             *own, f"data.num_workers={args.workers}",
                             "data.max_eval_samples=1000", "data.max_length=64", f"train.max_steps={args.steps}",
                             "train.batch_size=32", "train.progress_bar=false", "train.precision=fp32",
                             f"train.num_threads={args.threads}", f"output_dir={work / 'run'}"]  # fmt: skip
                result = {
                    "rows": rows,
                    "file_mb": round(size_mb, 1),
                    "mode": mode,
                    **measure(overrides, work, env),
                }
                print(json.dumps(result), flush=True)
                results.append(result)
    machine = {"cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
               "threads": args.threads, "workers": args.workers, "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        for result in results:
            f.write(json.dumps({**result, **machine}) + "\n")
    print("\n| rows | mode | time to first step (s) | peak RSS (MB) | samples/s |")
    print("| ---: | --- | ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['rows']:,} | {r['mode']} | {r['first_step_s']:.1f} | {r['peak_rss_mb']:,.0f} | "
              f"{r['samples_per_s']:,.0f} |")  # fmt: skip
    for mode in modes:
        by_rows = {r["rows"]: r["peak_rss_mb"] for r in results if r["mode"] == mode}
        if min(sizes) in by_rows and max(sizes) in by_rows and len(sizes) > 1:
            ratio = by_rows[max(sizes)] / by_rows[min(sizes)]
            print(f"\npeak RSS {max(sizes):,} / {min(sizes):,} rows, {mode}: {ratio:.2f}x", end="")
    print()


if __name__ == "__main__":
    main()
