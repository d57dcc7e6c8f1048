"""VM cgroups on v1 and v2.

What runs for real where: this machine mounts cgroup v1 for ``memory``,
``cpu`` and ``pids`` (and a unified v2 hierarchy that holds none of them),
so the v1 driver is exercised on the real kernel (limits written and read
back, a process placed, OOM count, removal with a process inside), and the
v2 driver on the real unified hierarchy as far as it goes here (a cgroup
made, a process placed and found, removed; no controller to limit with:
each limit reported as not enforced). What v2 writes for its limits and
controllers is checked against a directory shaped like cgroupfs, and the
choice of hierarchy and directories (``detect``) against mount tables of
each kind. Where a host mounts v2 with the controllers, the real v2 test
limits for real (it detects what it has)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from testnames import TOKEN

from procurator.core.jail import ResourceLimits
from procurator.worker import cgroups
from procurator.worker.cgroups import CgroupsV1, CgroupsV2, NoCgroups

MIB = 1 << 20
LIMITS = ResourceLimits(memory_bytes=320 * MIB, cpu_quota_us=150_000, pids=64)
PARENT = os.environ.get("PROCURATOR_CGROUP_PARENT", f"procurator-test-{TOKEN}")

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
HYBRID_OWN = "8:pids:/\n4:memory:/process_api/abc\n1:cpu:/\n0::/\n"


def _unified(tmp_path: Path, controllers: str) -> str:
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text(controllers + "\n")
    return f"41 31 0:38 / {root} rw,relatime - cgroup2 cgroup2 rw\n"


def test_a_hybrid_host_uses_v1_nested_in_the_workers_own_cgroups(tmp_path: Path) -> None:
    found = cgroups.detect("procurator", "w-1", mountinfo=HYBRID, own=HYBRID_OWN)
    assert isinstance(found, CgroupsV1) and found.enforceable == {"memory", "cpu", "pids"}
    assert found.describe() == (
        "cgroup v1 (cpu at /sys/fs/cgroup/cpu/procurator/w-1, "
        "memory at /sys/fs/cgroup/memory/process_api/abc/procurator/w-1, "
        "pids at /sys/fs/cgroup/pids/procurator/w-1)"
    )
    absolute = cgroups.detect("/vms", "w-1", mountinfo=HYBRID, own=HYBRID_OWN)
    assert "memory at /sys/fs/cgroup/memory/vms/w-1" in absolute.describe()


def test_a_missing_v1_controller_is_a_note(tmp_path: Path) -> None:
    mountinfo = "\n".join(line for line in HYBRID.splitlines() if "pids" not in line)
    found = cgroups.detect("procurator", "w-1", mountinfo=mountinfo, own=HYBRID_OWN)
    assert isinstance(found, CgroupsV1) and found.enforceable == {"memory", "cpu"}
    assert found.notes == (
        "pids: not enforced: no cgroup v1 hierarchy has the pids controller "
        "(nor does the unified one)",
    )


def test_v2_with_every_controller_goes_beside_the_worker(tmp_path: Path) -> None:
    mountinfo = _unified(tmp_path, "cpuset cpu io memory hugetlb pids rdma misc")
    own = "0::/system.slice/procurator-worker.service/worker\n"
    found = cgroups.detect("procurator", "w-1", mountinfo=mountinfo, own=own)
    assert isinstance(found, CgroupsV2)
    assert found.describe() == (
        f"cgroup v2 at {tmp_path}/unified/system.slice/procurator-worker.service/"
        "procurator/w-1 (cpu, memory, pids)"
    )
    at_root = cgroups.detect("procurator", "w-1", mountinfo=mountinfo, own="0::/\n")
    assert f"at {tmp_path}/unified/procurator/w-1 " in at_root.describe()


def test_v2_without_controllers_still_places_and_says_what_is_not_enforced(
    tmp_path: Path,
) -> None:
    mountinfo = _unified(tmp_path, "hugetlb")
    found = cgroups.detect("procurator", "w-1", mountinfo=mountinfo, own="0::/\n")
    assert isinstance(found, CgroupsV2) and found.enforceable == frozenset()
    assert found.notes == tuple(
        f"{c}: not enforced: the unified hierarchy does not offer it"
        for c in ("memory", "cpu", "pids")
    )


def test_no_hierarchy_no_cgroups() -> None:
    found = cgroups.detect("procurator", "w-1", mountinfo="", own="")
    assert isinstance(found, NoCgroups)
    placement = found.create("vm1", LIMITS)
    assert placement.join == () and "no cgroup limits" in placement.notes[0]


def _cgroupfs_tree(root: Path, levels: list[str], enabled: str) -> None:
    """A directory shaped like cgroupfs from ``root`` down through ``levels``
    (what a v2 worker reads and writes there)."""
    directory = root
    for level in ["", *levels]:
        directory = directory / level if level else directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.controllers").write_text("cpu memory pids\n")
        (directory / "cgroup.subtree_control").write_text(enabled)


def test_the_v2_writer_enables_controllers_and_writes_every_limit(tmp_path: Path) -> None:
    root = tmp_path / "cgroup2"
    _cgroupfs_tree(root, ["system.slice", "unit.service"], "cpu memory pids\n")
    # One level lacks pids: the writer enables it there (one value per write).
    (root / "system.slice" / "cgroup.subtree_control").write_text("cpu memory\n")
    base = root / "system.slice" / "unit.service" / "procurator" / "w-1"
    v2 = CgroupsV2(base, root, ["memory", "cpu", "pids"], [])
    placement = v2.create("vm1", LIMITS)
    assert (root / "system.slice" / "cgroup.subtree_control").read_text().startswith("+pids")
    vm = base / "vm1"
    assert placement.join == (str(vm / "cgroup.procs"),) and placement.path == str(vm)
    assert (vm / "memory.max").read_text() == str(320 * MIB)
    assert (vm / "cpu.max").read_text() == "150000 100000"
    assert (vm / "pids.max").read_text() == "64"
    assert placement.notes == ()


# The kernel's default period (left as a fresh cgroup has it: each write
# walks every cpu cgroup of the host), and another one (written).
@pytest.mark.parametrize("period", [LIMITS.cpu_period_us, 50_000])
def test_the_v1_driver_limits_places_and_removes_for_real(tmp_path: Path, period: int) -> None:
    instance = f"w-{uuid.uuid4().hex[:8]}"
    found = cgroups.detect(PARENT, instance)
    if not isinstance(found, CgroupsV1):
        pytest.skip(f"this host does not use cgroup v1 for the controllers: {found.describe()}")
    limits = dataclasses.replace(LIMITS, cpu_period_us=period, cpu_quota_us=period * 3 // 2)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        placement = found.create("vm1", limits)
        assert placement.notes == ()
        for procs in placement.join:
            Path(procs).write_text(str(sleeper.pid))
        assert found.processes("vm1") == {sleeper.pid}
        assert found.names() == ["vm1"]
        seen = found.read_limits(sleeper.pid)
        assert (seen.version, seen.memory_bytes, seen.cpus, seen.pids) == (
            1,
            320 * MIB,
            1.5,
            64,
        )
        assert found.oom_kills("vm1") == 0
        # A cgroup that still holds a process is not made anew for a launch.
        with pytest.raises(cgroups.CgroupBusyError):
            found.create("vm1", limits)
        found.remove("vm1")  # kills what is inside: it can only be that VM's
        assert sleeper.wait(timeout=10) == -9
        assert found.names() == []
    finally:
        sleeper.kill()
        sleeper.wait()
        found.remove("vm1")
        found.close()


def _charged_below(directory: Path) -> int:
    """Bytes of pages charged to v1 memory cgroups below ``directory``
    (hierarchical minus its own: memory.stat ``total_*`` - ``*``), live or
    removed: a removed cgroup is only gone from the kernel once nothing is
    charged to it (its kernel objects move to the parent; pages do not)."""
    stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
    return sum(int(stat[f"total_{key}"]) - int(stat[key]) for key in ("cache", "rss"))


def _read_image(found: CgroupsV1, image: Path) -> None:
    """A VMM launched in VM ``vm1``'s cgroup reads ``image`` (4 MiB, out of
    the page cache first, so the read charges its pages to the cgroup) and
    ends."""
    with open(image, "wb") as f:
        f.write(os.urandom(4 * MIB))
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    vmm = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; sys.stdin.readline(); open({str(image)!r}, 'rb').read()",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        for tasks in found.create("vm1", LIMITS).join:
            Path(tasks).write_text(str(vmm.pid))
        assert vmm.stdin is not None
        vmm.stdin.write(b"go\n")
        vmm.stdin.close()
        assert vmm.wait(timeout=30) == 0
    finally:
        vmm.kill()
        vmm.wait()


def _v1_or_skip() -> CgroupsV1:
    found = cgroups.detect(PARENT, f"w-{uuid.uuid4().hex[:8]}")
    if not isinstance(found, CgroupsV1) or "memory" not in found.enforceable:
        pytest.skip(f"this host has no cgroup v1 memory hierarchy: {found.describe()}")
    return found


def test_a_removed_vm_cgroup_keeps_no_page_charged_for_real(tmp_path: Path) -> None:
    """A VMM reads its image (kernel, initrd, disk) from the store: those
    pages stay in the page cache after it ends, charged to its cgroup, and
    kept the removed cgroup alive in the kernel (dying, ~0.3 MiB of
    unreclaimable memory each, for as long as the image stays cached).
    Removal releases them first. The signal is per worker, not the host's
    count of memory cgroups: the worker's own directory, which holds no
    process and no other VM, counts in its hierarchical statistics what is
    charged to any cgroup below it, removed ones included."""
    found = _v1_or_skip()
    try:
        _read_image(found, tmp_path / "disk.img")
        worker = found._dirs["memory"]
        assert _charged_below(worker) >= 4 * MIB  # the image, read by the VMM
        found.remove("vm1")
        assert found.names() == []
        assert _charged_below(worker) == 0
    finally:
        found.remove("vm1")
        found.close()


def _v1_limits(found: CgroupsV1, name: str) -> dict[str, str]:
    files = {
        "memory": ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"],
        "cpu": ["cpu.cfs_period_us", "cpu.cfs_quota_us"],
        "pids": ["pids.max"],
    }
    return {
        file: (found._dirs[controller] / name / file).read_text().strip()
        for controller, names in files.items()
        if controller in found.enforceable
        for file in names
        if (found._dirs[controller] / name / file).exists()
    }


# Larger limits (v1 refuses a memory limit above memsw's: memsw goes first)
# and smaller ones (memory first).
@pytest.mark.parametrize("factor", [2, 0.5])
def test_a_relaunch_keeps_the_vms_empty_cgroup_with_its_limits_rewritten_for_real(
    tmp_path: Path, factor: float
) -> None:
    """A relaunch (a replacement, a restart of a crashed VMM) is on the
    critical path: it keeps the empty cgroup the last VMM left (no release,
    no rmdir, no mkdir: the same directories), rewrites every limit, and
    the final removal still leaves no page charged."""
    found = _v1_or_skip()
    try:
        _read_image(found, tmp_path / "disk.img")
        inodes = {c: (root / "vm1").stat().st_ino for c, root in found._dirs.items()}
        worker = found._dirs["memory"]
        memory = worker / "vm1"
        assert _charged_below(worker) >= 4 * MIB
        # The last VMM's peak (its interpreter and the read) is above what
        # stays charged once it ended (the image's pages).
        peak = int((memory / "memory.max_usage_in_bytes").read_text())
        usage = int((memory / "memory.usage_in_bytes").read_text())
        assert usage < peak
        period = int(100_000 * factor)
        limits = ResourceLimits(
            memory_bytes=int(LIMITS.memory_bytes * factor),
            cpu_quota_us=period * 3 // 2,
            cpu_period_us=period,
            pids=int(LIMITS.pids * factor),
        )
        placement = found.create("vm1", limits)
        assert placement.notes == ()
        assert {c: (root / "vm1").stat().st_ino for c, root in found._dirs.items()} == inodes
        expected = {
            "memory.limit_in_bytes": str(limits.memory_bytes),
            "memory.memsw.limit_in_bytes": str(limits.memory_bytes),
            "cpu.cfs_period_us": str(period),
            "cpu.cfs_quota_us": str(period * 3 // 2),
            "pids.max": str(limits.pids),
        }
        seen = _v1_limits(found, "vm1")
        assert seen == {k: v for k, v in expected.items() if k in seen} and seen
        # The peak starts again for the new VMM, from what is charged now.
        assert int((memory / "memory.max_usage_in_bytes").read_text()) <= usage
        found.remove("vm1")
        assert found.names() == [] and _charged_below(worker) == 0
    finally:
        found.remove("vm1")
        found.close()


def test_a_cgroup_that_saw_an_oom_kill_is_made_anew_for_real(tmp_path: Path) -> None:
    """The kernel's OOM count cannot be reset, and the worker reads it as
    "since the VM's last launch": a cgroup that counts a kill is not kept."""
    found = _v1_or_skip()
    small = dataclasses.replace(LIMITS, memory_bytes=32 * MIB)
    hog = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline(); b = bytearray(256 << 20)"],
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        for tasks in found.create("vm1", small).join:
            Path(tasks).write_text(str(hog.pid))
        assert hog.stdin is not None
        hog.stdin.write(b"go\n")
        hog.stdin.close()
        assert hog.wait(timeout=30) == -9
        assert found.oom_kills("vm1") == 1
        inode = (found._dirs["memory"] / "vm1").stat().st_ino
        found.create("vm1", small)
        assert found.oom_kills("vm1") == 0
        assert (found._dirs["memory"] / "vm1").stat().st_ino != inode
    finally:
        hog.kill()
        hog.wait()
        found.remove("vm1")
        found.close()


def test_v2_relaunch_keeps_the_cgroup_and_a_limit_it_cannot_rewrite_fails_clearly(
    tmp_path: Path,
) -> None:
    """Against a directory shaped like cgroupfs: a relaunch keeps the VM's
    cgroup and rewrites its limits; where one cannot be rewritten, the
    cgroup is made anew (its release and rmdir), and a refusal there is an
    error, never a launch under the last VMM's limits."""
    root = tmp_path / "cgroup2"
    _cgroupfs_tree(root, ["unit.service"], "cpu memory pids\n")
    v2 = CgroupsV2(
        root / "unit.service" / "procurator" / "w-1", root, ["memory", "cpu", "pids"], []
    )
    v2.create("vm1", LIMITS)
    vm = root / "unit.service" / "procurator" / "w-1" / "vm1"
    inode = vm.stat().st_ino
    bigger = dataclasses.replace(LIMITS, memory_bytes=640 * MIB, pids=128)
    assert v2.create("vm1", bigger).notes == ()
    assert vm.stat().st_ino == inode
    assert (vm / "memory.max").read_text() == str(640 * MIB)
    assert (vm / "pids.max").read_text() == "128"
    (vm / "pids.max").unlink()
    (vm / "pids.max").mkdir()  # cannot be written
    with pytest.raises(cgroups.CgroupError, match="cannot remove cgroup"):
        v2.create("vm1", LIMITS)


def test_v2_removal_asks_the_kernel_to_reclaim_what_is_charged_first(tmp_path: Path) -> None:
    """No v2 memory controller runs here: what the v2 release writes is
    checked against a directory shaped like cgroupfs (a plain file takes the
    write; the kernel's would reclaim and read 0 afterwards)."""
    root = tmp_path / "cgroup2"
    _cgroupfs_tree(root, ["unit.service"], "cpu memory pids\n")
    v2 = CgroupsV2(root / "unit.service" / "procurator" / "w-1", root, ["memory"], [])
    v2.create("vm1", LIMITS)
    vm = root / "unit.service" / "procurator" / "w-1" / "vm1"
    (vm / "memory.current").write_text("1236992\n")
    (vm / "memory.reclaim").write_text("")
    with pytest.raises(cgroups.CgroupError):  # a plain directory with files in it
        v2.remove("vm1", timeout=0)
    assert (vm / "memory.reclaim").read_text() == "1236992"


@pytest.fixture
def unified() -> Iterator[Path]:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if "-" in fields and fields[fields.index("-") + 1] == "cgroup2":
            yield Path(fields[4])
            return
    pytest.skip("no cgroup2 hierarchy mounted")


def test_the_v2_driver_places_and_removes_on_the_real_unified_hierarchy(unified: Path) -> None:
    controllers = set((unified / "cgroup.controllers").read_text().split())
    held = [c for c in cgroups.CONTROLLERS if c in controllers]
    v2 = CgroupsV2(unified / PARENT / f"w-{uuid.uuid4().hex[:8]}", unified, held, [])
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        placement = v2.create("vm1", LIMITS)
        Path(placement.join[0]).write_text(str(sleeper.pid))
        assert v2.processes("vm1") == {sleeper.pid}
        own = Path(f"/proc/{sleeper.pid}/cgroup").read_text()
        assert f"0::/{PARENT}/" in own and own.rstrip().endswith("/vm1")
        limits = v2.read_limits(sleeper.pid)
        assert limits.version == 2
        # What this hierarchy cannot limit is None, never a made-up figure.
        assert (limits.memory_bytes is not None) == ("memory" in held)
        assert (limits.pids is not None) == ("pids" in held)
        v2.remove("vm1")
        assert sleeper.wait(timeout=10) == -9
    finally:
        sleeper.kill()
        sleeper.wait()
        v2.remove("vm1")
        v2.close()
