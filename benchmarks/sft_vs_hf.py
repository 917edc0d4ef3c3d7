"""tunelab against the Hugging Face peer (Trainer + PEFT, ../shared/bench/hf_clm.py) on the same
LoRA SFT work: the built-in SmolLM2 on the peer's own instruction pairs (the same training
rows, held-out rows, epochs, batch 8, maximum length 256, precision), each in its own process.

    python benchmarks/sft_vs_hf.py [--n-train 512] [--data sst2|mix] [--precision auto|bf16|fp32]
                                   [--memory-limit peer|auto|MB]

`--precision auto` (the default) runs both in bf16 where bf16 matrix products are faster on
this CPU than float32, else in float32.

Both train the same adapter, the peer's (r 8, alpha 16, dropout 0.05 on q/k/v/o: `PEER_LORA`);
the learning rates, which change no work, are each tool's own defaults. Prints one Markdown table: training samples/s, real (non-padding)
tokens/s, padding, peak RSS, held-out loss, and the tunelab/peer ratios.

Memory: `--memory-limit peer` (the default) runs the peer first and gives tunelab
`train.memory_limit_mb` = 0.6 x the peer's training peak RSS, so its memory plan (gradient
checkpointing, token-budget micro-batches: docs/training.md#memory) has to fit what the bar
asks; the plan's line is printed, and the last lines check the bar: peak RSS <= 0.6x the
peer's with real tokens/s >= 1.5x. `auto` leaves tunelab's own default (a share of the
machine's available memory), a number sets the limit in MB.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from classification_vs_hf import BENCH, ROOT, fastest_precision, in_child  # noqa: E402


def prepare(n_train: int, data: str, work: Path) -> tuple[Path, str]:
    """The peer's own pairs as tunelab chat files (train.jsonl, held.jsonl) in `work` (made
    here; the caller removes it)."""
    # the converted safetensors folder, which the peer reads too (converted once, in a child)
    model = in_child(
        "from tunelab.models import resolve_model; print(resolve_model('smollm2-135m'))"
    ).split()[-1]
    work.mkdir(parents=True, exist_ok=True)
    pairs = work / "pairs.jsonl"
    subprocess.run([sys.executable, str(BENCH / "hf_clm.py"), "--data", data, "--model", model,
                    "--dump-data", str(pairs), "--dump-only"], check=True, cwd=BENCH, capture_output=True)  # fmt: skip
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]

    def chat(r: dict) -> str:
        return json.dumps({"messages": [{"role": "user", "content": r["prompt"]},
                                        {"role": "assistant", "content": r["response"]}]})  # fmt: skip

    train = [r for r in rows if r["split"] == "train_pool"][:n_train]
    held = [r for r in rows if r["split"] == "heldout"]
    (work / "train.jsonl").write_text("".join(chat(r) + "\n" for r in train))
    (work / "held.jsonl").write_text("".join(chat(r) + "\n" for r in held))
    return work, model


def run_peer(work: Path, model: str, n_train: int, data: str, precision: str) -> dict:
    peer_out = work / "peer.json"
    subprocess.run([sys.executable, str(BENCH / "hf_clm.py"), "--method", "lora", "--data", data, "--n-train",
                    str(n_train), "--max-len", "256", "--model", model, "--out", str(peer_out)]
                   + (["--bf16"] if precision == "bf16" else []), check=True, cwd=BENCH, capture_output=True)  # fmt: skip
    return json.loads(peer_out.read_text())


RSS_BAR, SPEED_BAR = (
    0.6,
    1.5,
)  # the bar: peak RSS at most 0.6x the peer's, real tokens/s at least 1.5x

# the adapter hf_clm.py builds (LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=[...]))
PEER_LORA = [
    "lora.rank=8",
    "lora.alpha=16",
    "lora.dropout=0.05",
    "lora.target_modules=[q_proj,k_proj,v_proj,o_proj]",
]


def tunelab_overrides(work: Path, precision: str, memory_limit: str = "auto") -> list[str]:
    return [f"train.memory_limit_mb={memory_limit}", *PEER_LORA, "model=smollm2-135m", "task=causal-lm", "method=lora", f"data.train={work / 'train.jsonl'}",
            f"data.validation={work / 'held.jsonl'}", "train.epochs=1", "train.batch_size=8", "data.max_length=256",
            f"train.precision={precision}", "train.eval_each_epoch=false", "generation.eval_samples=0",
            "generation.compare_base=false", "train.progress_bar=false"]  # fmt: skip


def run_tunelab(work: Path, precision: str, memory_limit: str = "auto") -> dict:
    """tunelab's eval.json, with env.json's memory plan under "memory"."""
    run = work / "tunelab-run"
    subprocess.run([sys.executable, "-m", "tunelab", "train", *tunelab_overrides(work, precision, memory_limit),
                    f"output_dir={run}", "--overwrite"], check=True, capture_output=True, cwd=ROOT)  # fmt: skip
    report = json.loads((run / "eval.json").read_text())
    return {**report, "memory": json.loads((run / "env.json").read_text()).get("memory")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--data", default="sst2", choices=["sst2", "mix"])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--memory-limit", default="peer",
                        help="tunelab's train.memory_limit_mb: peer (0.6x the peer's peak RSS), auto, or MB")  # fmt: skip
    args = parser.parse_args()
    precision = fastest_precision(args.precision)
    with tempfile.TemporaryDirectory(prefix="tunelab-sft-bench-") as tmp:
        work, model = prepare(args.n_train, args.data, Path(tmp))
        train = (work / "train.jsonl").read_text().splitlines()
        peer = run_peer(work, model, args.n_train, args.data, precision)
        limit = args.memory_limit
        if limit == "peer":
            limit = str(int(RSS_BAR * peer["peak_rss_train_mb"]))
        report = run_tunelab(work, precision, limit)
    ours = report["train"]
    rows_out = [
        ("samples/s", peer["train_samples_per_s"], ours["samples_per_s"]),
        ("real tokens/s", peer["real_tokens_per_s"], ours["tokens_per_s"]),
        ("padding", peer["pad_frac"], ours["padding_fraction"]),
        ("peak RSS MB (training)", peer["peak_rss_train_mb"], ours["peak_rss_mb"]),
        ("held-out loss", peer["eval_loss"], round(report["validation"]["loss"], 4)),
        ("trainable params", peer["trainable_params"], ours["trainable_params"]),
    ]
    print(
        f"\nSmolLM2-135M LoRA SFT, {len(train)} rows ({args.data}), 1 epoch, batch 8, max length 256, {precision}"
    )
    print("| measure | HF peer | tunelab | tunelab / peer |\n| --- | --- | --- | --- |")
    for name, a, b in rows_out:
        print(f"| {name} | {a} | {b} | {b / a:.2f}x |" if a else f"| {name} | {a} | {b} | |")
    plan = report.get("memory") or {}
    print(f"\ntunelab, train.memory_limit_mb={limit}: {plan.get('line', '(no plan recorded)')}")
    rss, speed = (
        ours["peak_rss_mb"] / peer["peak_rss_train_mb"],
        ours["tokens_per_s"] / peer["real_tokens_per_s"],
    )
    print(f"bar: peak RSS {rss:.2f}x the peer's (<= {RSS_BAR}x: {'met' if rss <= RSS_BAR else 'NOT met'}); "
          f"real tokens/s {speed:.2f}x (>= {SPEED_BAR}x: {'met' if speed >= SPEED_BAR else 'NOT met'})")  # fmt: skip
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    with open(results / "sft_vs_hf.jsonl", "a") as f:
        f.write(
            json.dumps(
                {
                    "data": args.data,
                    "n_train": len(train),
                    "memory_limit": limit,
                    "peer": peer,
                    "tunelab": report,
                }
            )
            + "\n"  # fmt: skip
        )


if __name__ == "__main__":
    main()
