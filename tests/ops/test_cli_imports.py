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


def test_status_imports_its_own_module_only() -> None:
    # Nothing listens on port 1: the command fails to connect (status 1).
    code, modules = _loaded("status", "--json", "--master", "127.0.0.1:1")
    assert code == 1
    assert {"procurator.cli.status", "procurator.cli.parsers"} <= modules
    assert modules & (_COMMAND_MODULES - {"procurator.cli.parsers"}) == set()
    assert modules & _ROOTS == set()


# The commands whose parsers are procurator.cli.parsers': all of them.
_CLIENTS = [c.name for c in COMMANDS if c.parser.startswith("procurator.cli.parsers:")]

_HELPS = """
import contextlib, io, json, sys
from procurator.cli import main
codes = {}
for command in sys.argv[1:]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        codes[command] = main([command, "--help"])
print(json.dumps({"codes": codes, "modules": sorted(sys.modules)}))
"""


def test_a_client_command_s_help_imports_no_trio_and_no_capnp() -> None:
    # Each --help built its parser from procurator.cli.parsers and ran
    # nothing: no trio, no Cap'n Proto (no schema loaded), no module that
    # runs a command. Once every command's module was imported with its
    # parser, and with it trio and pycapnp, to print a help text.
    assert {
        "status",
        "describe",
        "events",
        "apply",
        "top",
        "rollout",
        "snapshot",
        "move",
        "moves",
    } <= set(_CLIENTS)
    done = subprocess.run(
        [sys.executable, "-c", _HELPS, *_CLIENTS], capture_output=True, text=True, check=True
    )
    result = json.loads(done.stdout)
    assert set(result["codes"].values()) == {0}
    modules = set(result["modules"])
    assert "procurator.cli.parsers" in modules
    heavy = {"trio", "capnp", "rich", "procurator.rpc.bridge", "procurator.rpc.schema"}
    assert modules & (heavy | _ROOTS | (_COMMAND_MODULES - {"procurator.cli.parsers"})) == set()


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


_DAEMON_HELPS = """
import contextlib, io, json, sys
from procurator.cli import main
codes = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        codes.append(main(argv))
print(json.dumps({"codes": codes, "modules": sorted(sys.modules)}))
"""


def test_the_daemons_help_imports_no_trio_and_no_capnp() -> None:
    # Their flags' defaults come from procurator.core.defaults, not from the
    # composition roots (procurator.app.master, .worker), the RPC server
    # (which loads the schema when imported) or the worker's runtime.
    helps = [
        ["master", "--help"],
        *(["master", c, "--help"] for c in ("migrate", "export", "import")),
        ["worker", "--help"],
        *(["worker", c, "--help"] for c in ("cordon", "uncordon", "drain")),
    ]
    done = subprocess.run(
        [sys.executable, "-c", _DAEMON_HELPS, json.dumps(helps)],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout)
    assert result["codes"] == [0] * len(helps)
    modules = set(result["modules"])
    heavy = {"trio", "capnp", "procurator.rpc.bridge", "procurator.rpc.schema"}
    runners = {"procurator.cli.master", "procurator.cli.worker", "procurator.worker.runtime"}
    assert modules & (heavy | _ROOTS | runners) == set()
