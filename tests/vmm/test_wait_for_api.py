"""``process.wait_for_api`` against real processes and real unix sockets:
it sleeps on an event that the process's one inotify instance (a watch on
the socket's directory) and its VMM's pidfd set, so it must wake for the
socket (created, or moved in already listening), for the VMM's exit, and
for a socket that starts listening late, must not wake while nothing
happens, and must share that instance between launches (closing one costs
an SRCU grace period: ~8 ms a launch) without leaving a watch behind.

The "VMM" is a real child process (``sleep``); the socket is made by the
test itself, at a moment it chooses: once the waiting thread sleeps in the
wait (its Python frame in ``Condition.wait``, its thread in futex(2), read
from ``/proc/self/task/<tid>/syscall``), so the socket is created after
the watch is set and the first look, and only the watch can report it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from procurator.worker.vmm import process
from procurator.worker.vmm.base import VmmGone, VmmHandle, VmmTimeout

#: futex(2) on x86_64 (where a thread sleeps on a ``threading.Event``).
_SYS_FUTEX = 202
#: Deadlines long enough that only a missed event, never a slow machine,
#: can make a wait reach them.
_LONG = 60.0


@pytest.fixture
def vmm() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def _handle(proc: subprocess.Popen[bytes], sock: Path) -> VmmHandle:
    ticks = process.pid_start_ticks(proc.pid)
    assert ticks is not None
    return VmmHandle("test", proc.pid, ticks, str(sock))


class _Waiter:
    """``wait_for_api`` running in a thread; ``probes`` counts the probes."""

    def __init__(self, handle: VmmHandle, probe: Callable[[float], str], deadline: float) -> None:
        self.probes = 0
        self.result: str | BaseException | None = None
        self.tid = 0
        self._started = threading.Event()

        def counted(timeout: float) -> str:
            self.probes += 1
            return probe(timeout)

        def run() -> None:
            self.tid = threading.get_native_id()
            self._started.set()
            try:
                self.result = process.wait_for_api(
                    handle, counted, deadline=deadline, who="the VMM"
                )
            except BaseException as exc:
                self.result = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        self._started.wait()

    def _task(self, name: str) -> str:
        return Path(f"/proc/self/task/{self.tid}/{name}").read_text()

    def asleep(self) -> None:
        """Until the thread sleeps in the wait: its Python frame in
        ``Condition.wait`` (reached after the watch was set and the socket
        looked for) and the thread in futex(2), not running."""
        while True:
            assert self.thread.is_alive(), f"the wait ended early: {self.result!r}"
            frame = sys._current_frames().get(self.thread.ident or 0)
            if (
                frame is not None
                and frame.f_code.co_name == "wait"
                and frame.f_code.co_filename == threading.__file__
                and self._task("syscall").split()[0] == str(_SYS_FUTEX)
            ):
                return
            time.sleep(0.005)

    def wakeups(self) -> int:
        """How often the thread has gone to sleep (voluntary switches)."""
        for line in self._task("status").splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
        raise AssertionError("no voluntary_ctxt_switches in /proc")

    def outcome(self) -> str | BaseException | None:
        self.thread.join(_LONG + 10)
        assert not self.thread.is_alive()
        return self.result


def _connect(sock: Path) -> Callable[[float], str]:
    """A probe that connects to ``sock`` (refused: ``VmmGone``, as the
    drivers' probes say it)."""

    def probe(timeout: float) -> str:
        client = socket.socket(socket.AF_UNIX)
        client.settimeout(timeout)
        try:
            client.connect(str(sock))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise VmmGone(f"nobody listens ({exc.strerror})") from exc
        finally:
            client.close()
        return "answered"

    return probe


def _inotify_instances() -> dict[int, list[int]]:
    """This process's inotify descriptors, each with the inodes it watches
    (``/proc/self/fdinfo``: the kernel's word, one line per watch)."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") != "anon_inode:inotify":
                continue
            info = Path(f"/proc/self/fdinfo/{name}").read_text()
        except OSError:
            continue  # the listing's own descriptor, closed by now
        found[int(name)] = [
            int(field.split(":")[1], 16)
            for line in info.splitlines()
            if line.startswith("inotify wd:")
            for field in line.split()
            if field.startswith("ino:")
        ]
    return found


def _fds() -> dict[int, str]:
    """This process's descriptors and what each one is."""
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the listing's own descriptor, closed by now
    return found


def _watched() -> list[int]:
    """The inodes watched by any inotify instance of this process."""
    return sorted(ino for inodes in _inotify_instances().values() for ino in inodes)


def _listening(path: Path) -> socket.socket:
    """A socket listening at ``path``, moved in there once it listens (as
    a VMM may do; inotify reports it as moved, not created)."""
    server = socket.socket(socket.AF_UNIX)
    staging = path.with_name(f".{path.name}.new")
    server.bind(str(staging))
    server.listen()
    os.rename(staging, path)
    return server


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="reads the x86_64 syscall number")
def test_the_wait_sleeps_until_the_socket_appears(
    tmp_path: Path, vmm: subprocess.Popen[bytes]
) -> None:
    sock = tmp_path / "api.sock"
    waiter = _Waiter(_handle(vmm, sock), _connect(sock), time.monotonic() + _LONG)
    waiter.asleep()
    # Asleep is asleep: no wake-up while nothing happens (the old wait woke
    # every 2-5 ms to look for the socket and read /proc).
    before = waiter.wakeups()
    time.sleep(0.3)
    assert waiter.wakeups() == before
    assert waiter.probes == 0
    server = _listening(sock)
    try:
        assert waiter.outcome() == "answered"
    finally:
        server.close()
    assert waiter.probes == 1  # asked once, when the socket was there


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="reads the x86_64 syscall number")
def test_the_wait_wakes_when_the_vmm_exits(tmp_path: Path, vmm: subprocess.Popen[bytes]) -> None:
    sock = tmp_path / "api.sock"
    waiter = _Waiter(_handle(vmm, sock), _connect(sock), time.monotonic() + _LONG)
    waiter.asleep()
    vmm.kill()
    outcome = waiter.outcome()
    assert isinstance(outcome, VmmGone), outcome
    assert "exited before its API answered" in outcome.message
    assert waiter.probes == 0


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="reads the x86_64 syscall number")
def test_a_socket_bound_before_it_listens_is_asked_again(
    tmp_path: Path, vmm: subprocess.Popen[bytes]
) -> None:
    """bind(2) makes the file (the watch fires), listen(2) comes later and
    no event tells of it: the refused probe is repeated until it answers."""
    sock = tmp_path / "api.sock"
    waiter = _Waiter(_handle(vmm, sock), _connect(sock), time.monotonic() + _LONG)
    waiter.asleep()
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(sock))
        while waiter.probes == 0:
            time.sleep(0.005)
        server.listen()
        assert waiter.outcome() == "answered"
    finally:
        server.close()
    assert waiter.probes >= 2


def test_a_socket_that_never_answers_times_out_with_the_probes_word(
    tmp_path: Path, vmm: subprocess.Popen[bytes]
) -> None:
    sock = tmp_path / "api.sock"
    server = _listening(sock)

    def silent(timeout: float) -> str:
        raise VmmTimeout("no answer to vmm.ping")

    try:
        with pytest.raises(VmmTimeout, match=r"did not answer on .*: no answer to vmm.ping"):
            process.wait_for_api(
                _handle(vmm, sock), silent, deadline=time.monotonic() + 0.3, who="the VMM"
            )
    finally:
        server.close()


def test_without_a_watch_the_wait_still_finds_the_socket(
    tmp_path: Path, vmm: subprocess.Popen[bytes]
) -> None:
    """A socket whose directory is not there yet cannot be watched: the
    wait falls back to looking at ``API_POLL``'s pace, and finds it once
    the VMM made the directory and bound the socket."""
    sock = tmp_path / "run" / "api.sock"
    waiter = _Waiter(_handle(vmm, sock), _connect(sock), time.monotonic() + _LONG)
    sock.parent.mkdir()
    server = _listening(sock)
    try:
        assert waiter.outcome() == "answered"
    finally:
        server.close()


def test_the_wait_closes_what_it_opened(tmp_path: Path, vmm: subprocess.Popen[bytes]) -> None:
    """Nothing per launch is kept: no descriptor, no watch (the process's
    one inotify instance, its thread's epoll and eventfd are made by the
    first launch and kept: a first wait comes before the count)."""
    sock = tmp_path / "api.sock"
    server = _listening(sock)
    server_fd = server.fileno()
    try:
        handle = _handle(vmm, sock)
        assert process.wait_for_api(
            handle, _connect(sock), deadline=time.monotonic() + _LONG, who="the VMM"
        )
        before = _fds()
        with pytest.raises(VmmTimeout):
            process.wait_for_api(
                handle, _connect(tmp_path / "none.sock"), deadline=time.monotonic(), who="the VMM"
            )
        for _ in range(3):
            assert (
                process.wait_for_api(
                    handle, _connect(sock), deadline=time.monotonic() + _LONG, who="the VMM"
                )
                == "answered"
            )
        vmm.kill()
        vmm.wait()
        with pytest.raises(VmmGone):
            process.wait_for_api(
                handle, _connect(sock), deadline=time.monotonic() + _LONG, who="the VMM"
            )
    finally:
        server.close()
    before.pop(server_fd)
    assert _fds() == before
    assert _watched() == []


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="reads the x86_64 syscall number")
def test_concurrent_launches_share_one_inotify_instance(
    tmp_path: Path, vmm: subprocess.Popen[bytes]
) -> None:
    """Three launches at once, two in one directory: one inotify instance
    (never one per launch: closing it waits ~8 ms for an SRCU grace
    period), one watch per directory, each launch woken for its own socket
    (one in the same directory only wakes it to look again), and the last
    launch waiting on a directory removes its watch."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    socks = {name: tmp_path / name[0] / f"{name}.sock" for name in ("a1", "a2", "b")}
    deadline = time.monotonic() + _LONG
    waiters = {
        n: _Waiter(_handle(vmm, sock), _connect(sock), deadline) for n, sock in socks.items()
    }
    for waiter in waiters.values():
        waiter.asleep()
    instances = _inotify_instances()
    assert len(instances) == 1, instances
    inode = {d: (tmp_path / d).stat().st_ino for d in ("a", "b")}
    assert _watched() == sorted(inode.values())
    servers = []
    try:
        servers.append(_listening(socks["b"]))
        assert waiters["b"].outcome() == "answered"
        assert _watched() == [inode["a"]]
        servers.append(_listening(socks["a1"]))
        assert waiters["a1"].outcome() == "answered"
        waiters["a2"].asleep()  # woken by a1's socket, looked, asleep again
        assert waiters["a2"].probes == 0
        assert _watched() == [inode["a"]]
        servers.append(_listening(socks["a2"]))
        assert waiters["a2"].outcome() == "answered"
    finally:
        for server in servers:
            server.close()
    assert [w.probes for w in waiters.values()] == [1, 1, 1]
    assert _watched() == []
    assert len(_inotify_instances()) == 1


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="reads the x86_64 syscall number")
def test_a_wait_whose_directory_goes_away_polls_for_it(
    tmp_path: Path, vmm: subprocess.Popen[bytes]
) -> None:
    """The kernel drops the watch of a removed directory (IN_IGNORED): the
    wait is woken, and looks at ``API_POLL``'s pace from then on, so it
    finds the socket of a directory made again (it never sleeps until its
    deadline on a watch that is gone)."""
    sock = tmp_path / "run" / "api.sock"
    sock.parent.mkdir()
    waiter = _Waiter(_handle(vmm, sock), _connect(sock), time.monotonic() + _LONG)
    waiter.asleep()
    sock.parent.rmdir()
    sock.parent.mkdir()
    server = _listening(sock)
    try:
        assert waiter.outcome() == "answered"
    finally:
        server.close()
    assert _watched() == []


def test_a_vmm_answering_at_the_first_look_costs_no_watch_and_no_pidfd(
    tmp_path: Path, vmm: subprocess.Popen[bytes]
) -> None:
    """A socket listening before the wait begins is answered at the first
    look: no pidfd opened and no watch set for it, so nothing to remove
    either, and the ``vmm-launches`` thread is not woken by the watch's
    ``IN_IGNORED`` (a hand-off per start, issue 31 target 2)."""
    sock = tmp_path / "api.sock"
    server = _listening(sock)
    seen: list[tuple[list[int], list[str]]] = []
    connect = _connect(sock)

    def probe(timeout: float) -> str:
        pidfds = [what for what in _fds().values() if what == "anon_inode:[pidfd]"]
        seen.append((_watched(), pidfds))
        return connect(timeout)

    try:
        assert (
            process.wait_for_api(
                _handle(vmm, sock), probe, deadline=time.monotonic() + _LONG, who="the VMM"
            )
            == "answered"
        )
    finally:
        server.close()
    assert seen == [([], [])]
