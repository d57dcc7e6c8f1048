"""The ``procurator`` command imports only what the command it runs needs
(procurator/cli/__init__.py, ``COMMANDS``): the process tests call
``procurator status`` on every poll, and importing every subcommand's
composition root (the worker's pyroute2 and VMMs, the master's HTTP and
databases) cost each call 0.6-1 s.

Each case is a fresh interpreter (a module imported once stays imported),
which runs ``main`` and prints the modules it loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping

import pytest

from procurator.cli import COMMANDS, build_parser

_LOADED = """
import contextlib, io, json, sys
from procurator.cli import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""

# What no client command needs: the composition roots and what only they use.
_ROOTS = {"procurator.app.master", "procurator.app.worker", "pyroute2", "psycopg", "httpx"}
_COMMAND_MODULES = {c.parser.partition(":")[0] for c in COMMANDS}


def _loaded(*argv: str) -> tuple[int, set[str]]:
    done = subprocess.run(
        [sys.executable, "-c", _LOADED, *argv], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout)
    return result["code"], set(result["modules"])


def test_the_command_list_imports_no_command() -> None:
    code, modules = _loaded("--help")
    assert code == 0
    assert modules & (_COMMAND_MODULES | _ROOTS) == set()


@pytest.mark.parametrize(
    "argv",
    [
        ["status", "--help"],
        # Nothing listens on port 1: the command fails to connect (status 1).
        ["status", "--json", "--master", "127.0.0.1:1"],
    ],
)
def test_status_imports_its_own_module_only(argv: list[str]) -> None:
    code, modules = _loaded(*argv)
    assert code == (0 if "--help" in argv else 1)
    assert "procurator.cli.status" in modules
    assert modules & (_COMMAND_MODULES - {"procurator.cli.status"}) == set()
    assert modules & _ROOTS == set()


def test_commands_sharing_a_module_are_built_together() -> None:
    """``describe`` and ``events`` come from one ``add_parsers``: asking for
    one builds both, each with its own parser, once."""
    commands = next(
        a for a in build_parser()._actions if a.dest == "command" and a.choices is not None
    )
    choices = commands.choices
    assert isinstance(choices, Mapping)
    events = choices["events"]
    describe = choices["describe"]
    assert (events.prog, describe.prog) == ("procurator events", "procurator describe")
    assert choices["events"] is events
    assert list(choices) == [c.name for c in COMMANDS]
