"""Instruction tuning of the built-in SmolLM2 with LoRA on an Alpaca file, scored on held-out rows
against the un-tuned model: one `tunelab train` and one `tunelab eval`, as a user runs them.

    python benchmarks/instruction_sft.py --data ../shared/data/instruct/alpaca_en_demo.json
    python benchmarks/instruction_sft.py --data ../shared/data/instruct/alpaca_zh_demo.json \\
        --max-train 300 --ask "请给出三个保持健康的建议。"

The file is split (seeded) into a training file and `--held-out` rows; the run trains for one
epoch with the defaults. Prints the held-out table (loss, perplexity, BLEU, ROUGE, exact match,
tuned vs un-tuned), an answer to `--ask`, and appends everything to
benchmarks/results/instruction_sft.jsonl.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--held-out", type=int, default=100)
    parser.add_argument("--max-train", type=int, default=None, help="use at most this many training rows")
    parser.add_argument("--method", default="lora")
    parser.add_argument("--ask", default="Give three tips for staying healthy.")
    parser.add_argument("--out", default=None, help="run directory (default runs/sft-<file>)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--reuse", action="store_true", help="keep a finished run at --out; only evaluate it")
    args = parser.parse_args()

    rows = json.loads(Path(args.data).read_text())
    random.Random(args.seed).shuffle(rows)
    work = Path(tempfile.mkdtemp(prefix="tunelab-sft-"))
    train, held = work / "train.json", work / "held_out.json"
    train.write_text(json.dumps(rows[args.held_out :], ensure_ascii=False))
    held.write_text(json.dumps(rows[: args.held_out], ensure_ascii=False))
    out = Path(args.out or f"runs/sft-{Path(args.data).stem}")
    tunelab = [sys.executable, "-m", "tunelab"]
    command = [*tunelab, "train", "model=smollm2-135m", "task=causal-lm", f"method={args.method}",
               f"data.train={train}", "train.epochs=1", "generation.eval_samples=0", f"seed={args.seed}",
               f"output_dir={out}", "--overwrite"]  # fmt: skip
    if args.max_train:
        command.append(f"data.max_train_samples={args.max_train}")
    began = time.perf_counter()
    if not (args.reuse and (out / "eval.json").is_file()):
        subprocess.run(command, check=True)
    train_s = time.perf_counter() - began
    subprocess.run(
        [*tunelab, "eval", str(out), "--data", str(held), "--samples", str(args.held_out)], check=True
    )
    answer = subprocess.run(
        [*tunelab, "predict", str(out), args.ask], check=True, capture_output=True, text=True
    )
    metrics = json.loads((out / "eval-held_out.json").read_text())
    report = json.loads((out / "eval.json").read_text())
    print(f"\n{args.ask}\n-> {answer.stdout.strip()}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    with open(results / "instruction_sft.jsonl", "a") as f:
        f.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "data": Path(args.data).name,
                            "method": args.method, "train_rows": report["train"]["train_examples"],
                            "train_s": round(train_s, 1) if train_s > 5 else None, "train": report["train"], "held_out": metrics,
                            "ask": args.ask, "answer": answer.stdout.strip()}, ensure_ascii=False) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
