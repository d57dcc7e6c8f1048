"""Numeric flags refuse what is not a number they can use, before anything
starts: nan passes a plain ``value <= 0`` check (every comparison with nan
is false), and inf would make every wait endless."""

from __future__ import annotations

import pytest

from procurator.cli import _build_parser


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
        _build_parser().parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and message in err and value in err


def test_a_zero_budget_is_accepted_as_no_cap() -> None:
    """0 turns the cap off (parsed only: no worker is started)."""
    args = _build_parser().parse_args(
        ["worker", "--id", "w1", "--master", "127.0.0.1:1", "--health-budget", "0"]
    )
    assert args.health_budget == 0.0
