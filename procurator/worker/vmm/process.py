"""Process mechanics shared by every VMM driver and the VmManager, once.

A VMM runs in its own session (``start_new_session``) so that neither a
worker crash nor a signal to the worker's process group reaches it. Because
the worker may restart, it cannot rely on being the VMM's parent: a process
is identified by (pid, start time in clock ticks since boot), read from
``/proc/<pid>/stat``, which a recycled pid cannot reproduce, and waited for
through a pidfd.

What lives here, for both drivers:

- ``launch_detached``: start a VMM as an orphan (not our child, so one the
  worker started and one it re-adopted are watched, signalled and reaped
  the same way), in its own session, with the launch marker in its
  environment (``launch_env``; ``find_launched`` finds what it marks);
- ``wait_for_api``: wait until a VMM just launched answers on its API
  socket (or exits, or runs out of time) without polling: asleep until
  the VMM's pidfd (its exit) or a watch on the socket's directory in the
  process's one inotify instance (the socket's creation) wakes it, so a
  start costs a few wake-ups whatever the VMM takes to bind (see "Waiting
  for the API" below);
- ``abort_launch``: stop a VMM whose launch failed;
- ``remove_stale_socket``: remove an API socket no live VMM serves;
- ``log_tail``: the last lines of a VMM's output, for error details;
- signals, waits and identity checks (``terminate``, ``wait_exit``, ...),
  and ``ExitWatch``: a VMM's pidfd, watched by its manager's one
  ``ExitWatcher`` (below).

Exits without a descriptor per waiter (issue 31): a supervisor holds its
VMM's pidfd (the one descriptor a settled VM costs the worker: it tells the
exit without polling, also of a VMM re-adopted after a worker restart,
which is not the worker's child) and sleeps on a ``threading.Event``, not
on descriptors. One ``ExitWatcher`` per manager, a thread in
``epoll_wait`` over every watched pidfd (one-shot: a pidfd stays readable
once its process exited), sets the VM's event when its VMM exits; callers
set the same event for a new request. The watcher's only descriptors are
its epoll and the eventfd that stops it, whatever the fleet.

Waiting for the API (issue 31: the worker's CPU per start): a VMM binds its
socket some time after it starts (tens of ms; a second and more for a
jailed VMM under load), and the old wait asked every 2-5 ms whether it had,
reading ``/proc`` each round: the largest part of a launch's own CPU (3.1
of 4.1 ms of the launching thread, and more the later a VMM binds). Now
the wait sleeps on an event until the kernel says something happened: the
pidfd turns readable when the VMM exits, the inotify watch on the socket's
directory when a file is created or moved in there (a watch is on the
directory's inode, so a jailed VMM binding through its bind mount is seen
too). The watch (and the pidfd) is set only when the first look finds
no socket or the first probe no answer, and a look follows it before any
sleep, so a socket bound in between is found by that look, never missed;
a VMM that answers at the first look (the usual jailed launch: the
jailer's round trip outlasts the VMM's bind) costs neither, nor the
``vmm-launches`` thread the wake-up that a watch's removal (its
``IN_IGNORED``) gives it: a hand-off per start (issue 31, target 2).

One inotify instance for the process, never one per launch (issue 31,
target 5): closing an inotify instance waits for an SRCU grace period
(~8 ms of wall time, up to 25, for 59 us of CPU), which each start paid
on its supervisor's thread. ``_LaunchWatches`` keeps one instance, made
by the first launch and never closed, and one ``ExitWatcher`` thread
(``vmm-launches``) that reads it and the launching VMMs' pidfds and sets
the waiting launch's event. A launch adds a watch on its socket's
directory (the kernel keeps one per inode: launches waiting on the same
directory share it, each woken by any file made there, to look again)
and the last one waiting on it removes it (``inotify_rm_watch`` does not
wait: the kernel frees the mark later). A directory removed during the
wait takes its watch with it (``IN_IGNORED``): its launches are woken and
look at ``API_POLL``'s pace from then on. Drivers call ``wait_for_api``
without their manager, so the instance is the process's, not a
``VmManager``'s (a worker runs one manager); it costs three descriptors
(the instance, the thread's epoll and eventfd) whatever the fleet, and a
launch holds one, its VMM's pidfd, while it waits. What no event tells:
when a socket that exists starts *listening* (bind and listen are two
calls) or answers, so after a refused or unanswered probe the wait retries
at ``API_POLL``'s pace, still woken at once by an exit. Where no watch can
be had (``inotify_init1`` out of instances, tried again by the next
launch; the directory not made yet; out of watches) or no pidfd (out of
descriptors), the wait polls at that pace too: slower, never wrong.

Locks: ``_LaunchWatches._shared_lock`` (making the instance),
``_LaunchWatches._lock`` (its watches and their waiters) and
``ExitWatcher._lock`` are never held together; ``_Inotify._lock`` (loading
the C library's functions) is the innermost, taken under the first two.
Under ``_LaunchWatches._lock`` only inotify calls are made (none waits)
and waiters' events set; under ``_shared_lock`` the instance and its
thread are made.

``/proc/<pid>/stat`` is read with one ``os.read`` on a descriptor opened
for it (no ``pathlib``, no text decoding): identity checks run on every
health check of every VM.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import select
import signal
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from procurator.core.backoff import RestartPolicy
from procurator.worker.vmm.base import VmmError, VmmGone, VmmHandle, VmmRejected, VmmTimeout

#: The environment variable every VMM is launched with (see ``launch_env``).
LAUNCH_MARKER = "PROCURATOR_VM_DIR"

__all__ = [
    "API_POLL",
    "LAUNCH_MARKER",
    "ExitWatch",
    "ExitWatcher",
    "abort_launch",
    "find_by_argument_under",
    "find_launched",
    "is_alive",
    "kill_unrecorded",
    "launch_detached",
    "launch_env",
    "log_size",
    "log_tail",
    "pid_start_ticks",
    "remove_stale_socket",
    "signal_process",
    "terminate",
    "wait_exit",
    "wait_for_api",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: How soon a VMM just launched is asked again when its socket exists but
#: did not answer (or when no inotify watch could be had): 2 ms doubling to
#: 5 ms (a start's latency is on every VM's path; a failed connect to a
#: socket not yet listening costs microseconds).
API_POLL = RestartPolicy(initial_delay=0.002, multiplier=2.0, max_delay=0.005)
#: How long a VMM whose launch failed gets to exit on SIGTERM.
_ABORT_GRACE = 2.0


def pid_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it is gone
    (or a zombie: it has exited, only its exit status is left)."""
    found = _state_and_ticks(pid)
    if found is None or found[0] in ("Z", "X"):
        return None
    return found[1]


def _state_and_ticks(pid: int) -> tuple[str, int] | None:
    """(state letter, start ticks) of ``pid`` from ``/proc/<pid>/stat``:
    one open and one read (the file is a few hundred bytes, generated whole
    on the first read), half the cost of ``Path.read_text``."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:  # ESRCH: it was reaped between the open and the read
        return None
    finally:
        os.close(fd)
    # The command name (field 2) is in parentheses and may hold spaces
    # (and parentheses): the fields after it start after the last ")".
    fields = data[data.rindex(b")") + 1 :].split()
    return fields[0].decode(), int(fields[19])


def is_alive(pid: int, start_ticks: int) -> bool:
    """True when ``pid`` runs and is the same process that started at
    ``start_ticks`` (not a recycled pid)."""
    return pid > 0 and pid_start_ticks(pid) == start_ticks


# Starts "$@" in the background with its output appended to $1, prints its
# pid and exits: the command becomes a grandchild that init adopts.
_ORPHAN_SCRIPT = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'


def launch_detached(
    argv: Sequence[str],
    *,
    vm_dir: Path,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[int, int]:
    """Start ``argv`` for the VM of ``vm_dir`` in a new session as a process
    that is *not* our child (a shell forks it and exits, so init adopts it),
    with ``launch_env(vm_dir, env)``, stdin closed and its output appended
    to ``log_path``; return its (pid, start ticks).

    Not a child because a VMM must outlive the worker: a child would need
    reaping by whoever spawned it, which does not hold once the worker
    restarts. Raises ``VmmError`` when it cannot be started (the program is
    missing, the shell hung) or exits at once (with the log's tail)."""
    text = _run_orphan_shell(argv, vm_dir=vm_dir, log_path=log_path, env=env, cwd=cwd)
    pid = int(text)
    ticks = pid_start_ticks(pid)
    if ticks is None:
        raise VmmGone(f"{argv[0]!r} for {vm_dir} exited at once", details=log_tail(log_path))
    return pid, ticks


def _run_orphan_shell(
    argv: Sequence[str],
    *,
    vm_dir: Path,
    log_path: Path,
    env: Mapping[str, str] | None,
    cwd: Path | None,
) -> str:
    """Run the shell that starts ``argv`` in the background; its output
    (the orphan's pid)."""
    name = argv[0]
    try:
        shell = subprocess.Popen(
            ["/bin/sh", "-c", _ORPHAN_SCRIPT, "sh", str(log_path), *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            env=launch_env(vm_dir, env),
            cwd=cwd,
        )
        out, err = shell.communicate(timeout=30.0)
    except subprocess.TimeoutExpired:
        shell.kill()
        shell.communicate()
        raise VmmError(f"cannot start {name!r} for {vm_dir}: the launching shell hung") from None
    except OSError as exc:
        raise VmmError(f"cannot start {name!r} for {vm_dir}: {exc}") from exc
    text = out.decode().strip()
    if shell.returncode != 0 or not text.isdigit():
        raise VmmError(
            f"cannot start {name!r} for {vm_dir}: shell exited with {shell.returncode}: "
            f"{err.decode(errors='replace').strip() or text}"
        )
    return text


def wait_for_api(
    handle: VmmHandle,
    probe: Callable[[float], _T],
    *,
    deadline: float,
    who: str,
    logs: Sequence[tuple[Path, int]] = (),
) -> _T:
    """``probe(timeout)``'s answer once the VMM of ``handle``, just
    launched, answers on its API socket. Asks only once the socket exists,
    sleeping until the kernel tells of the VMM's exit or of a new file in
    the socket's directory (see "Waiting for the API" above); while
    ``probe`` raises ``VmmGone`` or ``VmmTimeout`` (bound, not listening
    or not answering yet), asks again at ``API_POLL``'s pace.
    Raises ``VmmGone`` if the VMM exits first and ``VmmTimeout`` at
    ``deadline`` (``time.monotonic()``), both with the tails of ``logs``
    ((path, offset) pairs) as details."""
    last: VmmError | None = None
    unanswered = 0  # probes refused or unanswered so far
    with _LaunchWatch(handle) as watch:
        while True:
            if not watch.alive():
                raise VmmGone(
                    f"{who} (pid {handle.pid}) exited before its API answered",
                    details=_tails(logs),
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VmmTimeout(
                    f"{who} (pid {handle.pid}) did not answer on {handle.api_socket}"
                    + (f": {last.message}" if last is not None else ""),
                    details=_tails(logs),
                )
            if os.path.exists(handle.api_socket):
                try:
                    return probe(min(remaining, 1.0))
                except (VmmGone, VmmTimeout) as exc:
                    last = exc
                unanswered += 1
                # No event says when a bound socket starts listening.
                pause = API_POLL.delay(unanswered)
            elif not watch.armed:
                # Something to wait for: the watch set, look again before
                # sleeping on it (a socket bound from now on wakes the wait).
                watch.arm()
                continue
            elif watch.wakes_for_both:
                pause = remaining  # until it exits or the socket appears
            else:
                unanswered += 1
                pause = API_POLL.delay(unanswered)
            watch.arm()  # the pause ends at once if the VMM exits meanwhile
            watch.wait(min(pause, max(0.0, deadline - time.monotonic())))


#: inotify(7) constants (<sys/inotify.h>): a file created in, or moved
#: into, the watched directory, which must be one; the watch is gone (its
#: directory was removed, or the watch was); the queue overflowed.
_IN_CREATE = 0x00000100
_IN_MOVED_TO = 0x00000080
_IN_ONLYDIR = 0x01000000
_IN_IGNORED = 0x00008000
_IN_Q_OVERFLOW = 0x00004000
#: struct inotify_event's fixed part: wd, mask, cookie, len (then len bytes
#: of name).
_EVENT_HEADER = struct.Struct("iIII")


class _Inotify:
    """``inotify_init1``, ``inotify_add_watch`` and ``inotify_rm_watch``
    from the C library (Python has no binding of its own), loaded on first
    use."""

    _lock = threading.Lock()
    _libc: ctypes.CDLL | None = None

    @classmethod
    def instance(cls) -> int:
        """A new non-blocking inotify descriptor. Raises ``OSError``."""
        fd = int(cls._load().inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_init1: {os.strerror(code)}")
        return fd

    @classmethod
    def watch_creations(cls, fd: int, directory: str) -> int:
        """Add (or find: one watch per inode and instance) the watch of
        ``fd`` on files created in or moved into ``directory``; its watch
        descriptor. Raises ``OSError``."""
        mask = _IN_CREATE | _IN_MOVED_TO | _IN_ONLYDIR
        wd = int(cls._load().inotify_add_watch(fd, os.fsencode(directory), mask))
        if wd < 0:
            code = ctypes.get_errno()
            raise OSError(code, f"inotify_add_watch: {os.strerror(code)}", directory)
        return wd

    @classmethod
    def remove(cls, fd: int, wd: int) -> None:
        """Remove watch ``wd`` (quietly when the kernel removed it already:
        its directory is gone)."""
        cls._load().inotify_rm_watch(fd, wd)

    @classmethod
    def _load(cls) -> ctypes.CDLL:
        with cls._lock:
            if cls._libc is None:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.inotify_init1.argtypes = [ctypes.c_int]
                libc.inotify_init1.restype = ctypes.c_int
                libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
                libc.inotify_add_watch.restype = ctypes.c_int
                libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
                libc.inotify_rm_watch.restype = ctypes.c_int
                cls._libc = libc
            return cls._libc


class _LaunchWatches:
    """What every launch of this process sleeps on: one inotify instance
    whose watches (one per socket directory being waited on, shared by the
    launches waiting on it) set the waiting launches' events, and one
    ``ExitWatcher`` thread that reads it and sets a launch's event when its
    VMM exits (see "Waiting for the API" above). Made on first use and kept
    for the process: closing an inotify instance waits for an SRCU grace
    period, the very wait this saves each launch.

    Thread-safe. Lock: ``_lock`` guards ``_waiters`` and the instance's
    watches (added and removed under it, so an event read by the thread is
    looked up after its watch's waiters were recorded); under it only
    inotify calls are made (``_Inotify._lock`` nests inside) and the
    waiters' events set (``Event``'s own lock is innermost). The
    ``ExitWatcher``'s lock is never held with it."""

    _shared_lock = threading.Lock()  # guards making _shared (module docstring: Locks)
    _shared: _LaunchWatches | None = None

    @classmethod
    def shared(cls) -> _LaunchWatches | None:
        """The process's one ``_LaunchWatches``, made on first use; None
        when it cannot be had (out of inotify instances or descriptors:
        tried again by the next launch)."""
        with cls._shared_lock:
            if cls._shared is None:
                try:
                    cls._shared = _LaunchWatches()
                except OSError as exc:
                    log.debug("no inotify instance (%s): launches poll for their sockets", exc)
            return cls._shared

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: watch descriptor -> the events of the launches waiting on it
        self._waiters: dict[int, set[threading.Event]] = {}
        self._inotify = _Inotify.instance()
        try:
            self.exits = ExitWatcher(name="vmm-launches")
            self.exits.add(self._inotify, self._dispatch, once=False)
        except BaseException:
            os.close(self._inotify)
            raise

    def watch(self, directory: str, wake: threading.Event) -> int:
        """Set ``wake`` whenever a file is created in or moved into
        ``directory``; the watch descriptor to ``unwatch`` with. Raises
        ``OSError`` (no such directory, out of watches)."""
        with self._lock:
            wd = _Inotify.watch_creations(self._inotify, directory)
            self._waiters.setdefault(wd, set()).add(wake)
        return wd

    def watching(self, wd: int, wake: threading.Event) -> bool:
        """Whether ``wake`` is still set by watch ``wd`` (not when the
        kernel dropped the watch: its directory was removed)."""
        with self._lock:
            return wake in self._waiters.get(wd, ())

    def unwatch(self, wd: int, wake: threading.Event) -> None:
        """Stop setting ``wake`` for ``wd``; the last launch waiting on a
        directory removes its watch (which, unlike closing the instance,
        does not wait: the kernel frees the mark later)."""
        with self._lock:
            waiters = self._waiters.get(wd)
            if waiters is None or wake not in waiters:
                return  # dropped by the kernel (IN_IGNORED) already
            waiters.discard(wake)
            if not waiters:
                del self._waiters[wd]
                _Inotify.remove(self._inotify, wd)

    def _dispatch(self) -> None:
        """On the ``ExitWatcher``'s thread: read every queued event and set
        the events of the launches waiting on its directory (all of them
        when the queue overflowed). What an event names does not matter: a
        woken launch looks for its socket again."""
        found: dict[int, int] = {}  # wd -> masks seen
        with contextlib.suppress(BlockingIOError):
            while data := os.read(self._inotify, 65536):
                offset = 0
                while offset < len(data):
                    wd, mask, _, size = _EVENT_HEADER.unpack_from(data, offset)
                    offset += _EVENT_HEADER.size + size
                    found[wd] = found.get(wd, 0) | mask
        with self._lock:
            if any(mask & _IN_Q_OVERFLOW for mask in found.values()):
                found = dict.fromkeys(self._waiters, 0) | found
            for wd, mask in found.items():
                # IN_IGNORED: the kernel removed the watch (the directory
                # is gone, or unwatch removed it: then none wait on it).
                waiters = (
                    self._waiters.pop(wd, set())
                    if mask & _IN_IGNORED
                    else self._waiters.get(wd, ())
                )
                for wake in waiters:
                    wake.set()


class _LaunchWatch:
    """What ``wait_for_api`` sleeps on for one VMM: an event that the
    process's ``_LaunchWatches`` sets when the VMM's pidfd turns readable
    (the whole process exited) and when a file is created in its socket's
    directory. Either may be missing (a process that is already gone has
    no pidfd; a directory that cannot be watched has no watch): then
    ``/proc`` and ``API_POLL``'s pace stand in for them. Set up by ``arm``,
    only once there is something to wait for (the first look found no
    socket, or the first probe no answer): a VMM that answers at the first
    look costs no pidfd, no watch and no wake-up of the ``vmm-launches``
    thread (removing a watch queues ``IN_IGNORED``, which that thread wakes
    to read). A context manager: on the way out the watch is removed and
    the pidfd closed, the one descriptor a launch holds."""

    def __init__(self, handle: VmmHandle) -> None:
        self._handle = handle
        self._wake = threading.Event()
        self._pidfd = -1
        self._watches: _LaunchWatches | None = None
        self._exit_watched = False
        self._wd = -1
        self.armed = False

    @property
    def wakes_for_both(self) -> bool:
        """Whether ``wait`` wakes both for the VMM's exit and for a socket
        created in the directory (so it may sleep until either happens)."""
        watches = self._watches
        return (
            watches is not None
            and self._exit_watched
            and self._wd >= 0
            and watches.watching(self._wd, self._wake)
        )

    def __enter__(self) -> _LaunchWatch:
        return self

    def arm(self) -> None:
        """Open the VMM's pidfd and set the watch (once; idempotent)."""
        if self.armed:
            return
        self.armed = True
        handle = self._handle
        try:
            try:
                self._pidfd = os.pidfd_open(handle.pid)
            except ProcessLookupError:
                pass  # gone already: alive() says so from /proc
            except OSError as exc:  # out of descriptors: /proc at API_POLL's pace
                log.debug("no pidfd for pid %s (%s): polling for its exit", handle.pid, exc)
            self._watches = watches = _LaunchWatches.shared()
            if watches is None:
                return
            if self._pidfd >= 0:
                try:
                    watches.exits.add(self._pidfd, self._wake.set)
                except OSError as exc:  # out of epoll watches
                    log.debug("cannot watch pid %s's exit (%s): polling", handle.pid, exc)
                else:
                    self._exit_watched = True
            directory = os.path.dirname(handle.api_socket) or "."
            try:
                self._wd = watches.watch(directory, self._wake)
            except OSError as exc:
                log.debug("no inotify watch on %s (%s): polling for its socket", directory, exc)
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def alive(self) -> bool:
        """Whether the VMM runs: ``/proc`` says it is the process launched
        (not a zombie, not a recycled pid: the pidfd, opened after the
        launch, could name a successor) and its pidfd has not turned
        readable (a leader whose other threads still run is a zombie in
        ``/proc`` already; either way it will not answer)."""
        if not is_alive(self._handle.pid, self._handle.pid_start_ticks):
            return False
        return self._pidfd < 0 or not _readable(self._pidfd)

    def wait(self, timeout: float) -> None:
        """Until the VMM exits, a file appears in the watched directory, or
        ``timeout`` seconds pass (the caller looks for the socket again:
        what woke it does not matter; a wake after the clear is kept)."""
        if self._wake.wait(max(0.0, timeout)):
            self._wake.clear()

    def close(self) -> None:
        watches = self._watches
        if watches is not None:
            if self._wd >= 0:
                watches.unwatch(self._wd, self._wake)
            if self._exit_watched:
                watches.exits.remove(self._pidfd)
        self._wd = -1
        self._exit_watched = False
        if self._pidfd >= 0:
            os.close(self._pidfd)
        self._pidfd = -1


def _readable(fd: int) -> bool:
    """Whether ``fd`` polls readable now (a pidfd: its process exited)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def abort_launch(handle: VmmHandle, *, grace: float = _ABORT_GRACE) -> None:
    """Stop a VMM whose launch failed: SIGTERM, ``grace`` seconds, SIGKILL.
    It has no running guest yet: there is nothing to save, only to stop.
    (Its socket is the driver's to clear: only the driver can tell it from
    one another live VMM still serves.)"""
    terminate(handle.pid, handle.pid_start_ticks, grace=grace)


def remove_stale_socket(path: Path, *, lock_file: Path | None = None) -> None:
    """Remove the API socket at ``path``, which no live VMM of ours serves.
    ``lock_file``: a file the VMM holds a flock on while it runs
    (cloud-hypervisor >= v53 locks ``<socket>.lock``): if it is held, a live
    VMM we do not know of owns the socket and it stays (``VmmError``). A
    path that is not a socket is not ours to remove (``VmmRejected``)."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise VmmError(f"cannot inspect {path}: {exc}") from exc
    if not stat.S_ISSOCK(mode):
        raise VmmRejected(f"{path} exists and is not a socket; move it away")
    fd = -1
    if lock_file is not None:
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(lock_file, os.O_RDWR | os.O_CLOEXEC)
    try:
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise VmmError(
                        f"API socket {path} is held by a live VMM that no handle records "
                        f"(its {lock_file.name if lock_file else ''} is locked)"
                    ) from None
                raise VmmError(f"cannot lock {lock_file}: {exc}") from exc
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            log.info("removed stale API socket %s", path)
    finally:
        if fd >= 0:
            os.close(fd)


def log_tail(path: Path, *, since: int = 0, limit: int = 4096, lines: int = 10) -> tuple[str, ...]:
    """The last ``lines`` non-empty lines a VMM wrote to ``path`` since
    offset ``since`` (at most ``limit`` bytes read), each prefixed with the
    file's name; empty when it cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            end = f.tell()
            f.seek(max(since, end - limit))
            text = f.read().decode(errors="replace")
    except OSError:
        return ()
    kept = [line for line in text.splitlines() if line.strip()][-lines:]
    return tuple(f"{path.name}: {line}" for line in kept)


def _tails(logs: Sequence[tuple[Path, int]]) -> tuple[str, ...]:
    return tuple(line for path, since in logs for line in log_tail(path, since=since))


def log_size(path: Path) -> int:
    """The size of ``path`` now (0 if absent): where a new launch's output
    will start."""
    try:
        return path.stat().st_size
    except OSError:
        return 0


def wait_exit(pid: int, start_ticks: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the process to exit. Works for
    processes that are not our children (re-adopted VMMs) through a pidfd.
    Returns True once it is gone."""
    fd = _pidfd(pid)
    if fd is None:
        return True
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


def _pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``, or None when no such process exists."""
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return None
        raise


def _reap(pid: int) -> None:
    # Only our own children can be reaped; others are reaped by init.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def signal_process(pid: int, start_ticks: int, sig: signal.Signals) -> bool:
    """Send ``sig`` if the process is still the one we mean. Returns False
    when it was already gone."""
    fd = _pidfd(pid)
    if fd is None:
        return False
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
    """SIGTERM, wait ``grace`` seconds, then SIGKILL and wait for the end:
    the whole process, not only what ``/proc`` says. A process whose
    leader already exited (a zombie, so no signal is sent) may still run
    other threads that hold its files (a VMM's socket lock) until the pidfd
    says it is gone; returning before that would leave the next launch to
    find the socket held."""
    signalled = signal_process(pid, start_ticks, signal.SIGTERM)
    if wait_exit(pid, start_ticks, grace if signalled else max(grace, 1.0)):
        return
    # SIGKILL reaches the whole thread group, a zombie leader's too.
    _kill_group(pid, start_ticks)
    deadline = time.monotonic() + 10.0
    while not wait_exit(pid, start_ticks, 0.5) and time.monotonic() < deadline:
        pass


def _kill_group(pid: int, start_ticks: int) -> None:
    """SIGKILL the process ``pid`` started at ``start_ticks``, even when its
    leader is a zombie whose other threads still run."""
    fd = _pidfd(pid)
    if fd is None:
        return
    try:
        found = _state_and_ticks(pid)
        if found is not None and found[1] == start_ticks:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)


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


def kill_unrecorded(vm_dir: Path, *, grace: float) -> None:
    """Stop every process launched for ``vm_dir`` (``find_launched``):
    SIGTERM, ``grace`` seconds, SIGKILL."""
    for pid, ticks in find_launched(vm_dir):
        log.warning("killing VMM pid %s of %s that no handle recorded", pid, vm_dir)
        terminate(pid, ticks, grace=grace)


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


class ExitWatcher:
    """One thread in ``epoll_wait`` over many VMMs' pidfds: when one turns
    readable (its process exited), the wake registered with it is called,
    once (``EPOLLONESHOT``: an exited process's pidfd stays readable).
    Thread-safe. Lock: ``_lock`` guards ``_wakes`` only, a leaf never held
    while a wake is called (a wake takes the VM record's condition lock).

    A wake may come late for a pidfd just removed, or reach the VM that
    reuses its number (the number is looked up after ``epoll_wait``
    returned): wakes are only ever spurious, never lost, and a woken
    supervisor looks for itself."""

    def __init__(self, *, name: str = "vmm-exits") -> None:
        self._lock = threading.Lock()
        self._wakes: dict[int, Callable[[], None]] = {}
        self._epoll = select.epoll()
        try:
            self._stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except BaseException:
            self._epoll.close()
            raise
        self._epoll.register(self._stop, select.EPOLLIN)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, pidfd: int, wake: Callable[[], None], *, once: bool = True) -> None:
        """Call ``wake`` once when ``pidfd``'s process exits (at once if it
        has). Raises ``OSError`` (``ENOMEM``, ``ENOSPC``: out of watches).
        ``once=False``: for another kind of descriptor, call ``wake``
        (on this thread) whenever it is readable; ``wake`` must drain it."""
        with self._lock:
            self._wakes[pidfd] = wake
        try:
            self._epoll.register(pidfd, select.EPOLLIN | (select.EPOLLONESHOT if once else 0))
        except BaseException:
            with self._lock:
                self._wakes.pop(pidfd, None)
            raise

    def remove(self, pidfd: int) -> None:
        """Stop watching ``pidfd`` (before the caller closes it)."""
        with self._lock:
            self._wakes.pop(pidfd, None)
        with contextlib.suppress(OSError, ValueError):  # not registered; closed watcher
            self._epoll.unregister(pidfd)

    def close(self) -> None:
        """End the thread and close the epoll (the pidfds are their owners')."""
        with contextlib.suppress(OSError):
            os.eventfd_write(self._stop, 1)
        self._thread.join()
        self._epoll.close()
        os.close(self._stop)

    def _run(self) -> None:
        while True:
            events = self._epoll.poll()  # EINTR is retried by Python (PEP 475)
            for fd, _ in events:
                if fd == self._stop:
                    return
                with self._lock:
                    wake = self._wakes.get(fd)
                if wake is not None:
                    wake()


class ExitWatch:
    """A supervisor's watch on its VMM: the pidfd (the one descriptor a
    settled VM costs the worker), registered with the manager's
    ``ExitWatcher`` to call ``wake`` (the VM record's) when the VMM exits.

    poll(), not select(), for ``alive``: a worker with a few hundred VMs has
    fds above FD_SETSIZE (1024), which select() cannot watch (a poll object
    holds no descriptor)."""

    def __init__(self, watcher: Callable[[], ExitWatcher], wake: Callable[[], None]) -> None:
        self.pidfd = -1
        self._watcher = watcher
        self._watching: ExitWatcher | None = None
        self._wake = wake
        self._exit: select.poll | None = None  # the pidfd alone

    def open(self, handle: VmmHandle) -> bool:
        """Watch ``handle``'s process; False when it is already gone."""
        self.close()
        try:
            self.pidfd = os.pidfd_open(handle.pid)
        except ProcessLookupError:
            return False
        if not is_alive(handle.pid, handle.pid_start_ticks):
            # The VMM exited and its pid was taken before the pidfd was
            # opened: the pidfd names another process. /proc tells the truth.
            self.close()
            return False
        self._exit = select.poll()
        self._exit.register(self.pidfd, select.POLLIN)
        watcher = self._watcher()
        try:
            watcher.add(self.pidfd, self._wake)
        except BaseException:
            # Out of epoll watches (ENOSPC) fails like a pidfd_open out of
            # descriptors (EMFILE): raised, with no descriptor kept.
            self.close()
            raise
        self._watching = watcher
        return True

    def alive(self) -> bool | None:
        """Whether the watched process runs (the pidfd turns readable when
        it exits: one poll(2) instead of reading /proc); None without one."""
        return None if self._exit is None else not self._exit.poll(0)

    def close(self) -> None:
        self._exit = None
        if self._watching is not None:
            self._watching.remove(self.pidfd)
            self._watching = None
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
