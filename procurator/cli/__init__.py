"""The ``procurator`` command: parsing, printing and exit statuses.

Each subcommand is a module of this package that registers its parser
(``add_parser``) and its handler: ``master`` and ``worker`` turn their
flags into a config and call their composition root (``procurator.app``);
``apply``, ``status``, ``describe``/``events`` (``ops``), ``top`` talk to a
master through ``procurator.rpc``; ``certs`` makes a fleet's certificates.
Flags several commands share (the master's address, TLS, logging, checked
numbers) are in ``args``.

The commands are a table (``COMMANDS``: name, one-line help, the
``"module:function"`` that registers its parser) and a command's parser
is built only when that command is parsed (run, or its ``--help`` shown):
``procurator status`` does not import the master's and the worker's
composition roots (pyroute2, psycopg, httpx, the VMMs), and ``procurator
--help`` imports no command at all. The client commands' parsers are
``parsers``' (no trio, no capnp), and so are the daemons': each names
the function that runs it,
and that function's module (``status``, ``ops``, ...) is imported only
when the command runs, so their ``--help`` and usage errors need neither.
The one-line help lives in the table only; the function it names gives
the parser's description and flags.

Exit statuses are named in ``exits`` (0 done, 1 refused/invalid/
unreachable, 2 bad usage, 3-6 ``apply``'s outcomes, 130 interrupted, 141
the reader of the output went away) and listed in ``procurator --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import sys
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from procurator import __version__
from procurator.cli.exits import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT_CLOSED,
)
from procurator.cli.stdout import discard_output, output_closed
from procurator.core.errors import ProcuratorError
from procurator.rpc.address import DEFAULT_PORT

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

_EPILOG = f"""\
the master: every client command dials --master HOST:PORT, else
$PROCURATOR_MASTER, else 127.0.0.1:{DEFAULT_PORT}; with mutual TLS from --tls-cert,
--tls-key, --tls-ca, else $PROCURATOR_TLS_CERT, _KEY, _CA (see README.md).

exit status: 0 done; 1 refused, invalid or unreachable; 2 bad usage;
3 apply --wait timed out; 4 apply --wait saw a VM fail; 5 apply --wait
converged except on disconnected workers the apply left with no VMs, which
have not confirmed stopping theirs; 6 apply: the outcome is unknown (the
master was lost after the request was sent); 7 apply --wait: the rollout
it started failed or was reverted; 130 interrupted; 141 the
reader of the output went away (procurator events -f | head -n 3): the
command ends quietly, and what it did before printing is whole."""


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, its line in ``procurator --help`` and the
    ``"module:function"`` that adds its parser (and those of the commands
    sharing its module) to the subcommands action it is given."""

    name: str
    help: str
    parser: str


COMMANDS = (
    Command(
        "master",
        "run the master (desired state, generations, pushes to workers)",
        "procurator.cli.parsers:master",
    ),
    Command(
        "worker",
        "run a worker (connects to the master, runs its assigned VMs); "
        "cordon, uncordon or drain one",
        "procurator.cli.parsers:worker",
    ),
    Command(
        "apply",
        "apply a fleet file (TOML or JSON) and print what changes",
        "procurator.cli.parsers:apply",
    ),
    Command(
        "status",
        "show each worker's connection, generations and VMs by phase",
        "procurator.cli.parsers:status",
    ),
    Command(
        "describe",
        "show one VM (desired vs observed state, its worker, recent events) or one worker "
        "(its capacity: used/total as placement counts it)",
        "procurator.cli.parsers:describe_and_events",
    ),
    Command(
        "events",
        "print the fleet's recent VM events; --follow streams new ones",
        "procurator.cli.parsers:describe_and_events",
    ),
    Command(
        "snapshot",
        "create, list, delete or restore VM snapshots",
        "procurator.cli.parsers:snapshot",
    ),
    Command(
        "rollout",
        "show, pause, resume, promote or undo a rollout",
        "procurator.cli.parsers:rollout",
    ),
    Command(
        "move",
        "move a VM to another worker (cold; --wait follows it)",
        "procurator.cli.parsers:move_and_moves",
    ),
    Command(
        "moves",
        "show the moves under way and the newest that are over",
        "procurator.cli.parsers:move_and_moves",
    ),
    Command(
        "top",
        "live view of the fleet: workers, convergence, VMs by phase, recent events",
        "procurator.cli.parsers:top",
    ),
    Command(
        "certs",
        "make a private CA and TLS certificates for a fleet",
        "procurator.cli.certs:add_parser",
    ),
)


class _Parsers(MutableMapping[str, argparse.ArgumentParser]):
    """The subcommands' parsers by name, in ``COMMANDS`` order. Every name
    is in it from the start, so argparse's choice check and its "invalid
    choice" message need no module; a command's parser is built (its
    module imported, its ``add_parser`` called on ``action``) when it is
    first looked up."""

    def __init__(self, commands: Sequence[Command], action: argparse.Action) -> None:
        self._action = action
        self._pending = {c.name: c.parser for c in commands}
        self._built: dict[str, argparse.ArgumentParser] = {}
        self._names = [c.name for c in commands]

    def __getitem__(self, name: str) -> argparse.ArgumentParser:
        target = self._pending.get(name)
        if target is not None:
            # The function adds every command of its module (``ops``: two).
            for other in [n for n, t in self._pending.items() if t == target]:
                del self._pending[other]
            module, _, function = target.partition(":")
            getattr(importlib.import_module(module), function)(self._action)
        return self._built[name]

    def __setitem__(self, name: str, parser: argparse.ArgumentParser) -> None:
        if name not in self._names:
            self._names.append(name)
        self._built[name] = parser

    def __delitem__(self, name: str) -> None:
        self._names.remove(name)
        self._pending.pop(name, None)
        self._built.pop(name, None)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def pending(self, name: str) -> bool:
        """Whether ``name`` is a command of the table not built yet."""
        return name in self._pending or (name in self._names and name not in self._built)


class _Commands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """The subcommands action over ``_Parsers``: each command of
    ``COMMANDS`` is listed in ``--help`` with the table's line from the
    start; its module's ``add_parser`` adds its parser on first use, with
    no ``help`` of its own (the table's is the one).

    It uses what ``argparse._SubParsersAction`` keeps (``_name_parser_map``,
    the ``choices`` it shares, ``_choices_actions`` listed by ``--help``),
    unchanged since Python 3.2; tests/ops/test_cli_imports.py and the
    tests that walk every subcommand (tests/docs) would see it change."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parsers = _Parsers(COMMANDS, self)
        self._name_parser_map = self._parsers  # type: ignore[assignment]
        self.choices = self._parsers  # type: ignore[assignment]
        for command in COMMANDS:
            self._choices_actions.append(self._ChoicesPseudoAction(command.name, (), command.help))

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if not self._parsers.pending(name):
            return super().add_parser(name, **kwargs)  # type: ignore[no-any-return]
        if "help" in kwargs or "aliases" in kwargs:
            raise TypeError(f"the command {name}'s help line is in procurator.cli.COMMANDS")
        kwargs.setdefault("prog", f"{self._prog_prefix} {name}")
        parser: argparse.ArgumentParser = self._parser_class(**kwargs)
        self._parsers[name] = parser
        return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``procurator`` parser: every subcommand, its flags and help."""
    parser = argparse.ArgumentParser(
        prog="procurator",
        description="Declarative control plane for microVMs whose images are Nix store paths.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"procurator {__version__}")
    # A daemon runs until stopped, logging; the rest (``master export``,
    # ``worker drain`` too) print and end. ``add_common`` says which.
    parser.set_defaults(daemon=False)
    parser.add_subparsers(dest="command", required=True, metavar="COMMAND", action=_Commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``procurator`` command; returns its exit status.

    In a pipe whose reader went away (``procurator status | head``) a
    command ends quietly with ``EXIT_OUTPUT_CLOSED`` (141), whether the
    failed write came while it ran or at the final flush; a daemon whose log
    reader went away keeps serving and exits with its own status (see
    ``procurator.cli.pipes``)."""
    try:
        code = _run(argv)
        # Deliver what is still buffered now, where a reader that went away
        # is handled, not at interpreter exit (a message and status 120).
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except BaseException as exc:
        if not output_closed(_leaves(exc)):
            raise
        discard_output()
        return EXIT_OUTPUT_CLOSED
    return code


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The parsed arguments, or the exit status of ``--help``, ``--version``
    or a usage error. argparse ignores a failed write of its help (it
    catches OSError); it writes into a buffer here and the help is written
    out afterwards, so a closed pipe shows as it does for any command."""
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            return parser.parse_args(argv)
    except SystemExit as exc:
        if sys.stdout is not None:
            sys.stdout.write(text.getvalue())
        return exc.code if isinstance(exc.code, int) else EXIT_OK


def _run(argv: Sequence[str] | None) -> int:
    parsed = _parse(build_parser(), argv)
    if isinstance(parsed, int):
        return parsed
    args = parsed
    if args.command in ("apply", "status", "describe", "events"):
        logging.basicConfig(
            level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
        )
    try:
        code = int(args.handler(args))
    except BaseException as exc:
        # Errors may come wrapped in exception groups from a nursery; say
        # what went wrong, without a traceback, when it is one of ours.
        leaves = _leaves(exc)
        if all(isinstance(leaf, ProcuratorError) for leaf in leaves):
            for leaf in leaves:
                print(f"procurator {args.command}: {leaf}", file=sys.stderr)
            return EXIT_ERROR
        if all(isinstance(leaf, KeyboardInterrupt) for leaf in leaves):
            return EXIT_INTERRUPTED
        raise
    if args.daemon:
        # A daemon's logs are best effort: one whose log reader went away
        # (``procurator master 2>&1 | head``) kept serving, and its exit
        # status is the service's. What its failed log writes left
        # buffered goes nowhere.
        discard_output()
    return code


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]
