#!/usr/bin/env python
"""Does `torch.compile` pay for tunelab's training loop on this CPU? One epoch of minilm-l6
full fine-tuning on the peer's SST-2 rows (batch 32, bf16), trained by tunelab's own loop
(`loop.fit`) three ways, one after another in one process:

  - eager with tunelab's CPU kernels (`train.fast_kernels`, the default),
  - eager without them (the model's own code),
  - `torch.compile(model)` of the model's own code (inductor; it recompiles as batch shapes
    change, then compiles a dynamic-shape graph).

    python benchmarks/compile_vs_eager.py [--n-train 1024] [--method full]

Prints wall time of the epoch (compilation included, as a user waits for it) and samples/s,
and appends them to benchmarks/results/compile_vs_eager.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import classification_vs_hf as cls  # noqa: E402


def epoch(method: str, train: Path, fast: bool, compiled: bool) -> dict:
    import torch

    from tunelab.config import load_config
    from tunelab.loop import fit
    from tunelab.methods import METHODS
    from tunelab.run import build_model, load_inputs

    config = load_config(None, [f"method={method}", "model=minilm-l6", f"data.train={train}",
                                "data.text_column=sentence", "data.max_length=128", "train.batch_size=32",
                                "train.precision=bf16", "train.progress_bar=false", "train.epochs=1",
                                f"train.fast_kernels={str(fast).lower()}"])  # fmt: skip
    path, tokenizer, task, splits = load_inputs(config)
    model = build_model(config, task, METHODS[method], path, tokenizer)
    if compiled:
        model = torch.compile(model)
    lr = METHODS[method].DEFAULT_LR
    began = time.perf_counter()
    result = fit(model, task, splits.train, [], config, lr, tokenizer.pad_token_id, lambda e: None,
                 torch.device("cpu"))  # fmt: skip
    wall = time.perf_counter() - began
    return {"wall_s": round(wall, 2), "samples_per_s": round(result.samples / wall, 1), "steps": result.steps}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-train", type=int, default=1024)
    parser.add_argument("--method", default="full")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        train = Path(tmp) / "train.tsv"
        cls.write_tsv(train, cls.peer_rows(args.n_train))
        results = {}
        for name, fast, compiled in (("eager, tunelab kernels", True, False),
                                     ("eager, model's own code", False, False),
                                     ("torch.compile, model's own code", False, True)):  # fmt: skip
            results[name] = r = epoch(args.method, train, fast, compiled)
            print(json.dumps({name: r}), flush=True)
    base = results["eager, tunelab kernels"]["wall_s"]
    print(f"\nminilm-l6 {args.method}, {args.n_train} SST-2 rows x 1 epoch, batch 32, bf16\n")
    print("| run | epoch wall s (compilation included) | samples/s | vs tunelab eager |")
    print("| --- | --- | --- | --- |")
    for name, r in results.items():
        print(f"| {name} | {r['wall_s']:.1f} | {r['samples_per_s']:.1f} | {base / r['wall_s']:.2f}x |")
    out = Path(__file__).resolve().parent / "results" / "compile_vs_eager.jsonl"
    with open(out, "a") as f:
        f.write(json.dumps({"method": args.method, "n_train": args.n_train, "results": results}) + "\n")


if __name__ == "__main__":
    main()
