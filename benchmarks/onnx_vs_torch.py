#!/usr/bin/env python
"""`tunelab export --onnx --int8` against the PyTorch model it came from: minilm-l6 fine-tuned on
SST-2 (full and LoRA), exported, then PyTorch, ONNX float32 and ONNX int8 timed side by side in
this one process on the same rows with the same threads.

    python benchmarks/onnx_vs_torch.py                       # trains full + lora (2000 rows, 1 epoch), ~5 min
    python benchmarks/onnx_vs_torch.py --runs runs/a runs/b  # existing minilm-l6 SST-2 runs instead

Each run is trained (a child process), exported with `tunelab export RUN --onnx --int8` (a child
process; its export.json holds the accuracy check on the 872-row test set), then timed here:
batch-1 latency over `--rows` single test rows and batch-32 latency over batches of 32, each
figure the median of `--repeats` rounds, the three models taking turns within a round. Prints a
Markdown table with the ratios; appends a JSON line to benchmarks/results/onnx_vs_torch.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "sst2"
RESULTS = ROOT / "benchmarks" / "results" / "onnx_vs_torch.jsonl"


def write_tsv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    return path


def read_tsv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]


def tunelab(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "tunelab", *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"tunelab {args[0]} failed:\n{done.stderr[-3000:]}")
    return done.stderr


def train(method: str, data: Path, out: Path, epochs: float) -> Path:
    tunelab("train", "model=minilm-l6", f"method={method}", f"data.train={data / 'train.tsv'}",
            f"data.validation={data / 'validation.tsv'}", f"data.test={SST2 / 'test.tsv'}",
            "data.text_column=sentence", f"train.epochs={epochs}", "train.progress_bar=false",
            f"output_dir={out}", "--overwrite")  # fmt: skip
    return out


def measure(run_dir: Path, export_dir: Path, rows: int, repeats: int) -> dict:
    """Latency of the run's merged PyTorch model and both ONNX graphs, timed here side by side."""
    import torch

    from tunelab import onnx_export
    from tunelab.methods import METHODS
    from tunelab.onnx_model import INT8_FILE, ONNX_FILE, load_onnx
    from tunelab.run import Run

    run = Run.load(run_dir)
    run.model.to("cpu").float()
    merged = METHODS[run.config.method].merge(copy.deepcopy(run.model)).eval()
    _, _, examples = onnx_export.held_out(run)
    onnx_export.BATCH_1_ROWS, onnx_export.BATCH_32_BATCHES, onnx_export.REPEATS = rows, 8, repeats
    calls = {"pytorch": merged, "onnx": load_onnx(export_dir, ONNX_FILE).model,
             "int8": load_onnx(export_dir, INT8_FILE).model}  # fmt: skip
    start = time.perf_counter()
    figures = onnx_export.latency(calls, run.task, examples, run.tokenizer.pad_token_id)
    return {
        "latency_ms": figures,
        "threads": torch.get_num_threads(),
        "timing_s": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--runs", nargs="*", help="existing minilm-l6 SST-2 run folders (skips training)")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--rows", type=int, default=200, help="test rows timed one at a time")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        train_rows = read_tsv(SST2 / "train.tsv")
        write_tsv(data / "train.tsv", random.Random(0).sample(train_rows, args.n_train))
        write_tsv(data / "validation.tsv", read_tsv(SST2 / "validation.tsv")[:500])
        runs = [Path(r) for r in args.runs] if args.runs else [
            train(m, data, data / f"run-{m}", args.epochs) for m in args.methods.split(",")]  # fmt: skip
        for run_dir in runs:
            out = data / f"{run_dir.name}-onnx"
            start = time.perf_counter()
            print(tunelab("export", str(run_dir), "--onnx", "--int8", "--out", str(out)).strip(), flush=True)
            export_s = time.perf_counter() - start
            report = json.loads((out / "export.json").read_text())
            timing = measure(run_dir, out, args.rows, args.repeats)
            results.append({"run": run_dir.name, "method": report["method"], "export_s": round(export_s, 1),
                            "run_accuracy": report["run_metric_value"], "check": report["models"], **timing})  # fmt: skip
    with open(RESULTS, "a") as f:
        f.write(json.dumps({"cpu": platform.processor() or platform.machine(), "n_train": args.n_train,
                            "epochs": args.epochs, "rows": args.rows, "repeats": args.repeats,
                            "results": results}) + "\n")  # fmt: skip
    print(f"\nminilm-l6, SST-2 {args.n_train} rows x {args.epochs:g} epoch; test accuracy on 872 rows; "
          f"latency: median ms per call, {results[0]['threads']} threads, batch-1 over {args.rows} rows\n")  # fmt: skip
    print("| method | test accuracy: run / PyTorch / ONNX / int8 | int8 labels = PyTorch's | "
          "batch-1 ms: PyTorch / ONNX / int8 | batch-1 speed-up ONNX / int8 | batch-32 ms: PyTorch / ONNX / int8 | "
          "batch-32 speed-up ONNX / int8 | size MB: PyTorch / int8 |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        c, lat = r["check"], r["latency_ms"]
        ratio = {
            k: [lat["pytorch"][k] / lat[m][k] for m in ("onnx", "int8")] for k in ("batch_1", "batch_32")
        }
        print(f"| {r['method']} | {r['run_accuracy']:.4f} / {c['pytorch']['metric_value']:.4f} / "
              f"{c['onnx']['metric_value']:.4f} / {c['int8']['metric_value']:.4f} | {c['int8']['label_agreement']:.1%} | "
              f"{lat['pytorch']['batch_1']:.2f} / {lat['onnx']['batch_1']:.2f} / {lat['int8']['batch_1']:.2f} | "
              f"**{ratio['batch_1'][0]:.2f}x / {ratio['batch_1'][1]:.2f}x** | "
              f"{lat['pytorch']['batch_32']:.1f} / {lat['onnx']['batch_32']:.1f} / {lat['int8']['batch_32']:.1f} | "
              f"{ratio['batch_32'][0]:.2f}x / {ratio['batch_32'][1]:.2f}x | "
              f"{c['pytorch']['size_mb']:.1f} / {c['int8']['size_mb']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
