"""The README's config reference lists every config key with its current default."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tunelab.config import field_docs

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
spec = importlib.util.spec_from_file_location(
    "update_readme_config", ROOT / "scripts" / "update_readme_config.py"
)
updater = importlib.util.module_from_spec(spec)
spec.loader.exec_module(updater)


def test_readme_config_reference_matches_the_config():
    for key, doc, default in field_docs():
        row = f"| `{key}` | {updater.show(default)} | {doc} |"
        assert row in README, f"README config reference is missing or outdated for {key}: {row}"
