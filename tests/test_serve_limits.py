"""Limits: one set of defaults for the Python API and the CLI flags, and one-line errors naming the
flag for a limit below its minimum."""

from __future__ import annotations

import dataclasses

import pytest

from tunelab.cli import build_parser, main
from tunelab.errors import ConfigError
from tunelab.serve import Limits
from tunelab.serve.limits import flag

LIMITS = [limit.name for limit in dataclasses.fields(Limits)]


def test_the_cli_help_shows_the_defaults_of_limits(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    defaults = Limits()
    for limit in dataclasses.fields(Limits):
        metavar = limit.name.upper()
        shown = (
            f"{flag(limit.name)} {metavar} {limit.metadata['help']} (default {getattr(defaults, limit.name)})"
        )
        assert shown in help_text


def test_the_cli_defaults_are_the_limits_defaults():
    args = build_parser().parse_args(["serve", "runs/x"])
    assert Limits(**{name: getattr(args, name) for name in LIMITS}) == Limits()
    assert Limits() == Limits(
        max_batch=64,
        max_input_tokens=1024,
        max_tokens=512,
        batch_wait_ms=10.0,
        max_model_batch=32,
        max_connections=512,
    )
    given = build_parser().parse_args(["serve", "runs/x", "--max-batch", "8", "--batch-wait-ms", "2.5"])
    assert (given.max_batch, given.batch_wait_ms) == (8, 2.5)


@pytest.mark.parametrize("name", LIMITS)
def test_a_limit_below_its_minimum_is_an_error_naming_its_flag(name):
    lowest = 0 if name == "batch_wait_ms" else 1
    Limits(**{name: lowest})  # the minimum itself is fine
    with pytest.raises(ConfigError) as caught:
        Limits(**{name: lowest - 1})
    assert str(caught.value) == f"{flag(name)} must be >= {lowest} (got {lowest - 1})"


def test_the_cli_refuses_a_zero_limit_in_one_line_before_loading_anything(capsys, tmp_path):
    assert main(["serve", str(tmp_path / "no-such-run"), "--max-tokens", "0"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --max-tokens must be >= 1 (got 0)"]


def test_limits_are_fixed_once_made():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Limits().max_batch = 1  # type: ignore[misc]
