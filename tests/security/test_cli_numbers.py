"""Numeric flags refuse what is not a number they can use, before anything
starts: nan passes a plain ``value <= 0`` check (every comparison with nan
is false), and inf would make every wait endless."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from procurator.cli import build_parser


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--health-interval", "nan", "must be a positive number"),
        ("--health-interval", "inf", "must be a positive number"),
        ("--health-interval", "0", "must be a positive number"),
        ("--metrics-interval", "-1", "must be a positive number"),
        ("--health-budget", "nan", "must be a number >= 0"),
        ("--health-budget", "-5", "must be a number >= 0"),
    ],
)
def test_a_worker_number_flag_refuses_a_useless_value(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # The parser alone: were the value accepted, main() would start a worker.
    argv = ["worker", "--id", "w1", "--master", "127.0.0.1:1", flag, value]
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and message in err and value in err


def test_a_zero_budget_is_accepted_as_no_cap() -> None:
    """0 turns the cap off (parsed only: no worker is started)."""
    args = build_parser().parse_args(
        ["worker", "--id", "w1", "--master", "127.0.0.1:1", "--health-budget", "0"]
    )
    assert args.health_budget == 0.0


# What each command needs besides the flag under test.
_REQUIRED = {
    "worker": ["--id", "w1"],
    "apply": ["fleet.toml"],
    "describe": ["vm", "web-1"],
    "certs init": ["pki"],
    "certs issue": ["pki", "--master"],
}


def _numeric(convert: Any) -> bool:
    try:
        return isinstance(convert("1"), int | float)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        return False


def _numeric_flags() -> list[tuple[str, str]]:
    """(command, flag) of every option of every command that takes a
    number: whatever its type function, nan and inf must not pass it."""
    found: list[tuple[str, str]] = []

    def walk(parser: argparse.ArgumentParser, command: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{command} {name}".strip())
            elif action.option_strings and callable(action.type) and _numeric(action.type):
                found.append((command, action.option_strings[0]))

    walk(build_parser(), "")
    return found


def test_the_walk_finds_the_numeric_flags() -> None:
    flags = _numeric_flags()
    assert ("events", "--interval") in flags and ("top", "--wait") in flags
    assert ("worker", "--health-budget") in flags and ("apply", "--timeout") in flags


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_no_numeric_flag_takes_nan_or_inf(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    accepted = []
    for command, flag in _numeric_flags():
        argv = [*command.split(), *_REQUIRED.get(command, []), f"{flag}={value}"]
        try:
            build_parser().parse_args(argv)
        except SystemExit as exit_info:
            assert exit_info.code == 2, argv
        else:
            accepted.append(" ".join(argv))
    capsys.readouterr()
    assert accepted == []
