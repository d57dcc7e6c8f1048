"""The ``procurator`` command in a pipe (``procurator status | head``).

Every command behaves as a pipe-reading tool should: when the reader of
its output goes away, it ends quietly with exit status 141 (128 + SIGPIPE,
what a shell reports for a C tool killed by SIGPIPE), without a traceback.
Python ignores SIGPIPE, so a write to a closed pipe raises
``BrokenPipeError`` at the write, never in the middle of other work: a
command's effects (an apply stored by the master, certificates written) are
whole before it prints about them. ``main`` turns that error into 141
(``output_closed``, ``discard_output``, in ``procurator.cli.stdout``: no
trio, as ``main`` runs them for every command, ``--help`` too). Read-only
commands also watch their output while they wait (``run_reader``, here):
``events --follow | head -3`` ends as soon as ``head`` does, not at the
next event.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import stat
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from procurator.cli.stdout import reader_gone

__all__ = ["read_until_output_closed", "run_reader"]

T = TypeVar("T")


async def _until_output_closed() -> None:
    """Return when stdout is a pipe and its last reader closes it; sleep
    forever otherwise (a terminal, a file, captured output)."""
    try:
        fd = sys.stdout.fileno()
        pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (AttributeError, OSError, ValueError):  # no stdout, or not a real file
        pipe = False
    if not pipe:
        await trio.sleep_forever()
    # The write end of a pipe never becomes readable: epoll reports it only
    # with EPOLLERR, once no reader is left, and trio wakes a reader waiting
    # on it for that. The check after each wake-up keeps a stray one (a FIFO
    # opened read-write) from ending the command.
    while not reader_gone(fd):
        await trio.lowlevel.wait_readable(fd)
        if not reader_gone(fd):
            await trio.sleep(0.5)


async def run_reader(
    command: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int:
    """Run a read-only command, and stop it as soon as the reader of its
    output goes away (``read_until_output_closed``)."""
    return await read_until_output_closed(functools.partial(command, args))


async def read_until_output_closed(read: Callable[[], Awaitable[T]]) -> T:
    """Run ``read``, and stop it as soon as the reader of stdout goes away:
    ``events --follow | head -3`` ends when ``head`` does, even if no event
    follows; ``main`` reports it as ``EXIT_OUTPUT_CLOSED``. Only for reads,
    which a cancellation leaves nothing half done of: ``apply`` sends its
    request unwatched (it is always sent and answered, whatever becomes of
    its output) and watches only its ``--wait``."""

    async def watch() -> None:
        await _until_output_closed()
        raise BrokenPipeError(errno.EPIPE, "the reader of standard output went away")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        result = await read()
        nursery.cancel_scope.cancel()
    return result
