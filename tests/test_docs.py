"""The documentation: the generated config reference matches the config, the MkDocs site builds
strictly, the README stays short, and every relative link points to a file that exists."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.config import field_docs

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
spec = importlib.util.spec_from_file_location(
    "gen_config_reference", ROOT / "scripts" / "gen_config_reference.py"
)
assert spec is not None and spec.loader is not None
generator = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generator)


def reference_text() -> str:
    return generator.OUTPUT.read_text() if generator.OUTPUT.is_file() else ""


def test_config_reference_is_the_generated_one():
    committed, expected = reference_text(), generator.render()
    if committed != expected:
        changed = [line for line in expected.splitlines() if line not in committed.splitlines()]
        gone = [line for line in committed.splitlines() if line not in expected.splitlines()]
        pytest.fail(
            "docs/reference/config.md is out of date with tunelab/config.py; regenerate it with: "
            f"{generator.COMMAND}\n  missing or changed: {changed[:5]}\n  no longer generated: {gone[:5]}"
        )


def test_config_reference_lists_every_key_with_its_default_and_doc():
    text = reference_text()
    for key, doc, default in field_docs():
        row = generator.row(key, doc, default)
        assert row in text, f"docs/reference/config.md is missing or outdated for {key}: {row}"
    assert generator.row("data.label_separator", "d", "|") == "| `data.label_separator` | \\| | d |"


def test_site_builds_strictly(tmp_path: Path):
    missing = [name for name in ("mkdocs", "material") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(
            f"{' and '.join(missing)} not installed: pip install -e '.[dev]' (mkdocs, mkdocs-material)"
        )
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},  # no end-of-life banner in the failure output
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "reference" / "config" / "index.html").is_file()


def test_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= 260, f"README.md has {lines} lines; keep it at most 260 and move detail into docs/"


FENCE = re.compile(r"^(```|~~~).*?^\1", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


def relative_links(path: Path) -> list[str]:
    """Link targets in a Markdown file that are neither URLs nor anchors on the same page."""
    text = INLINE_CODE.sub("", FENCE.sub("", path.read_text()))
    targets = LINK.findall(text) + REFERENCE.findall(text)
    return [t for t in targets if not re.match(r"^([a-z][a-z0-9+.-]*:|#|//)", t, re.IGNORECASE)]


def test_relative_links_point_to_existing_files():
    pages = [README, ROOT / "benchmarks" / "README.md", *sorted(DOCS.rglob("*.md"))]
    broken = []
    for page in pages:
        for target in relative_links(page):
            file = target.split("#", 1)[0]
            if file and not (page.parent / file).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, "links to missing files:\n" + "\n".join(broken)
    assert relative_links(README), "no relative link found in README.md: the link pattern is broken"
