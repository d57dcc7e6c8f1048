"""Standard output whose reader went away (``procurator status | head``):
how ``main`` tells it from other errors and ends quietly (exit 141; the
why is in ``procurator.cli.pipes``). No trio here: ``main`` imports this
for every command, ``--help`` included."""

from __future__ import annotations

import os
import select
from collections.abc import Iterable

__all__ = ["discard_output", "output_closed", "reader_gone"]


def reader_gone(fd: int) -> bool:
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
        reader_gone(1) or reader_gone(2)
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
            if reader_gone(fd):
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)
