"""The README's config reference lists every config key with its current default."""

from __future__ import annotations

from pathlib import Path

from tunelab.config import field_docs

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def test_readme_config_reference_matches_the_config():
    for key, doc, default in field_docs():
        row = f"| `{key}` | {_show(default)} | {doc} |"
        assert row in README, f"README config reference is missing or outdated for {key}: {row}"
