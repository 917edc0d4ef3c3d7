"""What tunelab says to the person running it: one-line messages on standard error."""

from __future__ import annotations

import sys


def say(message: str) -> None:
    """Print `tunelab: message` on standard error, at once (progress bars share the stream)."""
    print(f"tunelab: {message}", file=sys.stderr, flush=True)
