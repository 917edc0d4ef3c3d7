#!/usr/bin/env python
"""tunelab against the Hugging Face peer (Trainer + PEFT, ../shared/bench/hf_cls.py) on the
same classification work: minilm-l6 on the same SST-2 rows, epochs, batch size, maximum
length and precision, each in its own process (so peak RSS is each one's own), alternating.

    python benchmarks/classification_vs_hf.py [--methods full,lora] [--epochs 1] [--repeats 1]
    python benchmarks/classification_vs_hf.py --methods freeze --epochs 3

The peer runs in its best configuration on this CPU: `group_by_length`, and bf16 autocast
where bf16 matrix products are faster here than float32 (`--precision auto`). Both do
the same work: tunelab's LoRA takes the peer's adapter shape (r 8, alpha 16, dropout 0.1, on
query and value: `PEER_LORA`) and `freeze` trains the same top 2 layers; the learning rates
and schedules, which change no work, are each tool's own defaults. Prints one Markdown table:
training samples/s, real tokens/s, padding, model FLOP/s as a share of this machine's matmul
ceiling in that precision (measured at the start), peak RSS, test accuracy (872 rows), and
tunelab/peer ratios.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT.parent / "shared" / "bench"
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def peer_rows(n: int) -> list[tuple[str, int]]:
    """The exact training rows the peer uses (its own seeded shuffle of train.tsv)."""
    sys.path.insert(0, str(BENCH))
    import common  # the peer's helpers

    return common.sst2_train_subset(n, seed=0)


def write_tsv(path: Path, rows: list[tuple[str, int]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    return path


def fastest_precision(choice: str) -> str:
    """The precision both tools run in: `choice`, or for `auto` tunelab's own choice on this CPU
    (bf16 where its matrix products time faster than float32), which is the peer's faster
    configuration too: on a CPU where bf16 products ran at 0.55x float32, the peer's minilm-l6
    full fine-tuning ran at 138-177 samples/s in four float32 runs and 97 in a bf16 one."""
    if choice != "auto":
        return choice
    code = ("import torch; from tunelab.device import precision_name, resolve_precision; "
            "print(precision_name(resolve_precision('auto', torch.device('cpu'))))")  # fmt: skip
    return in_child(code).split()[-1]


def ceiling(precision: str) -> float:
    """This machine's matrix-product ceiling in GFLOP/s for `precision`, measured now by the
    peer's own script (peak_flops.py, best of 5 on 1024 and 2048 square products)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "peak.json"
        subprocess.run([sys.executable, str(BENCH / "peak_flops.py"), "--sizes", "1024,2048", "--out", str(out)],
                       check=True, capture_output=True, cwd=BENCH)  # fmt: skip
        return json.loads(out.read_text())[f"{precision}_peak"]


def run_peer(method: str, args: argparse.Namespace, out: Path, peak: float) -> dict:
    command = [sys.executable, str(BENCH / "hf_cls.py"), "--method", method, "--group-by-length",
               "--n-train", str(args.n_train), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--max-len", str(args.max_len), "--out", str(out)] + (["--bf16"] if args.precision == "bf16" else [])  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=BENCH)
    r = json.loads(out.read_text())
    return {"samples_per_s": r["train_samples_per_s"], "tokens_per_s": r["real_tokens_per_s"],
            "padding": r["pad_frac"], "rss_mb": r["peak_rss_train_mb"], "accuracy": r["test_acc"],
            "mfu": r["model_gflops_matmul"] / peak}  # fmt: skip


# the adapter hf_cls.py builds (LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=[...]))
PEER_LORA = ["lora.rank=8", "lora.alpha=16", "lora.dropout=0.1", "lora.target_modules=[query,value]"]


def tunelab_overrides(method: str, args: argparse.Namespace, data: Path) -> list[str]:
    same_work = PEER_LORA if method == "lora" else ["freeze.trainable_layers=2"] if method == "freeze" else []
    return [*same_work, "model=minilm-l6", f"method={method}", f"data.train={data / 'train.tsv'}",
            f"data.validation={data / 'validation.tsv'}", f"data.test={SST2 / 'test.tsv'}", "data.text_column=sentence",
            f"data.max_length={args.max_len}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
            f"train.precision={args.precision}", "train.eval_each_epoch=false", "train.progress_bar=false"]  # fmt: skip


def run_tunelab(
    method: str, args: argparse.Namespace, data: Path, out: Path, matmul_params: int, peak: float
) -> dict:
    command = [sys.executable, "-m", "tunelab", "train", *tunelab_overrides(method, args, data), f"output_dir={out}",
               "--overwrite"]  # fmt: skip
    subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT)
    report = json.loads((out / "eval.json").read_text())
    t = report["train"]
    k = 6 if method == "full" else 4  # forward + backward FLOPs per parameter and token
    return {"samples_per_s": t["samples_per_s"], "tokens_per_s": t["tokens_per_s"], "padding": t["padding_fraction"],
            "rss_mb": t["peak_rss_mb"], "accuracy": report["test"]["accuracy"],
            "mfu": k * matmul_params * t["tokens_per_s"] / 1e9 / peak,
            "train_s": t["runtime_s"] - t["eval_s"]}  # fmt: skip


def in_child(code: str) -> str:
    """Run Python `code` in a child process and return what it prints. The benchmarks load
    models only in children: Linux hands a parent's peak RSS on to the children it starts (as
    their `ru_maxrss`, which the peer reports), so the parent has to stay small."""
    return subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout


def matmul_params() -> int:
    """Parameters in per-token matrix products (the peer's definition): all but embedding tables."""
    return int(
        in_child("""
import torch
from transformers import AutoModelForSequenceClassification
from tunelab.models import quiet_transformers, resolve_model
quiet_transformers()
model = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm-l6"), num_labels=2)
print(sum(p.numel() for m in model.modules() if not isinstance(m, torch.nn.Embedding) for p in m.parameters(recurse=False)))
""")
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--n-train", type=int, default=4096)
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                        help="for both tools; auto: the faster on this CPU (see fastest_precision)")  # fmt: skip
    args = parser.parse_args()
    args.precision = fastest_precision(args.precision)
    peak = ceiling(args.precision)
    mm = matmul_params()
    rows: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_tsv(data / "train.tsv", peer_rows(args.n_train))
        with open(SST2 / "validation.tsv", newline="") as f:
            validation = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:201]
        write_tsv(data / "validation.tsv", [(s, int(label)) for s, label in validation])
        for method in args.methods.split(","):
            results: dict[str, list[dict]] = {"peer": [], "tunelab": []}
            for _ in range(args.repeats):  # alternate the two tools
                results["peer"].append(run_peer(method, args, data / "peer.json", peak))
                results["tunelab"].append(run_tunelab(method, args, data, data / "run", mm, peak))
                print(json.dumps({"method": method, **{k: v[-1] for k, v in results.items()}}), flush=True)
            mean = {
                tool: {k: statistics.mean(r[k] for r in rs) for k in rs[0]} for tool, rs in results.items()
            }
            p, t = mean["peer"], mean["tunelab"]
            rows.append(
                f"| {method} | {p['samples_per_s']:.1f} | {t['samples_per_s']:.1f} | "
                f"**{t['samples_per_s'] / p['samples_per_s']:.2f}x** | {p['tokens_per_s']:.0f} / {t['tokens_per_s']:.0f} | "
                f"{p['padding']:.2f} / {t['padding']:.2f} | {100 * p['mfu']:.1f}% / {100 * t['mfu']:.1f}% | "
                f"{p['rss_mb']:.0f} / {t['rss_mb']:.0f} | {p['accuracy']:.4f} / {t['accuracy']:.4f} |"
            )
    print(f"\nminilm-l6, SST-2 {args.n_train} rows x {args.epochs:g} epoch(s), batch {args.batch_size}, "
          f"max length {args.max_len}, {args.precision}, {args.repeats} run(s) each\n")  # fmt: skip
    print(
        "| method | peer samples/s | tunelab samples/s | ratio | real tokens/s (peer / tunelab) | padding | "
        "MFU (measured ceiling) | peak RSS MB | test accuracy |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
