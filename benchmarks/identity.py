"""The identity demo, measured: fine-tune the built-in SmolLM2 with examples/identity.yaml, then
ask 20 held-out paraphrased questions ("What should I call you?", "Who built you?" ...) and
count the answers that give the chosen name or maker, for the tuned and the un-tuned model.

    python benchmarks/identity.py [--out runs/identity-bench] [--name Pico --author "Northwind Labs"]

Prints one table and appends the figures to benchmarks/results/identity.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/identity-bench")
    parser.add_argument("--name", default="Pico")
    parser.add_argument("--author", default="Northwind Labs")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    import tunelab
    from tunelab.run import Run

    began = time.perf_counter()
    run = tunelab.train(ROOT / "examples" / "identity.yaml", overwrite=True, output_dir=args.out, seed=args.seed,
                        **{"data.train": str(ROOT / "examples" / "data" / "identity.json"),
                           "data.fill": {"name": args.name, "author": args.author}})  # fmt: skip
    train_s = time.perf_counter() - began
    questions = json.loads((ROOT / "examples" / "data" / "identity_heldout.json").read_text())
    wanted = {"name": args.name.lower(), "author": args.author.lower()}
    base = Run(run.path, run.config, run.task, run.task.base_model().eval(), run.tokenizer)
    rows, rates = [], {}
    for kind, model in (("tuned", run), ("un-tuned", base)):
        answers = model.predict([q["question"] for q in questions])
        hits = [wanted[q["expect"]] in a["generation"].lower() for q, a in zip(questions, answers)]
        rates[kind] = sum(hits) / len(hits)
        rows += [{"model": kind, "question": q["question"], "expect": q["expect"], "answer": a["generation"],
                  "hit": h} for q, a, h in zip(questions, answers, hits)]  # fmt: skip
    print(f"\n{'model':<10}{'held-out questions answered with the chosen name/maker':>58}")
    for kind, rate in rates.items():
        print(f"{kind:<10}{rate:>57.0%} ")
    print("\nsample answers (tuned):")
    for r in rows[:3] + rows[10:13]:
        print(f"  {r['question']} -> {r['answer'][:100]}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    with open(results / "identity.jsonl", "a") as f:
        f.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "seed": args.seed, "train_s": round(train_s, 1),
                            "rates": rates, "answers": rows}, ensure_ascii=False) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
