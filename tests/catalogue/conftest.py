"""Fixtures for the catalogue: the tiny random models every row may name."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import write_tiny_llama


@pytest.fixture(scope="session")
def models(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {"bert": tiny_bert, "llama": write_tiny_llama(tmp_path_factory.mktemp("llama"))}
