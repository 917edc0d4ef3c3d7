"""Calibrate the memory plan's model (tunelab/memory.py) on SmolLM2-135M LoRA SFT: for a few
settings of gradient checkpointing and micro-batch budget, a fresh process measures the plan's
footprint (the process now, optimizer state, saved tensors per token), trains one epoch as a
planned run does (every batch shape the data has, the freed memory handed back after each step),
ends with the validation pass as training does, and reports its peak RSS. The micro-batch budget is a share of the largest batch, in whole rows
of the longest example. A least-squares line through

    peak - now - state = OVERHEAD_MB + ACTIVATION_FACTOR x saved(tokens)

gives the two constants; the table shows each setting's measured peak against the prediction
with the constants in tunelab/memory.py.

    python benchmarks/memory_calibration.py [--n-train 512] [--precision auto|bf16|fp32]

Memory-heavy (up to ~3.5 GB), one epoch per setting (about 2 minutes each on 2 cores): run it alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from classification_vs_hf import ROOT, fastest_precision  # noqa: E402
from sft_vs_hf import prepare, tunelab_overrides  # noqa: E402

# (gradient checkpointing, micro-batch budget as a share of the largest batch)
SETTINGS = [(False, 1.0), (True, 1.0), (False, 0.5), (False, 0.25), (True, 0.25)]


def child(overrides: list[str], checkpointing: bool, share: float) -> dict:
    """In a fresh process: the footprint, then 2 steps on the longest rows; the figures."""
    import torch

    from tunelab import memory
    from tunelab.config import load_config
    from tunelab.device import peak_rss_mb, resolve_precision
    from tunelab.loop import fit
    from tunelab.methods import METHODS
    from tunelab.run import build_model, load_inputs, process_settings

    config = load_config(overrides=overrides)
    with process_settings(config):
        model_path, tokenizer, task, splits = load_inputs(config)
        model = build_model(config, task, METHODS[config.method], model_path, tokenizer)
        device = torch.device("cpu")
        dtype = resolve_precision(config.train.precision, device)
        found = memory.footprint(
            model, task, splits.train, config, tokenizer.pad_token_id, device, dtype, True
        )
        tokens, row = memory.longest_batch(task, splits.train, config)
        budget = max(row, int(share * tokens) // row * row)
        memory.set_checkpointing(model, checkpointing)
        fit(model, task, splits.train, splits.validation, config, config.train.learning_rate or 2e-4,
            tokenizer.pad_token_id, lambda entry: None, device,
            micro_batch_tokens=budget if budget < tokens else None, trim_memory=True)  # fmt: skip
        micro = min(budget, tokens)
        return {"checkpointing": checkpointing, "micro_tokens": micro, "largest_batch": tokens,
                "released_mb": found.released_mb,
                "now_mb": found.now_mb, "state_mb": found.state_mb,
                "saved_mb": (found.checkpointed_mb if checkpointing else found.saved_mb)
                + micro * (found.checkpointed_per_token_mb if checkpointing else found.saved_per_token_mb),
                "predicted_mb": found.peak(micro, checkpointing), "peak_rss_mb": peak_rss_mb()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec["overrides"], spec["checkpointing"], spec["share"])))
        return
    precision = fastest_precision(args.precision)
    points = []
    with tempfile.TemporaryDirectory(prefix="tunelab-memory-calibration-") as tmp:
        work, _ = prepare(args.n_train, "sst2", Path(tmp))
        overrides = [
            o for o in tunelab_overrides(work, precision) if not o.startswith("train.memory_limit_mb")
        ]
        for checkpointing, share in SETTINGS:
            spec = json.dumps({"overrides": overrides, "checkpointing": checkpointing, "share": share})
            done = subprocess.run([sys.executable, __file__, "--child", spec], check=True, capture_output=True,
                                  text=True, cwd=ROOT)  # fmt: skip
            points.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(points[-1]), flush=True)
    xs = [p["saved_mb"] for p in points]
    ys = [p["peak_rss_mb"] - p["now_mb"] - p["state_mb"] for p in points]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    factor = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    print(f"\nSmolLM2-135M LoRA SFT ({precision}): fitted ACTIVATION_FACTOR {factor:.2f}, OVERHEAD_MB "
          f"{my - factor * mx:.0f} ({n} settings)\n")  # fmt: skip
    print(
        "| checkpointing | micro-batch tokens (largest batch) | saved MB | predicted MB | measured peak MB | error |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for p in points:
        print(f"| {'on' if p['checkpointing'] else 'off'} | {p['micro_tokens']:,} ({p['largest_batch']:,}) | "
              f"{p['saved_mb']:.0f} | {p['predicted_mb']:.0f} | {p['peak_rss_mb']:.0f} | "
              f"{p['predicted_mb'] / p['peak_rss_mb'] - 1:+.0%} |")  # fmt: skip


if __name__ == "__main__":
    main()
