"""Finding the processes the worker launched (by their launch marker) and
the helpers a killed worker left (by their command lines), against real
processes: the search that finds an unrecorded VMM must not take a
bystander that names the same socket for it (and kill it)."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from procurator.worker.vmm import process
from procurator.worker.vmm.base import VmmError, VmmGone, VmmHandle, VmmRejected, VmmTimeout


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        proc.kill()
        proc.wait(timeout=10)


def _started(proc: subprocess.Popen[bytes], needle: str) -> None:
    """Wait until the child's command line is its own (exec done)."""
    deadline = time.monotonic() + 10
    while needle.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "child never exec'd"
        time.sleep(0.01)


def test_launched_vmms_are_told_from_bystanders_naming_their_socket(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    vm_dir = tmp_path / "vms" / "vm1"
    sock = vm_dir / "api.sock"
    sleep = "import time; time.sleep(300)"
    # A VMM launched through a wrapper that execs it: its command line names
    # neither the wrapper nor anything else the worker chose but the socket.
    wrapper = tmp_path / "wrapper"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    vmm = subprocess.Popen(
        [str(wrapper), "-c", sleep, "--api-socket", f"path={sock}"],
        env=process.launch_env(vm_dir),
    )
    # A wrapper that does not exec: it and its VMM both carry the marker.
    shell = subprocess.Popen(
        ["/bin/sh", "-c", f'{sys.executable} -c "{sleep}" --api-socket path={sock}; :'],
        env=process.launch_env(vm_dir),
    )
    # An operator's tools with the socket path on their command lines, and
    # the VMM of another VM (vm10: its directory starts with vm1's path).
    bystander = subprocess.Popen([sys.executable, "-c", sleep, "--unix-socket", str(sock)])
    other = subprocess.Popen(
        [sys.executable, "-c", sleep], env=process.launch_env(tmp_path / "vms" / "vm10")
    )
    procs += [vmm, shell, bystander, other]
    for proc in (vmm, bystander):
        _started(proc, str(sock))
    _started(other, sleep)

    def launched() -> set[int]:
        return {pid for pid, _ in process.find_launched(vm_dir)}

    try:
        deadline = time.monotonic() + 10
        while len(launched()) < 3:  # the shell's child may still be starting
            assert time.monotonic() < deadline, launched()
            time.sleep(0.01)
        found = launched()
        assert {vmm.pid, shell.pid} <= found
        assert len(found) == 3  # and the shell's child
        assert bystander.pid not in found and other.pid not in found
    finally:
        for pid, ticks in process.find_launched(vm_dir):
            process.terminate(pid, ticks, grace=0.0)


def test_programs_filter_helpers_under_a_directory(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    roots = tmp_path / "gcroots"
    helper_dir = tmp_path / "bin"
    helper_dir.mkdir()
    helper = helper_dir / "nix-store"
    helper.symlink_to(sys.executable)  # argv[0] ends in nix-store
    nix = subprocess.Popen(
        [str(helper), "-c", "import time; time.sleep(300)", "--add-root", f"{roots}/vm1"]
    )
    shell = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", f"{roots}/vm1"])
    procs += [nix, shell]
    _started(nix, str(roots))
    _started(shell, str(roots))

    assert {nix.pid, shell.pid} <= {pid for pid, _ in process.find_by_argument_under(roots)}
    found = process.find_by_argument_under(roots, programs=("nix-store",))
    assert [pid for pid, _ in found] == [nix.pid]


def test_a_stale_socket_is_removed_but_a_held_one_and_a_stranger_stay(tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    lock = tmp_path / "api.sock.lock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.close()  # the socket file stays, as a crashed VMM leaves it
    lock.touch()
    holder = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # a live VMM nobody recorded holds it
        with pytest.raises(VmmError, match="held by a live VMM"):
            process.remove_stale_socket(sock, lock_file=lock)
        assert sock.exists()
    finally:
        os.close(holder)
    process.remove_stale_socket(sock, lock_file=lock)
    assert not sock.exists()
    process.remove_stale_socket(sock)  # already gone: fine
    sock.write_text("not a socket")
    with pytest.raises(VmmRejected, match="is not a socket"):
        process.remove_stale_socket(sock)
    assert sock.exists()


def test_log_tail_gives_the_last_lines_since_an_offset(tmp_path: Path) -> None:
    log = tmp_path / "vmm.log"
    log.write_text("old line\n")
    since = process.log_size(log)
    with open(log, "a") as out:
        out.write("".join(f"line {i}\n" for i in range(30)) + "\n\n")
    assert process.log_tail(log, since=since, lines=3) == (
        "vmm.log: line 27",
        "vmm.log: line 28",
        "vmm.log: line 29",
    )
    assert "vmm.log: old line" not in process.log_tail(log, since=since, lines=100)
    assert process.log_tail(tmp_path / "absent.log") == ()


def test_wait_for_api_reports_an_exit_and_a_silence_with_the_logs(tmp_path: Path) -> None:
    log = tmp_path / "out.log"
    pid, ticks = process.launch_detached(
        [sys.executable, "-c", "print('no such device'); raise SystemExit(1)"],
        vm_dir=tmp_path,
        log_path=log,
    )
    handle = VmmHandle("test", pid, ticks, str(tmp_path / "api.sock"))
    with pytest.raises(VmmGone, match="exited before its API answered") as gone:
        process.wait_for_api(
            handle, lambda _: None, deadline=time.monotonic() + 20, who="it", logs=[(log, 0)]
        )
    assert "out.log: no such device" in gone.value.details
    pid, ticks = process.launch_detached(
        [sys.executable, "-c", "import time; time.sleep(300)"], vm_dir=tmp_path, log_path=log
    )
    handle = VmmHandle("test", pid, ticks, str(tmp_path / "api.sock"))
    try:
        with pytest.raises(VmmTimeout, match="did not answer"):
            process.wait_for_api(handle, lambda _: None, deadline=time.monotonic() + 0.2, who="it")
    finally:
        process.terminate(pid, ticks, grace=0.0)


# The main thread exits alone (pthread_exit: the thread-group leader turns
# zombie) while another thread keeps the process, and its flock, alive for
# a while: what a VMM crashing from a thread, or a pid-namespace init
# reaping its namespace, looks like from the outside for a moment.
_LINGERING_LEADER = """
import ctypes, fcntl, os, sys, threading, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
def linger():
    time.sleep(float(sys.argv[2]))
    os._exit(0)
threading.Thread(target=linger).start()
print("locked", flush=True)
ctypes.CDLL(None).pthread_exit(None)
"""


def test_terminate_returns_once_the_whole_process_is_gone(tmp_path: Path) -> None:
    """A process whose leader is already a zombie reads as exited in
    ``/proc``, but its other threads still hold its files (an API socket's
    flock, for a VMM). ``terminate`` (and so a failed launch's abort) must
    not return before they are gone, or the next launch finds the socket
    held by "a live VMM that no handle records"."""
    lock = tmp_path / "api.sock.lock"
    proc = subprocess.Popen(
        [sys.executable, "-c", _LINGERING_LEADER, str(lock), "1.0"],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"locked\n"
        ticks = process.pid_start_ticks(proc.pid) or int(
            Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        )
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the leader never became a zombie"
            time.sleep(0.01)
        assert not process.is_alive(proc.pid, ticks)  # what /proc says
        process.terminate(proc.pid, ticks, grace=5.0)
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free: the process is gone
        finally:
            os.close(fd)
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
