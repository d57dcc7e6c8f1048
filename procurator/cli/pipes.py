"""The ``procurator`` command in a pipe (``procurator status | head``).

Every command behaves as a pipe-reading tool should: when the reader of
its output goes away, it ends quietly with exit status 141 (128 + SIGPIPE,
what a shell reports for a C tool killed by SIGPIPE), without a traceback.
Python ignores SIGPIPE, so a write to a closed pipe raises
``BrokenPipeError`` at the write, never in the middle of other work: a
command's effects (an apply stored by the master, certificates written) are
whole before it prints about them. ``main`` turns that error into 141
(``output_closed``, ``discard_output``). Read-only commands also watch their
output while they wait (``run_reader``): ``events --follow | head -3`` ends
as soon as ``head`` does, not at the next event.
"""

from __future__ import annotations

import argparse
import errno
import functools
import os
import select
import stat
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import trio

__all__ = ["discard_output", "output_closed", "read_until_output_closed", "run_reader"]

T = TypeVar("T")


def _reader_gone(fd: int) -> bool:
    """Whether ``fd`` is a pipe (or socket, or terminal) whose other end
    is closed. ``poll`` reports that (POLLERR for a pipe without readers,
    POLLHUP for a socket or a hung-up terminal) whatever events are asked
    for; a file, ``/dev/null`` or a closed descriptor never shows it."""
    poller = select.poll()
    poller.register(fd, 0)
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in poller.poll(0))


def output_closed(errors: Iterable[BaseException]) -> bool:
    """Whether ``errors`` (the leaves of what ended a command) mean that the
    reader of our output went away: a ``BrokenPipeError`` among them, and
    stdout or stderr now without a reader. A broken pipe anywhere else (a
    socket of ours) is a bug to show, not a reader to ignore."""
    return any(isinstance(e, BrokenPipeError) for e in errors) and (
        _reader_gone(1) or _reader_gone(2)
    )


def discard_output() -> None:
    """Point stdout and stderr, where their reader went away, at /dev/null.

    Python flushes them once more at exit; into a closed pipe that flush
    would fail, print "Exception ignored ... BrokenPipeError" and turn the
    exit status into 120. Whatever is still buffered goes nowhere instead:
    no one is left to read it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            if _reader_gone(fd):
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


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
    while not _reader_gone(fd):
        await trio.lowlevel.wait_readable(fd)
        if not _reader_gone(fd):
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
