"""`tunelab review A B --prompts FILE`: make (or reopen) the review folder, then serve its page."""

from __future__ import annotations

from pathlib import Path

from tunelab.console import say
from tunelab.errors import ConfigError, TunelabError
from tunelab.review.answers import answers, read_prompts
from tunelab.review.store import FILE, Review


def default_folder(a: str, b: str | None) -> Path:
    return Path("reviews") / f"{Path(a).name}-vs-{Path(b).name if b else 'base'}"


def start_review(a: str, b: str | None, prompts_file: str | None, folder: str | None = None) -> Path:
    """The review folder of A against B (B None: the model A started from): made with both
    sides' answers on first use, reopened as it is afterwards (so a review resumes).

    Raises:
        TunelabError: no prompts file for a new review, a folder that is something else, or a
            folder holding a review of other models.
    """
    where = Path(folder) if folder else default_folder(a, b)
    b_name = b if b is not None else f"{a} (starting model)"
    if (where / FILE).is_file():
        review = Review(where)
        meta = review.meta()
        review.close()
        if (meta.get("a"), meta.get("b")) != (a, b_name):
            raise TunelabError(f"{where} holds a review of {meta.get('a')} against {meta.get('b')}; "
                               f"give another folder with --dir")  # fmt: skip
        say(f"review: resuming {where}")
        return where
    if where.exists():
        raise TunelabError(f"{where} exists and is not a review folder; give another folder with --dir")
    if prompts_file is None:
        raise ConfigError("--prompts FILE: a new review needs the prompts to ask both models")
    prompts = read_prompts(prompts_file)  # before any model loads
    first, second = answers(a, b, prompts)
    Review.create(where, a, b_name, list(zip(prompts, first, second))).close()
    say(f"review: {len(prompts)} items in {where / FILE}")
    return where
