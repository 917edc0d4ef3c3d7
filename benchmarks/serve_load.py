"""Load test for `tunelab serve`: start the server on a run, then for each client count run that
many concurrent clients for a fixed time and report requests/s, p50/p99 latency and errors.

    python benchmarks/serve_load.py runs/quickstart --clients 1,64 --seconds 30
    python benchmarks/serve_load.py runs/alpaca --clients 1,8 --seconds 30 --max-tokens 16

Classification runs are sent one short review per request (`/v1/classify`); causal-lm runs a
one-line chat question (`/v1/chat/completions`, greedy, `--max-tokens`). Appends the table to
benchmarks/results/serve_load.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
REVIEWS = ["The battery died within an hour.", "Lovely screen and a great keyboard.", "Support never replied.",
           "Setup took two minutes and it just works.", "The hinge cracked after a week."]  # fmt: skip
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "Give one tip for sleeping well."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client(url: str, body_for, until: float, latencies: list[float], errors: list[str], n: int) -> None:
    async with httpx.AsyncClient(timeout=120) as http:
        i = n
        while time.perf_counter() < until:
            path, body = body_for(i)
            began = time.perf_counter()
            try:
                reply = await http.post(url + path, json=body)
                if reply.status_code == 200:
                    latencies.append(time.perf_counter() - began)
                else:
                    errors.append(f"{reply.status_code} {reply.text[:100]}")
            except httpx.HTTPError as e:
                errors.append(repr(e))
            i += 1


async def load(url: str, clients: int, seconds: float, body_for) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    began = time.perf_counter()
    until = began + seconds
    await asyncio.gather(*(client(url, body_for, until, latencies, errors, n) for n in range(clients)))
    wall = time.perf_counter() - began
    ordered = sorted(latencies) or [float("nan")]
    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "wall_s": round(wall, 1),
            "requests_per_s": round(len(latencies) / wall, 2),
            "p50_ms": round(1000 * ordered[len(ordered) // 2], 1),
            "p99_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 1),
            "first_errors": errors[:3]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run")
    parser.add_argument("--clients", default="1,64", help="comma-separated client counts")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", args.run, "--port", str(port)])
    try:
        for _ in range(600):
            try:
                health = httpx.get(url + "/health", timeout=1).json()
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            raise SystemExit("the server did not start")
        task = health["task"]

        def body_for(i: int):
            if task == "causal-lm":
                return "/v1/chat/completions", {"messages": [{"role": "user", "content": QUESTIONS[i % 3]}],
                                                "max_tokens": args.max_tokens}  # fmt: skip
            return "/v1/classify", {"input": REVIEWS[i % len(REVIEWS)]}

        rows = []
        for clients in (int(c) for c in args.clients.split(",")):
            rows.append(asyncio.run(load(url, clients, args.seconds, body_for)))
        after = httpx.get(url + "/health").json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"\n{args.run} ({task}), {args.seconds:g} s per row; model calls {after['model_calls']} for "
          f"{after['requests']} requests")  # fmt: skip
    print(f"{'clients':>8}{'requests/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'requests':>10}{'errors':>8}")
    for r in rows:
        print(f"{r['clients']:>8}{r['requests_per_s']:>12}{r['p50_ms']:>10}{r['p99_ms']:>10}{r['requests']:>10}"
              f"{r['errors']:>8}")  # fmt: skip
    results = ROOT / "benchmarks" / "results"
    results.mkdir(exist_ok=True)
    with open(results / "serve_load.jsonl", "a") as f:
        f.write(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M"), "run": args.run, "task": task, "rows": rows})
                + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
