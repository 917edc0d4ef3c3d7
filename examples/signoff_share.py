"""The share of held-out answers that end with the demo's sign-off, before and after tuning:
reads a run's samples.jsonl (the greedy answers of the tuned model and of the model it started
from, to the test prompts). Run: python examples/signoff_share.py runs/preference"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SIGN_OFF = "Stay curious!"


def main() -> None:
    run = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/preference")
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    for key, name in (("baseline", "starting model"), ("generation", "tuned model")):
        if key in rows[0]:
            hits = sum(r[key].strip().endswith(SIGN_OFF) for r in rows)
            print(
                f"{name}: {hits}/{len(rows)} held-out answers end with {SIGN_OFF!r} ({100 * hits / len(rows):.0f}%)"
            )


if __name__ == "__main__":
    main()
