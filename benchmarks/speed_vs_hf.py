#!/usr/bin/env python
"""The three speed workloads against the Hugging Face peer (../shared/bench), in one
invocation, each tool in its own process (so peak RSS is each one's own), alternating:

  1. minilm-l6 on 4096 SST-2 rows, 1 epoch, full fine-tuning and LoRA (peer: hf_cls.py)
  2. smollm2-135m LoRA SFT on the peer's 512 instruction pairs, 1 epoch (peer: hf_clm.py)
  3. freeze (top 2 layers train) on the same 4096 SST-2 rows over 3 epochs (peer: hf_cls.py)

    python benchmarks/speed_vs_hf.py [--workloads 1,2,3] [--repeats 1] [--no-estimate] [--precision auto]

Same model, rows, epochs, batch size, maximum length and precision for both; the peer runs in
its fastest configuration on this CPU (`group_by_length` for the classifiers, and bf16
autocast where bf16 matrix products are faster here than float32: `--precision auto`, the
choice tunelab's own `train.precision=auto` makes). MFU is over this machine's matmul ceiling
in that precision, measured at the start with the peer's peak_flops.py. LoRA runs train the
peer's adapter (its rank, alpha, dropout and target layers) and `freeze` the same top 2
layers; learning rates, which change no work, are each tool's own. Before each tunelab run,
`tunelab estimate` predicts its time and peak memory, and the table reports how far off it was.
Prints one Markdown table and appends the raw results to benchmarks/results/speed_vs_hf.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import classification_vs_hf as cls  # noqa: E402
import sft_vs_hf as sft  # noqa: E402

ROOT = cls.ROOT


def estimate(overrides: list[str], method: str) -> dict:
    """`tunelab estimate` for the run about to be measured: predicted seconds and peak RSS."""
    out = subprocess.run([sys.executable, "-m", "tunelab", "estimate", *overrides, "--methods", method, "--json"],
                         check=True, capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    row = json.loads(out.stdout)["methods"][0]
    return {"epoch_s": row["epoch_s"], "setup_s": row.get("setup_s") or 0.0, "rss_mb": row["peak_rss_mb"]}


def predicted_train_s(guess: dict, epochs: float) -> float:
    """The estimate's first epoch includes one-time set-up; later epochs do not."""
    return guess["epoch_s"] + (epochs - 1) * (guess["epoch_s"] - guess["setup_s"])


def classification(
    method: str, epochs: float, args: argparse.Namespace, data: Path, mm: int, peak: float
) -> dict:
    options = argparse.Namespace(
        n_train=4096, epochs=epochs, batch_size=32, max_len=128, precision=args.precision
    )
    results: dict[str, list[dict]] = {"peer": [], "tunelab": []}
    for _ in range(args.repeats):
        results["peer"].append(cls.run_peer(method, options, data / "peer.json", peak))
        guess = None if args.no_estimate else estimate(cls.tunelab_overrides(method, options, data), method)
        ours = cls.run_tunelab(method, options, data, data / "run", mm, peak)
        if guess:
            ours["estimate_s"], ours["estimate_rss_mb"] = predicted_train_s(guess, epochs), guess["rss_mb"]
        results["tunelab"].append(ours)
        print(
            json.dumps({"method": method, "epochs": epochs, **{k: v[-1] for k, v in results.items()}}),
            flush=True,
        )
    return {tool: mean(rs) for tool, rs in results.items()}


def sft_workload(args: argparse.Namespace, peak: float, folder: Path) -> dict:
    work, model = sft.prepare(512, "sst2", folder)
    results: dict[str, list[dict]] = {"peer": [], "tunelab": []}
    for _ in range(args.repeats):
        r = sft.run_peer(work, model, 512, "sst2", args.precision)
        results["peer"].append({"samples_per_s": r["train_samples_per_s"], "tokens_per_s": r["real_tokens_per_s"],
                                "padding": r["pad_frac"], "rss_mb": r["peak_rss_train_mb"], "loss": r["eval_loss"],
                                "mfu": r["model_gflops_matmul"] / peak})  # fmt: skip
        guess = None if args.no_estimate else estimate(sft.tunelab_overrides(work, args.precision), "lora")
        report = sft.run_tunelab(work, args.precision)
        t = report["train"]
        # the peer's FLOP formula: 4 x parameters in matrix products (all of SmolLM2's, the tied head included)
        ours = {"samples_per_s": t["samples_per_s"], "tokens_per_s": t["tokens_per_s"],
                "padding": t["padding_fraction"], "rss_mb": t["peak_rss_mb"], "loss": report["validation"]["loss"],
                "mfu": 4 * t["total_params"] * t["tokens_per_s"] / 1e9 / peak,
                "train_s": t["runtime_s"] - t["eval_s"]}  # fmt: skip
        if guess:
            ours["estimate_s"], ours["estimate_rss_mb"] = predicted_train_s(guess, 1), guess["rss_mb"]
        results["tunelab"].append(ours)
        print(json.dumps({"workload": "sft", **{k: v[-1] for k, v in results.items()}}), flush=True)
    return {tool: mean(rs) for tool, rs in results.items()}


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mean(runs: list[dict]) -> dict:
    return {k: statistics.mean(r[k] for r in runs) for k in runs[0]}


def row(name: str, metric: str, p: dict, t: dict, key: str) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.1f}%"

    estimate = ""
    if "estimate_s" in t:
        estimate = (f"{t['estimate_s']:.0f} s / {t['train_s']:.0f} s ({100 * (t['estimate_s'] / t['train_s'] - 1):+.0f}%); "
                    f"{t['estimate_rss_mb']:.0f} / {t['rss_mb']:.0f} MB "
                    f"({100 * (t['estimate_rss_mb'] / t['rss_mb'] - 1):+.0f}%)")  # fmt: skip
    return (f"| {name} | {p['samples_per_s']:.1f} / {t['samples_per_s']:.1f} | "
            f"**{t['samples_per_s'] / p['samples_per_s']:.2f}x** | {p['tokens_per_s']:.0f} / {t['tokens_per_s']:.0f} "
            f"(**{t['tokens_per_s'] / p['tokens_per_s']:.2f}x**) | {p['padding']:.2f} / {t['padding']:.2f} | "
            f"{pct(p['mfu'])} / {pct(t['mfu'])} | {p['rss_mb']:.0f} / {t['rss_mb']:.0f} | "
            f"{metric} {p[key]:.4f} / {t[key]:.4f} | {estimate} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default="1,2,3")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-estimate", action="store_true", help="skip `tunelab estimate` before each run")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="for both tools; auto: the faster on this CPU")  # fmt: skip
    args = parser.parse_args()
    workloads = set(args.workloads.split(","))
    args.precision = cls.fastest_precision(args.precision)
    peak = cls.ceiling(args.precision)
    began = time.perf_counter()
    rows, raw = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        cls.write_tsv(data / "train.tsv", cls.peer_rows(4096))
        with open(cls.SST2 / "validation.tsv", newline="") as f:
            validation = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:201]
        cls.write_tsv(data / "validation.tsv", [(s, int(label)) for s, label in validation])
        mm = cls.matmul_params() if workloads & {"1", "3"} else 0
        if "1" in workloads:
            for method in ("full", "lora"):
                raw[f"1-{method}"] = r = classification(method, 1, args, data, mm, peak)
                rows.append(
                    row(f"1. minilm-l6 SST-2 {method}, 1 epoch", "acc", r["peer"], r["tunelab"], "accuracy")
                )
        if "2" in workloads:
            raw["2-sft"] = r = sft_workload(args, peak, data / "sft")
            rows.append(row("2. smollm2-135m LoRA SFT, 512 pairs", "loss", r["peer"], r["tunelab"], "loss"))
        if "3" in workloads:
            raw["3-freeze"] = r = classification("freeze", 3, args, data, mm, peak)
            rows.append(
                row("3. minilm-l6 SST-2 freeze, 3 epochs", "acc", r["peer"], r["tunelab"], "accuracy")
            )
    print(f"\n{args.repeats} run(s) of each tool per workload, alternating; {args.precision} "
          f"(matmul ceiling here {peak:.0f} GFLOP/s); {cpu_name()}; "
          f"{(time.perf_counter() - began) / 60:.0f} min in all\n")  # fmt: skip
    print("| workload | samples/s (peer / tunelab) | ratio | real tokens/s | padding | MFU (measured ceiling) | "
          "peak RSS MB | test metric | tunelab estimate: time; memory (predicted / measured) |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    with open(results / "speed_vs_hf.jsonl", "a") as f:
        f.write(json.dumps({"repeats": args.repeats, "precision": args.precision, "ceiling_gflops": peak,
                            "cpu": cpu_name(), "results": raw}) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
