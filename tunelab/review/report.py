"""What a review found: how often A won (a tie counts half) with a 95% Wilson score interval,
how far reviewers agreed (raw agreement and Cohen's kappa over each pair of reviewers, on the
items both decided), the per-prompt table, and the decided pairs as preference data.

The statistics are a few lines each (Wilson's interval, Cohen's kappa over three categories), so
they are written here rather than pulling scipy or scikit-learn into the runtime dependencies."""

from __future__ import annotations

import itertools
import json
import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, TunelabError
from tunelab.review.store import Review

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(wins: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a proportion of `wins` in `n` (0, 1 when n is 0)."""
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def cohen_kappa(first: list[str], second: list[str]) -> float | None:
    """Cohen's kappa of two raters' labels on the same items (None when chance agreement is total)."""
    n = len(first)
    if n == 0:
        return None
    observed = sum(x == y for x, y in zip(first, second)) / n
    a, b = Counter(first), Counter(second)
    expected = sum(a[k] * b[k] for k in set(a) | set(b)) / (n * n)
    return None if expected == 1 else (observed - expected) / (1 - expected)


def agreement(decided: dict[int, dict[str, str]]) -> dict[str, Any] | None:
    """Agreement between reviewers on the items each pair both decided (A, B or tie)."""
    reviewers = sorted({r for votes in decided.values() for r in votes})
    if len(reviewers) < 2:
        return None
    pairs: list[dict[str, Any]] = []
    for x, y in itertools.combinations(reviewers, 2):
        both = [votes for votes in decided.values() if x in votes and y in votes]
        first, second = [v[x] for v in both], [v[y] for v in both]
        agree = sum(1 for p, q in zip(first, second) if p == q)
        pairs.append({"reviewers": [x, y], "items": len(both),
                      "agreement": agree / len(both) if both else None, "kappa": cohen_kappa(first, second)})  # fmt: skip
    kappas: list[float] = [p["kappa"] for p in pairs if p["kappa"] is not None]
    return {
        "reviewers": reviewers,
        "pairs": pairs,
        "mean_kappa": sum(kappas) / len(kappas) if kappas else None,
    }


def report(folder: str | Path) -> dict[str, Any]:
    """The review's report as a dict (see the module docstring)."""
    review = Review(folder)
    try:
        meta, items, ratings = review.meta(), review.items(), review.ratings()
    finally:
        review.close()
    decided: dict[int, dict[str, str]] = defaultdict(dict)
    scores: dict[int, list[int]] = defaultdict(list)
    skips: Counter[int] = Counter()
    for r in ratings:
        if r["choice"] == "skip":
            skips[r["item"]] += 1
            continue
        decided[r["item"]][r["reviewer"]] = r["choice"]
        if r["score"] is not None:
            scores[r["item"]].append(r["score"])
    votes = [c for v in decided.values() for c in v.values()]
    n, wins = len(votes), votes.count("a") + 0.5 * votes.count("tie")
    low, high = wilson(wins, n)
    rows = []
    for item in items:
        count = Counter(decided[item.id].values())
        rows.append({"item": item.id, "prompt": item.prompt, "a": count["a"], "b": count["b"], "tie": count["tie"],
                     "skip": skips[item.id], "mean_score": sum(scores[item.id]) / len(scores[item.id]) if scores[item.id] else None})  # fmt: skip
    return {
        "a": meta.get("a"), "b": meta.get("b"), "items": len(items), "ratings": n,
        "a_wins": votes.count("a"), "b_wins": votes.count("b"), "ties": votes.count("tie"),
        "skips": sum(skips.values()),
        "win_rate_a": wins / n if n else None, "ci95": [low, high] if n else None,
        "agreement": agreement(decided), "per_prompt": rows,
    }  # fmt: skip


def format_report(r: dict[str, Any]) -> str:
    """The report as text: the headline, the agreement, and the per-prompt table."""
    lines = [f"review: A = {r['a']}  vs  B = {r['b']}; {r['items']} prompts, {r['ratings']} decided ratings "
             f"({r['a_wins']} A, {r['b_wins']} B, {r['ties']} ties; {r['skips']} skipped)"]  # fmt: skip
    if r["win_rate_a"] is None:
        lines.append("win rate of A: no decided ratings yet")
    else:
        low, high = r["ci95"]
        lines.append(f"win rate of A: {r['win_rate_a']:.3f} (95% CI {low:.3f}-{high:.3f}; a tie counts half)")
    if r["agreement"]:
        for pair in r["agreement"]["pairs"]:
            agree = "n/a" if pair["agreement"] is None else f"{pair['agreement']:.2f}"
            kappa = "n/a" if pair["kappa"] is None else f"{pair['kappa']:.2f}"
            lines.append(f"agreement {pair['reviewers'][0]} / {pair['reviewers'][1]}: {agree} on {pair['items']} "
                         f"items (Cohen's kappa {kappa})")  # fmt: skip
    lines.append("")
    lines.append(f"{'item':>4}  {'A':>2} {'B':>2} {'tie':>3} {'skip':>4} {'score':>5}  prompt")
    for row in r["per_prompt"]:
        score = "" if row["mean_score"] is None else f"{row['mean_score']:.1f}"
        prompt = row["prompt"].replace("\n", " ")
        prompt = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        lines.append(f"{row['item']:>4}  {row['a']:>2} {row['b']:>2} {row['tie']:>3} {row['skip']:>4} {score:>5}  {prompt}")  # fmt: skip
    return "\n".join(lines)


def write_new(path: Path, text: str) -> None:
    """Write `text` to `path` under a temporary name and rename it."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.write_text(text)
    tmp.rename(path)


def save_report(folder: str | Path) -> tuple[dict[str, Any], Path]:
    """Compute the report and write it to `folder/report.json` (replacing the one it wrote before)."""
    r = report(folder)
    path = Path(folder) / "report.json"
    write_new(path, json.dumps(r, indent=2) + "\n")
    return r, path


def export_pairs(folder: str | Path, fmt: str, output: str | Path) -> int:
    """Write each decided item as `{prompt, chosen, rejected}` (JSON lines): the side more reviewers
    preferred is chosen; items with ties only, or as many votes each way, are left out.

    Raises:
        TunelabError: an unknown format, no review, or `output` already exists.
    """
    if fmt != "preference":
        raise ConfigError(f"--format {fmt}: review exports the format 'preference'")
    out = Path(output)
    if out.exists():
        raise TunelabError(
            f"--output {out}: already exists; choose another name (tunelab does not overwrite it)"
        )
    if not out.parent.is_dir():
        raise TunelabError(f"--output {out}: the folder {out.parent} does not exist; create it first")
    review = Review(folder)
    try:
        items, ratings = review.items(), review.ratings()
    finally:
        review.close()
    count: dict[int, Counter[str]] = defaultdict(Counter)
    for r in ratings:
        count[r["item"]][r["choice"]] += 1
    rows = []
    for item in items:
        a, b = count[item.id]["a"], count[item.id]["b"]
        if a != b:
            chosen, rejected = (item.answer_a, item.answer_b) if a > b else (item.answer_b, item.answer_a)
            rows.append({"prompt": item.prompt, "chosen": chosen, "rejected": rejected})
    write_new(out, "".join(json.dumps(row) + "\n" for row in rows))
    return len(rows)
