"""What both daemons' processes do alike: run until SIGTERM or SIGINT, take
the open-file limit they are allowed, and split a ``HOST:PORT`` listen
address."""

from __future__ import annotations

import contextlib
import logging
import resource
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from procurator.core.errors import ValidationError

__all__ = ["host_port", "raise_open_file_limit", "run_until_signalled"]

logger = logging.getLogger(__name__)

C = TypeVar("C")


def run_until_signalled(run: Callable[[C], Awaitable[None]], config: C) -> None:
    """``trio.run(run, config)`` until SIGTERM or SIGINT cancels it: a
    daemon shuts down in order (its ``finally`` blocks run) either way."""

    async def until_signalled() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                nursery.start_soon(run, config)
                async for signum in signals:
                    logger.info("received %s; shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    break

    trio.run(until_signalled)


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one (often 1024 -> 524288:
    a daemon's descriptors grow with its connections or VMs, and EMFILE
    fails whatever needs one next) and return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


def host_port(text: str) -> tuple[str, int]:
    """``("10.0.0.5", 9301)`` from ``10.0.0.5:9301`` (``[::1]:9301`` for
    IPv6; an empty host means every address, ``0.0.0.0``)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValidationError(f"expected HOST:PORT, not {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port)
