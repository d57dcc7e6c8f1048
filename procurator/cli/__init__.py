"""The ``procurator`` command: parsing, printing and exit statuses.

Each subcommand is a module of this package that registers its parser
(``add_parser``) and its handler: ``master`` and ``worker`` turn their
flags into a config and call their composition root (``procurator.app``);
``apply``, ``status``, ``describe``/``events`` (``ops``), ``top`` talk to a
master through ``procurator.rpc``; ``certs`` makes a fleet's certificates.
Flags several commands share (the master's address, TLS, logging, checked
numbers) are in ``args``.

Exit statuses are named in ``exits`` (0 done, 1 refused/invalid/
unreachable, 2 bad usage, 3-6 ``apply``'s outcomes, 130 interrupted, 141
the reader of the output went away) and listed in ``procurator --help``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
from collections.abc import Sequence

from procurator import __version__
from procurator.cli import apply, certs, master, ops, rollout, snapshot, status, top, worker
from procurator.cli.exits import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_OUTPUT_CLOSED,
)
from procurator.cli.pipes import discard_output, output_closed
from procurator.core.errors import ProcuratorError
from procurator.rpc.address import DEFAULT_PORT

__all__ = ["build_parser", "main"]

# Commands that run until stopped, logging; the rest print and end.
_DAEMONS = ("master", "worker")


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


def build_parser() -> argparse.ArgumentParser:
    """The ``procurator`` parser: every subcommand, its flags and help."""
    parser = argparse.ArgumentParser(
        prog="procurator",
        description="Declarative control plane for microVMs whose images are Nix store paths.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"procurator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (master, worker, apply, status):
        command.add_parser(sub)
    ops.add_parsers(sub)
    snapshot.add_parser(sub)
    rollout.add_parser(sub)
    top.add_parser(sub)
    certs.add_parser(sub)
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
    if args.command in _DAEMONS:
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
