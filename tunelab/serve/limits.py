"""The limits of `tunelab serve`: the one place their defaults and their checks are written.

Each field is a `tunelab serve` flag of the same name (`max_batch` -> `--max-batch`); the CLI
builds those flags, with their defaults and help, from the fields of `Limits`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tunelab.errors import ConfigError


def flag(name: str) -> str:
    """The CLI flag of a `Limits` field: `max_batch` -> `--max-batch`."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how the server batches and admits requests.

    A request over a limit gets a 400 naming the limit before it reaches the model (a body over
    `max_body_kb`, a 413 before it is read).

    Raises:
        ConfigError: a limit below its minimum (1; 0 for `batch_wait_ms`), naming its flag.
    """

    max_batch: int = field(default=64, metadata={"help": "most inputs in one request"})
    max_input_tokens: int = field(
        default=1024, metadata={"help": "longest input in tokens (chat: the rendered prompt)"}
    )
    max_tokens: int = field(default=512, metadata={"help": "largest max_tokens a request may ask for"})
    batch_wait_ms: float = field(
        default=10.0, metadata={"help": "window (ms) for gathering requests into one model call", "min": 0}
    )
    max_model_batch: int = field(default=32, metadata={"help": "most inputs in one model call"})
    max_connections: int = field(
        default=512, metadata={"help": "most open connections; the server answers more with 503"}
    )
    max_body_kb: int = field(
        default=1024, metadata={"help": "largest request body in KB; a larger one gets 413 unread"}
    )
    body_timeout_s: float = field(
        default=30.0, metadata={"help": "longest wait (s) for the next part of a request body; then 408"}
    )

    def __post_init__(self) -> None:
        for limit in dataclasses.fields(self):
            value, lowest = getattr(self, limit.name), limit.metadata.get("min", 1)
            if value < lowest:
                raise ConfigError(f"{flag(limit.name)} must be >= {lowest} (got {value})")
