"""OS process helpers shared by every VMM driver and the VmManager.

A VMM runs in its own session (``start_new_session``) so that neither a
worker crash nor a signal to the worker's process group reaches it. Because
the worker may restart, it cannot rely on being the VMM's parent: a process
is identified by (pid, start time in clock ticks since boot), read from
``/proc/<pid>/stat``, which a recycled pid cannot reproduce.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "is_alive",
    "pid_start_ticks",
    "signal_process",
    "spawn_detached",
    "terminate",
    "wait_exit",
]


def pid_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it is gone
    (or a zombie: it has exited, only its exit status is left)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def is_alive(pid: int, start_ticks: int) -> bool:
    """True when ``pid`` runs and is the same process that started at
    ``start_ticks`` (not a recycled pid)."""
    return pid > 0 and pid_start_ticks(pid) == start_ticks


def spawn_detached(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a new session with stdin closed and stdout/stderr
    appended to ``log_path``. The caller keeps the ``Popen`` only to reap the
    child; identity is (pid, start ticks)."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )


def wait_exit(pid: int, start_ticks: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the process to exit. Works for
    processes that are not our children (re-adopted VMMs) through a pidfd.
    Returns True once it is gone."""
    try:
        fd = os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return True
        raise
    try:
        # The pid could have been recycled between the caller's check and
        # pidfd_open; the pidfd now pins whatever runs, so re-check identity.
        if not is_alive(pid, start_ticks):
            return True
        readable, _, _ = select.select([fd], [], [], max(0.0, timeout))
        if readable:
            _reap(pid)
            return True
        return not is_alive(pid, start_ticks)
    finally:
        os.close(fd)


def _reap(pid: int) -> None:
    # Only our own children can be reaped; others are reaped by init.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def signal_process(pid: int, start_ticks: int, sig: signal.Signals) -> bool:
    """Send ``sig`` if the process is still the one we mean. Returns False
    when it was already gone."""
    try:
        fd = os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return False
        raise
    try:
        if not is_alive(pid, start_ticks):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(fd)


def terminate(pid: int, start_ticks: int, *, grace: float) -> None:
    """SIGTERM, wait ``grace`` seconds, then SIGKILL and wait for the end."""
    if signal_process(pid, start_ticks, signal.SIGTERM) and wait_exit(pid, start_ticks, grace):
        return
    if signal_process(pid, start_ticks, signal.SIGKILL):
        deadline = time.monotonic() + 10.0
        while not wait_exit(pid, start_ticks, 0.5) and time.monotonic() < deadline:
            pass
