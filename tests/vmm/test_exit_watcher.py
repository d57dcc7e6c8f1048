"""process.ExitWatcher: one thread and one epoll tell many processes' exits
(a parked supervisor holds no thread and no descriptor of its own), and
ExitWatch: a supervisor's pidfd and its wake."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator

import pytest

from procurator.worker.vmm import process
from procurator.worker.vmm.base import VmmHandle


@pytest.fixture
def watcher() -> Iterator[process.ExitWatcher]:
    made = process.ExitWatcher()
    yield made
    made.close()


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "600"])


def handle_of(child: subprocess.Popen[bytes]) -> VmmHandle:
    ticks = process.pid_start_ticks(child.pid)
    assert ticks is not None
    return VmmHandle("test", child.pid, ticks, "/nonexistent/api.sock")


def test_each_exit_wakes_its_own_waiter_once(watcher: process.ExitWatcher) -> None:
    children = [sleeper() for _ in range(3)]
    events = [threading.Event() for _ in children]
    pidfds = [os.pidfd_open(child.pid) for child in children]
    try:
        for pidfd, event in zip(pidfds, events, strict=True):
            watcher.add(pidfd, event.set)
        children[1].kill()
        children[1].wait()
        assert events[1].wait(30)
        assert not events[0].is_set() and not events[2].is_set()
        events[1].clear()
        watcher.remove(pidfds[2])
        children[2].kill()
        children[2].wait()
        children[0].kill()
        children[0].wait()
        assert events[0].wait(30)
        assert not events[2].is_set()  # no longer watched
        # One-shot: the exited child's pidfd stays readable, and is not told
        # again (level-triggered, each epoll_wait since would have).
        assert not events[1].is_set()
    finally:
        for child in children:
            child.kill()
            child.wait()
        for pidfd in pidfds:
            watcher.remove(pidfd)
            os.close(pidfd)


def test_a_process_that_exited_before_it_was_added_wakes_at_once(
    watcher: process.ExitWatcher,
) -> None:
    child = sleeper()
    pidfd = os.pidfd_open(child.pid)
    try:
        child.kill()
        child.wait()
        woken = threading.Event()
        watcher.add(pidfd, woken.set)
        assert woken.wait(30)
    finally:
        watcher.remove(pidfd)
        os.close(pidfd)


def test_an_exit_watch_wakes_its_vm_and_holds_one_descriptor(
    watcher: process.ExitWatcher,
) -> None:
    wake = threading.Event()
    watch = process.ExitWatch(lambda: watcher, wake.set)
    child = sleeper()
    try:
        before = len(os.listdir("/proc/self/fd"))
        assert watch.open(handle_of(child))
        assert len(os.listdir("/proc/self/fd")) == before + 1  # the pidfd
        assert watch.alive() is True
        assert not wake.wait(0.05)
        child.kill()
        child.wait()
        assert wake.wait(30), "the exit did not wake the VM"
        assert watch.alive() is False
        watch.close()
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        watch.close()
        child.kill()
        child.wait()
