"""Every exit status the command can end with is documented where a user
looks: ``procurator --help`` and the README's "Exit status" paragraph."""

from __future__ import annotations

import re
from pathlib import Path

from procurator.cli import build_parser, exits

README = Path(__file__).resolve().parents[2] / "README.md"


def _codes() -> set[int]:
    return {value for name, value in vars(exits).items() if name.startswith("EXIT_")}


def test_help_lists_every_exit_status() -> None:
    epilog = build_parser().epilog or ""
    listed = epilog.split("exit status:", 1)[1]
    found = {int(n) for n in re.findall(r"(?:^|[:;])\s*(\d+) ", listed, re.M)}
    assert found == _codes()


def test_the_readme_lists_every_exit_status() -> None:
    paragraph = README.read_text().split("**Exit status.**", 1)[1].split("\n\n", 1)[0]
    found = {int(n) for n in re.findall(r"(?:^|[.;])\s*`(\d+)` ", paragraph, re.M)}
    assert found == _codes()
