"""What a VM cgroup's launch reads and writes on the real v1 hierarchy
(issue 31: the worker's CPU per VM start; each read of a cgroup file is
an open, a read and a close in the kernel, held between GIL hand-offs).

A first launch makes the cgroup and writes its limits without reading
the files whose fresh value (no limit) cannot be the one written; only
the CPU period is read (a write of it walks every cpu cgroup of the
host, so the kernel's default is left as it is). A relaunch that keeps
the cgroup reads each limit file at most once. Observed through the
interpreter's ``open`` audit events (every ``open`` and ``os.open`` of
the process raises one), not by replacing anything."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testnames import TOKEN

from procurator.core.jail import ResourceLimits
from procurator.worker import cgroups
from procurator.worker.cgroups import CgroupsV1

MIB = 1 << 20
LIMITS = ResourceLimits(memory_bytes=320 * MIB, cpu_quota_us=150_000, pids=64)
PARENT = os.environ.get("PROCURATOR_CGROUP_PARENT", f"procurator-test-{TOKEN}")
LIMIT_FILES = (
    "memory.limit_in_bytes",
    "memory.memsw.limit_in_bytes",
    "cpu.cfs_period_us",
    "cpu.cfs_quota_us",
    "pids.max",
)

_watching: list[tuple[str, Counter[str], Counter[str]]] = []  # (dir, reads, writes)
_hooked = threading.Lock()
_hook: list[bool] = []  # [True] once added: for the process's life, inert when no test watches


def _on_audit(event: str, args: tuple[Any, ...]) -> None:
    if event != "open" or not _watching:
        return
    path, mode, flags = args
    if not isinstance(path, (str, os.PathLike)):
        return  # a descriptor
    where, reads, writes = _watching[-1]
    path = os.fspath(path)
    if not isinstance(path, str) or os.path.basename(os.path.dirname(path)) != where:
        return
    writing = (
        any(c in mode for c in "wax+")
        if isinstance(mode, str)
        else bool(flags & (os.O_WRONLY | os.O_RDWR))
    )
    (writes if writing else reads)[os.path.basename(path)] += 1


@pytest.fixture
def opened() -> Iterator[tuple[str, Counter[str], Counter[str]]]:
    """A VM name, and the files of its cgroups opened to read and to
    write (counted by file name) while the test runs."""
    with _hooked:
        if not _hook:
            sys.addaudithook(_on_audit)
            _hook.append(True)
    name = f"vm-{uuid.uuid4().hex[:8]}"
    reads: Counter[str] = Counter()
    writes: Counter[str] = Counter()
    _watching.append((name, reads, writes))
    try:
        yield name, reads, writes
    finally:
        _watching.clear()


def _v1_or_skip() -> CgroupsV1:
    found = cgroups.detect(PARENT, f"w-{uuid.uuid4().hex[:8]}")
    if not isinstance(found, CgroupsV1) or found.enforceable != frozenset(cgroups.CONTROLLERS):
        pytest.skip(f"this host has no cgroup v1 memory, cpu and pids: {found.describe()}")
    return found


def test_a_first_launch_writes_its_limits_unread_but_the_period(
    opened: tuple[str, Counter[str], Counter[str]],
) -> None:
    name, reads, writes = opened
    found = _v1_or_skip()
    try:
        placement = found.create(name, LIMITS)
        assert placement.notes == ()
        swap = (found._dirs["memory"] / name / "memory.memsw.limit_in_bytes").exists()
        assert dict(reads) == {"cpu.cfs_period_us": 1}
        # The kernel's default period is the one asked for: left alone.
        assert dict(writes) == {
            "memory.limit_in_bytes": 1,
            **({"memory.memsw.limit_in_bytes": 1} if swap else {}),
            "cpu.cfs_quota_us": 1,
            "pids.max": 1,
        }
        held = {
            file: (found._dirs[file.split(".")[0]] / name / file).read_text().strip()
            for file in LIMIT_FILES
            if (found._dirs[file.split(".")[0]] / name / file).exists()
        }
        assert held == {
            "memory.limit_in_bytes": str(LIMITS.memory_bytes),
            **({"memory.memsw.limit_in_bytes": str(LIMITS.memory_bytes)} if swap else {}),
            "cpu.cfs_period_us": str(LIMITS.cpu_period_us),
            "cpu.cfs_quota_us": str(LIMITS.cpu_quota_us),
            "pids.max": str(LIMITS.pids),
        }
    finally:
        found.remove(name)
        found.close()


@pytest.mark.parametrize("factor", [2, 1])
def test_a_relaunch_reads_each_limit_file_at_most_once(
    opened: tuple[str, Counter[str], Counter[str]], factor: int
) -> None:
    """Limits that change are written (in the order the kernel takes, as
    ``test_cgroups`` checks); limits that hold their value are not."""
    name, reads, writes = opened
    found = _v1_or_skip()
    try:
        found.create(name, LIMITS)
        inodes = {c: (root / name).stat().st_ino for c, root in found._dirs.items()}
        reads.clear()
        writes.clear()
        bigger = ResourceLimits(
            memory_bytes=LIMITS.memory_bytes * factor,
            cpu_quota_us=LIMITS.cpu_quota_us * factor,
            pids=LIMITS.pids * factor,
        )
        assert found.create(name, bigger).notes == ()
        assert {c: (root / name).stat().st_ino for c, root in found._dirs.items()} == inodes
        assert max(reads[file] for file in LIMIT_FILES) == 1
        changed = {file for file in LIMIT_FILES if writes[file]}
        swap = (found._dirs["memory"] / name / "memory.memsw.limit_in_bytes").exists()
        assert changed == (
            set()
            if factor == 1
            else {"memory.limit_in_bytes", "cpu.cfs_quota_us", "pids.max"}
            | ({"memory.memsw.limit_in_bytes"} if swap else set())
        )
        assert (found._dirs["memory"] / name / "memory.limit_in_bytes").read_text().strip() == (
            str(bigger.memory_bytes)
        )
    finally:
        found.remove(name)
        found.close()


def test_a_cgroup_file_is_read_by_open_read_and_close_alone(tmp_path: Path) -> None:
    """``open()``'s buffer and text layers add two fstats, an ioctl and
    two lseeks to each read of a cgroup or proc file: the reads a launch
    makes (its limits, the VMM's confinement read back) go without them."""
    _v1_or_skip().close()
    trace = tmp_path / "trace"
    script = (
        "import os\n"
        "from procurator.worker import cgroups\n"
        f"found = cgroups.detect({PARENT!r}, 'w-' + os.urandom(4).hex())\n"
        "try:\n"
        "    found.create('vm1', cgroups.ResourceLimits(1 << 28, 150_000, 64))\n"
        "    seen = found.read_limits(os.getpid())\n"
        "    assert seen.pids is not None or seen.memory_bytes is None, seen\n"
        "finally:\n"
        "    found.remove('vm1')\n"
        "    found.close()\n"
    )
    strace = ["strace", "-f", "-qq", "-y", "-e", "trace=desc", "-o", str(trace)]
    subprocess.run([*strace, sys.executable, "-c", script], check=True, timeout=60)
    kernel_files = re.compile(r"^(?:\d+ +)?(?P<call>\w+)\(\d+</(?:sys/fs/cgroup|proc)/", re.M)
    calls = Counter(m["call"] for m in kernel_files.finditer(trace.read_text()))
    assert calls["read"] and calls["close"], calls
    assert set(calls) <= {"read", "write", "close"}, calls
