"""``process.wait_for_api`` against real processes and real unix sockets:
it sleeps in one poll(2) on the VMM's pidfd and an inotify watch on the
socket's directory, so it must wake for the socket (created, or moved in
already listening), for the VMM's exit, and for a socket that starts
listening late, and must not wake while nothing happens.

The "VMM" is a real child process (``sleep``); the socket is made by the
test itself, at a moment it chooses: once the waiting thread is blocked in
poll(2) (read from ``/proc/self/task/<tid>/syscall``), so the socket is
created after the watch is set and only the watch can report it."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from procurator.worker.vmm import process
from procurator.worker.vmm.base import VmmGone, VmmHandle, VmmTimeout

#: poll(2) on x86_64 (select.poll's call); other architectures have ppoll only.
_SYS_POLL = 7
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

    def blocked_in_poll(self) -> None:
        """Until the thread sleeps in poll(2) (a syscall number, then its
        arguments: the wait set up its descriptors and went to sleep)."""
        while True:
            assert self.thread.is_alive(), f"the wait ended early: {self.result!r}"
            if self._task("syscall").split()[0] == str(_SYS_POLL):
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
    waiter.blocked_in_poll()
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
    waiter.blocked_in_poll()
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
    waiter.blocked_in_poll()
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
    sock = tmp_path / "api.sock"
    before = sorted(os.listdir("/proc/self/fd"))
    server = _listening(sock)
    try:
        handle = _handle(vmm, sock)
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
    assert sorted(os.listdir("/proc/self/fd")) == before
