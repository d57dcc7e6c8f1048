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
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

#: The environment variable every VMM is launched with (see ``launch_env``).
LAUNCH_MARKER = "PROCURATOR_VM_DIR"

__all__ = [
    "LAUNCH_MARKER",
    "find_by_argument_under",
    "find_launched",
    "is_alive",
    "launch_env",
    "pid_start_ticks",
    "signal_process",
    "spawn_detached",
    "spawn_orphan",
    "terminate",
    "wait_exit",
]


def pid_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it is gone
    (or a zombie: it has exited, only its exit status is left)."""
    found = _state_and_ticks(pid)
    if found is None or found[0] in ("Z", "X"):
        return None
    return found[1]


def _state_and_ticks(pid: int) -> tuple[str, int] | None:
    """(state letter, start ticks) of ``pid`` from ``/proc/<pid>/stat``."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces.
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])


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


# Starts "$@" in the background with its output appended to $1, prints its
# pid and exits: the command becomes a grandchild that init adopts.
_ORPHAN_SCRIPT = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'


def spawn_orphan(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> int:
    """Start ``argv`` in a new session as a process that is *not* our child
    (a shell forks it and exits, so init adopts it); return its pid.

    Use this for processes that must outlive the caller (VMMs): a child would
    need reaping by whoever spawned it and its ``Popen`` object must not be
    garbage-collected while it runs, neither of which holds once the worker
    restarts. An orphan is watched and reaped the same way whether this
    process started it or re-adopted it: by (pid, start ticks) and a pidfd.
    Raises ``OSError`` when the shell or the command cannot be started.
    """
    shell = subprocess.Popen(
        ["/bin/sh", "-c", _ORPHAN_SCRIPT, "sh", str(log_path), *argv],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
    )
    try:
        out, err = shell.communicate(timeout=30.0)
    except subprocess.TimeoutExpired:
        shell.kill()
        shell.communicate()
        raise OSError(f"could not start {argv[0]}: the launching shell hung") from None
    text = out.decode().strip()
    if shell.returncode != 0 or not text.isdigit():
        raise OSError(
            f"could not start {argv[0]}: shell exited with {shell.returncode}: "
            f"{err.decode(errors='replace').strip() or text}"
        )
    return int(text)


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
        found = _state_and_ticks(pid)
        if found is None or found[1] != start_ticks:
            return True
        # Only the pidfd says when the whole process is gone: a thread-group
        # leader shows as a zombie while its other threads still exit (and
        # still hold its files and locks).
        # poll(), not select(): fds above FD_SETSIZE (1024) are normal in a
        # worker with hundreds of VMs.
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if poller.poll(max(0.0, timeout) * 1000):
            _reap(pid)
            return True
        return False
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
    except ProcessLookupError:
        return False
    else:
        return True
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


def _processes_mentioning(text: str) -> Iterator[tuple[int, list[str]]]:
    """(pid, arguments) of every other live process whose command line
    contains ``text``; one pass over /proc."""
    encoded = text.encode()
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if encoded in cmdline:
            yield int(entry), cmdline.decode(errors="replace").split("\x00")


def _with_ticks(pids: Iterable[int]) -> list[tuple[int, int]]:
    """(pid, start ticks) of those still alive."""
    return [(pid, ticks) for pid in pids if (ticks := pid_start_ticks(pid)) is not None]


def find_by_argument_under(
    directory: Path, *, programs: Collection[str] = ()
) -> list[tuple[int, int]]:
    """(pid, start ticks) of every live process with an argument naming a
    path strictly inside ``directory`` (as a whole argument, or after ``=``)
    and, when ``programs`` is given, whose ``argv[0]`` has one of those file
    names (so an operator's shell in that directory is never matched).

    This finds helpers a killed worker left running, e.g. a ``nix-store
    --add-root <state>/gcroots/...`` that would create a GC root after the
    next worker decided which roots to keep.
    """
    prefix = str(directory).rstrip("/") + "/"
    return _with_ticks(
        pid
        for pid, args in _processes_mentioning(prefix)
        if (not programs or os.path.basename(args[0]) in programs)
        and any(arg.startswith(prefix) or f"={prefix}" in arg for arg in args)
    )


def launch_env(vm_dir: Path, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to launch a VMM for ``vm_dir`` with: ``env`` (or this
    process's) plus ``LAUNCH_MARKER=<vm_dir>``. The marker is how the worker
    recognises a VMM it launched but never recorded (``find_launched``):
    unlike a program's name it survives a wrapper script that ``exec``s the
    VMM, whatever the command line then says, and no bystander carries it."""
    return {**(os.environ if env is None else env), LAUNCH_MARKER: str(vm_dir)}


def find_launched(vm_dir: Path) -> list[tuple[int, int]]:
    """(pid, start ticks) of every live process launched for ``vm_dir`` by
    ``launch_env`` (and their children, which inherit the marker): a VMM
    whose handle was never recorded (the worker died between launching it
    and writing ``handles.json``), or a wrapper still waiting for it. An
    operator's ``curl --unix-socket`` or ``tail`` of the VM's files never
    matches. One pass over ``/proc/*/environ``."""
    entry = f"{LAUNCH_MARKER}={vm_dir}".encode()
    me = os.getpid()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        if entry in environ.split(b"\x00"):
            pids.append(int(name))
    return _with_ticks(pids)
