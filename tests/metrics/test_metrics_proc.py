"""The /proc reader against real processes."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from procurator.worker.metrics import read_process_usage
from procurator.worker.vmm.process import pid_start_ticks

_TICK = 1 / os.sysconf("SC_CLK_TCK")


def _vm_rss_bytes(pid: int) -> int:
    """Resident memory as /proc/<pid>/status reports it: another file, for
    a cross-check of statm."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def test_reads_rss_and_cpu_of_an_idle_process(sleeper: subprocess.Popen[bytes]) -> None:
    usage = read_process_usage(sleeper.pid)
    assert usage is not None
    assert usage.rss_bytes > 0
    assert usage.rss_bytes == _vm_rss_bytes(sleeper.pid)  # sleep's memory does not move
    assert usage.cpu_seconds >= 0


def test_identity_check_refuses_another_process(sleeper: subprocess.Popen[bytes]) -> None:
    ticks = pid_start_ticks(sleeper.pid)
    assert ticks is not None
    assert read_process_usage(sleeper.pid, ticks) is not None
    assert read_process_usage(sleeper.pid, ticks + 1) is None  # a recycled pid


def test_gone_and_zombie_processes_have_no_usage() -> None:
    proc = subprocess.Popen(["/bin/true"])
    try:
        # Not reaped yet: a zombie once it has exited. Wait for that state
        # without reaping (waitid with WNOWAIT leaves the zombie in place).
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        assert read_process_usage(proc.pid) is None
    finally:
        proc.wait(timeout=10)
    assert read_process_usage(proc.pid) is None  # reaped: gone


def test_cpu_seconds_of_a_busy_process_match_its_rusage() -> None:
    """A process burns CPU, says so on stdout, then sleeps: the reader's
    figure must match what the kernel reports to the parent when it ends
    (rusage), to the precision of /proc (one clock tick per field)."""
    shell = shutil.which("sh") or "/bin/sh"
    script = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo burnt; exec sleep 300"
    proc = subprocess.Popen([shell, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"burnt\n"
        usage = read_process_usage(proc.pid)
        assert usage is not None
        assert usage.cpu_seconds > 0
        assert usage.rss_bytes > 0
    finally:
        proc.send_signal(signal.SIGKILL)
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = -signal.SIGKILL  # reaped by wait4
        if proc.stdout is not None:
            proc.stdout.close()
    assert os.WIFSIGNALED(status)
    kernel = rusage.ru_utime + rusage.ru_stime
    assert usage.cpu_seconds == pytest.approx(kernel, abs=2 * _TICK)
