"""The identity demo as GGUF: train examples/identity.yaml (or take a finished run), export it with
`--gguf` at f16 and q8_0, then load the q8_0 file in llama-cpp-python from a process that cannot
import tunelab and ask the 20 held-out questions of examples/data/identity_heldout.json.

    python benchmarks/gguf_identity.py [--run runs/identity] [--out runs/identity-gguf]

Reports: the f16 export's check on the 20 questions (greedy tokens of llama.cpp against tunelab's,
the first 32 of each), the q8_0 export's check, and how many of the 20 questions the q8_0 file
answers with the chosen name (or maker, where the question asks who made it) in llama.cpp's own
chat completion (the file's chat template, greedy). Appends the figures to
benchmarks/results/gguf_identity.jsonl. Needs llama-cpp-python.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ROOT / "examples" / "data" / "identity_heldout.json"


def ask(gguf_file: str, name: str, author: str) -> None:
    """Answer the held-out questions with llama-cpp-python alone; prints the result as JSON."""
    sys.modules["tunelab"] = None  # type: ignore[assignment]  # importing tunelab now fails
    from llama_cpp import Llama

    llm = Llama(model_path=gguf_file, n_ctx=1024, verbose=False)
    wanted = {"name": name.lower(), "author": author.lower()}
    rows = []
    for q in json.loads(QUESTIONS.read_text()):
        reply = llm.create_chat_completion(messages=[{"role": "user", "content": q["question"]}],
                                           temperature=0.0, max_tokens=48)  # fmt: skip
        answer = reply["choices"][0]["message"]["content"] or ""
        rows.append({"question": q["question"], "answer": answer, "hit": wanted[q["expect"]] in answer.lower(),
                     "says_name": wanted["name"] in answer.lower()})  # fmt: skip
    print(json.dumps({"hits": sum(r["hit"] for r in rows), "says_name": sum(r["says_name"] for r in rows),
                      "questions": len(rows), "answers": rows}))  # fmt: skip


def export(run: Path, out: Path, quant: str) -> dict:
    """Export through tunelab's Python API, checking on the 20 held-out questions."""
    import tunelab
    from tunelab.gguf_export import export_gguf

    loaded = tunelab.load(run)
    prompts = [
        loaded.task.prompt_for(q["question"], loaded.tokenizer) for q in json.loads(QUESTIONS.read_text())
    ]
    return export_gguf(run, out, quant, say=print, prompts=prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", help="a finished identity run (default: train examples/identity.yaml)")
    parser.add_argument("--out", default="runs/identity-gguf", help="folder for the run and the exports")
    parser.add_argument("--name", default="Pico")
    parser.add_argument("--author", default="Northwind Labs")
    parser.add_argument("--ask", help=argparse.SUPPRESS)  # internal: the tunelab-free question round
    args = parser.parse_args()
    if args.ask:
        ask(args.ask, args.name, args.author)
        return

    import shutil

    import tunelab

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    began = time.perf_counter()
    run = Path(args.run) if args.run else tunelab.train(
        ROOT / "examples" / "identity.yaml", overwrite=True, output_dir=str(out / "identity"),
        **{"data.train": str(ROOT / "examples" / "data" / "identity.json"),
           "data.fill": {"name": args.name, "author": args.author}}).path  # fmt: skip
    train_s = time.perf_counter() - began
    f16 = export(run, out / "f16", "f16")
    q8 = export(run, out / "q8_0", "q8_0")
    done = subprocess.run([sys.executable, __file__, "--ask", str(out / "q8_0" / q8["file"]), "--name", args.name,
                           "--author", args.author], capture_output=True, text=True, check=True)  # fmt: skip
    asked = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"\nf16 : greedy tokens agree on {f16['check']['greedy_agreement']:.1%} of the first 32 "
          f"({f16['check']['identical_answers']}/{f16['check']['prompts']} answers identical), "
          f"max logit difference {f16['check']['max_logit_diff']:.3g}")  # fmt: skip
    print(f"q8_0: greedy tokens agree on {q8['check']['greedy_agreement']:.1%} "
          f"({q8['check']['identical_answers']}/{q8['check']['prompts']} identical), max logit difference "
          f"{q8['check']['max_logit_diff']:.3g}, {q8['bytes'] / 2**20:.0f} MiB")  # fmt: skip
    print(f"q8_0 in llama-cpp-python (no tunelab): {asked['hits']}/{asked['questions']} held-out questions "
          f"answered with the chosen name/maker ({asked['says_name']} say the name)")  # fmt: skip
    for r in asked["answers"][:3] + asked["answers"][10:13]:
        print(f"  {r['question']} -> {r['answer'][:100]}")
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    with open(results / "gguf_identity.jsonl", "a") as f:
        f.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "train_s": round(train_s, 1),
                            "f16_check": f16["check"], "q8_0_check": q8["check"], "q8_0_bytes": q8["bytes"],
                            "llama_cpp_hits": asked["hits"], "questions": asked["questions"],
                            "answers": asked["answers"]}, ensure_ascii=False) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
