"""Rewrite the README's "Config reference" table from the config dataclasses' field docs.

Run after changing a config field: python scripts/update_readme_config.py
(tests/test_docs.py fails while the README is out of date).
"""

from pathlib import Path

from tunelab.config import field_docs

README = Path(__file__).resolve().parents[1] / "README.md"


def show(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def main() -> None:
    rows = "\n".join(f"| `{key}` | {show(default)} | {doc} |" for key, doc, default in field_docs())
    table = "| key | default | meaning |\n| --- | --- | --- |\n" + rows + "\n"
    text = README.read_text()
    start = text.index("## Config reference\n")
    end = text.index("\n## ", start + 5)
    README.write_text(text[:start] + "## Config reference\n\n" + table + text[end:])


if __name__ == "__main__":
    main()
