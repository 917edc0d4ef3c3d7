"""Write docs/reference/config.md, the config reference, from the config dataclasses' field docs.

Run it after adding or changing a config field:

    .venv/bin/python scripts/gen_config_reference.py

tests/test_docs.py fails while the committed page differs from what this script writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.config import field_docs

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "reference" / "config.md"
COMMAND = ".venv/bin/python scripts/gen_config_reference.py"

# The documentation page that explains each section's keys (a section missing here gets none).
SECTION_PAGES = {
    "": "[Models](../index.md#models), [Tasks](../tasks.md) and [Methods](../methods.md)",
    "data": "[Data](../data.md)",
    "train": "[Training](../training.md) and [Resume, interrupt, scale out](../scale.md)",
    "classification": "[Tasks](../tasks.md#classification-multi-label-and-regression)",
    "full": "[Methods](../methods.md#options)",
    "freeze": "[Methods](../methods.md#options)",
    "lora": "[Methods](../methods.md#options)",
    "adapter": "[Methods](../methods.md#options)",
    "prefix": "[Methods](../methods.md#options)",
    "prompt": "[Methods](../methods.md#options)",
    "ia3": "[Methods](../methods.md#options)",
    "generation": "[Tasks](../tasks.md#generation)",
}

HEADER = f"""# Config reference

<!-- Generated from tunelab.config.field_docs() by scripts/gen_config_reference.py; do not edit.
     Regenerate: {COMMAND} -->

Every key `tunelab train`, `compare`, `estimate` and `augment` accept, in a YAML file or as
`key=value` overrides (`train.epochs=1`), with its default and meaning. `tunelab train --help`
prints the same list. A run's `config.yaml` holds every key, resolved.
"""


def show(value: object) -> str:
    """A default as YAML writes it: null, true/false, or the value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell: pipes escaped, and outside `code` spans the angle
    brackets too (`runs/<model>` would otherwise be read as an HTML tag and vanish)."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):
        parts[i] = parts[i].replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts).replace("|", "\\|")


def row(key: str, doc: str, default: Any) -> str:
    """One key's table row."""
    return f"| `{key}` | {cell(show(default))} | {cell(doc)} |"


def render() -> str:
    """The whole page: one table of top-level keys, then one per section, in field order."""
    sections: dict[str, list[str]] = {}
    for key, doc, default in field_docs():
        section = key.split(".", 1)[0] if "." in key else ""
        sections.setdefault(section, []).append(row(key, doc, default))
    parts = [HEADER]
    for section, rows in sections.items():
        title = f"`{section}`" if section else "Top level"
        pages = SECTION_PAGES.get(section)
        intro = f"\nExplained in {pages}.\n" if pages else ""
        table = "| key | default | meaning |\n| --- | --- | --- |\n" + "\n".join(rows)
        parts.append(f"## {title}\n{intro}\n{table}\n")
    return "\n".join(parts)


def main() -> None:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT.relative_to(ROOT)} ({len(field_docs())} keys)")


if __name__ == "__main__":
    main()
