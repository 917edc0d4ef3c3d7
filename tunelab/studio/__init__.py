"""`tunelab studio`: a local web app over a runs folder (FastAPI + uvicorn, as `tunelab serve`).

Pages: the runs table (live, sortable, filterable); a run's page (config, live loss / learning
rate / metric curves from metrics.jsonl as server-sent events, progress and ETA, eval.json with
the confusion matrix as a heat map, samples, stop / resume / export); a new-run form generated
from the typed config, checked by `load_config` field by field, with `data check` and `estimate`
previews, that starts an ordinary `tunelab train` process; compare (runs side by side, curves
overlaid, `tunelab compare` started from a config or the form and watched, its reports in place);
a finished run's `tunelab eval` on a picked file and `tunelab serve` on a loopback port; a
playground that answers with any finished run through `tunelab serve`'s own endpoints; and the
`tunelab review` folders with their reports and rating pages.

    runs.py        the runs index: each run folder's status, metrics and progress, read from its files
    security.py    the access token, the CSRF token and the folders files are read from
    jobs.py        the `tunelab` processes the studio starts and stops
    form.py        the new-run form's fields from the config dataclasses, and its check
    playground.py  finished runs served by `tunelab.serve`'s app, mounted at /play
    reviews.py     the review folders, their reports, and `tunelab.review`'s page mounted at /review
    pages.py       the HTML layout; static/ holds studio.js, studio.css and uPlot (MIT, vendored)
    routes.py      the pages and the JSON API
    app.py         create_app (routes + the access guard) and studio (uvicorn)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tunelab.errors import ConfigError

if TYPE_CHECKING:
    from tunelab.studio.app import create_app, studio

__all__ = ["create_app", "studio"]

INSTALL_HINT = "the studio needs FastAPI and uvicorn: pip install 'tunelab[serve]'"
SERVE_EXTRA = {"fastapi", "uvicorn", "starlette", "pydantic"}


def __getattr__(name: str) -> Any:
    """`create_app` and `studio`, imported on first use: they need the optional `serve` extra."""
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        module = importlib.import_module("tunelab.studio.app")
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in SERVE_EXTRA:
            raise
        raise ConfigError(INSTALL_HINT) from None
    return getattr(module, name)
