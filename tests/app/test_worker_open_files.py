"""The worker process takes the open-file limit it is allowed: it holds a
few descriptors per VM, and at a soft limit of 1024 it would fail on EMFILE
near 190 VMs. Real ``procurator worker`` processes, started with a low soft
limit; no master runs (the worker keeps trying to reach one)."""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path

from testnames import free_port

FAKE = Path(__file__).resolve().parents[1] / "fakes" / "cloud-hypervisor-fake.py"


def _open_files(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open-file limit in /proc/{pid}/limits")


def _worker(tmp_path: Path, hard: int) -> tuple[int, int, str]:
    """Start a worker whose soft limit is 256 and hard limit ``hard``; once
    it ran its start-up, its limits and what it logged."""
    _, our_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    hard = min(hard, our_hard)

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    log = tmp_path / "worker.log"
    with log.open("w") as out:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "procurator",
                "worker",
                "--id",
                "host-a",
                "--master",
                f"127.0.0.1:{free_port()}",
                "--state-dir",
                str(tmp_path / "state"),
                "--driver",
                "cloud-hypervisor",
                "--vmm-binary",
                sys.executable,
                "--vmm-arg",
                str(FAKE),
                "--no-network",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=lower,  # noqa: PLW1509 - a single-threaded test runner
        )
    try:
        deadline = time.monotonic() + 60.0  # a guard, not a measurement
        # The limit is raised before the worker starts its loop, which logs
        # its first attempt to reach the master.
        while "master" not in log.read_text():
            assert worker.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        soft, seen_hard = _open_files(worker.pid)
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    return soft, seen_hard, log.read_text()


def test_a_worker_raises_its_soft_open_file_limit_to_the_hard_one(tmp_path: Path) -> None:
    soft, hard, _ = _worker(tmp_path, 1 << 20)
    assert soft == hard > 256


def test_a_worker_says_how_many_vms_a_low_hard_limit_leaves_room_for(tmp_path: Path) -> None:
    soft, hard, log = _worker(tmp_path, 4096)
    assert soft == hard == 4096
    # One descriptor per VM (tests/vmm/test_fds_per_vm.py), 256 for the rest.
    assert "the open-file limit (4096) leaves room for about 3840 VMs" in log, log
