"""Fixtures for the metrics tests: realistic snapshots, Prometheus' own
tools, real processes to read ``/proc`` from, and an I/O recorder built on
``sys.addaudithook`` (the interpreter's own hook: no patching) to prove that
scrapes do no I/O."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from promhelpers import prometheus_binary, promtool

__all__ = ["io_recorder", "prometheus_binary", "promtool", "sleeper"]


_SLEEP_SYSCALLS = {"35", "230"}  # nanosleep, clock_nanosleep (x86_64)


def _wait_until_asleep(pid: int) -> None:
    """Block until ``pid`` sits in its sleep system call. Right after
    ``Popen`` the child may still be exec'ing or faulting in pages, so its
    resident memory moves; once it sleeps, it does not."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        fields = Path(f"/proc/{pid}/syscall").read_text().split()
        if fields and fields[0] in _SLEEP_SYSCALLS:
            return
        time.sleep(0.005)
    raise AssertionError(f"pid {pid} never reached its sleep system call")


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real, idle process; killed and reaped afterwards."""
    sleep = shutil.which("sleep") or "/bin/sleep"
    proc = subprocess.Popen([sleep, "300"])
    try:
        _wait_until_asleep(proc.pid)
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


# -- I/O recorder --------------------------------------------------------------

_IO_EVENTS = (
    "open",
    "os.listdir",
    "os.scandir",
    "os.chdir",
    "socket.",
    "subprocess.Popen",
    "os.system",
    "os.exec",
    "os.posix_spawn",
    "os.fork",
)


class IoRecorder:
    """Audit events that mean I/O, raised in one thread while recording."""

    def __init__(self) -> None:
        self._local = threading.local()

    def hook(self, event: str, args: tuple[object, ...]) -> None:
        events = getattr(self._local, "events", None)
        if events is not None and event.startswith(_IO_EVENTS):
            events.append((event, repr(args)[:200]))

    @contextmanager
    def recording(self) -> Iterator[list[tuple[str, str]]]:
        events: list[tuple[str, str]] = []
        self._local.events = events
        try:
            yield events
        finally:
            self._local.events = None


@pytest.fixture(scope="session")
def io_recorder() -> IoRecorder:
    """One recorder per session (audit hooks cannot be removed): it stays
    installed and records nothing outside ``recording()``."""
    recorder = IoRecorder()
    sys.addaudithook(recorder.hook)
    return recorder
