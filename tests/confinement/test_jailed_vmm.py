"""A jailed VMM, through the worker's launch path: what it can and cannot
do, asserted from what it reports itself (the fake VMM's escape probe)
and from the outside (/proc, its cgroup); its limits, OOM, removal,
re-adoption and the sweep."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fleethelpers import AddImage
from vmmhelpers import (
    CGROUP_PARENT,
    ManagerFactory,
    Recorder,
    config,
    definition,
    fake_driver,
    make_jail,
    write_faults,
)

from procurator.core.jail import JailPolicy, Layer, limits_for
from procurator.core.models import EventKind, Phase
from procurator.core.vmdef import VmDefinition
from procurator.worker import cgroups
from procurator.worker.jail import JAIL_FILE, Jail, instance_name
from procurator.worker.manager import VmSpec
from procurator.worker.state import StateDir
from procurator.worker.vmm import process
from procurator.worker.vmm.base import VmmError
from procurator.worker.vmm.cloud_hypervisor import CloudHypervisorDriver

HERE = Path(__file__).resolve().parent
WORKER_PROC = HERE.parent / "vmm" / "worker_proc.py"
MIB = 1 << 20


def _alive(pid: int) -> bool:
    return process.pid_start_ticks(pid) is not None


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _cgroup_dirs(state_dir: Path, vm_id: str) -> list[Path]:
    """Where VM ``vm_id``'s cgroup is in every hierarchy used."""
    found = cgroups.detect(os.environ["PROCURATOR_CGROUP_PARENT"], instance_name(state_dir))
    roots = {d for d in getattr(found, "_dirs", {}).values()}
    return sorted(root / vm_id for root in roots)


def _wait_for(predicate: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.02)


def test_a_jailed_vmm_fails_every_escape_it_tries(
    make_manager: ManagerFactory, state_dir: Path, add_image: AddImage, recorder: Recorder
) -> None:
    """VM ``a``'s VMM tries, from inside its jail, to read /etc/shadow, the
    worker's TLS key, the worker's records, another VM's disk; to write into
    the Nix store (its own kernel's store path, and beside it); to connect to
    another VM's API socket; to see or signal the worker; to fork past
    pids.max; to become root again. Every attempt fails, each for the reason
    its layer gives, and what it may do (read its kernel, write its run
    directory) works."""
    image = add_image("jail-probe", config())
    kernel = f"{image}/vmlinux"
    tls_key = state_dir / "tls" / "worker.key"
    tls_key.parent.mkdir()
    tls_key.write_text("-----BEGIN PRIVATE KEY-----\nnot really\n")
    tls_key.chmod(0o600)
    state = StateDir(state_dir)
    # VM b: a running VMM with a writable disk copy in its own directory.
    b_disk = state.vm_dir("b") / "disks" / "img" / "disk0.img"
    b_disk.parent.mkdir(parents=True)
    b_disk.write_bytes(b"\0" * 4096)
    b_def = definition(disks=[{"path": str(b_disk), "id": "disk0"}])
    a_paths, b_paths = state.paths("a"), state.paths("b")
    escape = f"{image}/escape"
    beside = f"/nix/store/escape-{uuid.uuid4().hex}"  # a name nobody else writes
    write_faults(
        state_dir,
        "a",
        {
            "probe": {
                "read": [
                    "/etc/shadow",
                    str(tls_key),
                    str(state.vm_dir("a") / "vm.json"),
                    str(b_disk),
                    kernel,
                ],
                "write": [escape, beside, str(a_paths.run_dir / "mine")],
                "connect": [str(b_paths.api_socket)],
                "signal": [os.getpid(), 1],
                "fork": 200,
                "setuid": True,
                "namespaces": True,
            }
        },
    )
    manager = make_manager(policy_pids_max=32)
    manager.ensure(VmSpec("b", "h1", b_def))
    a_def = dataclasses.replace(
        definition(), payload=dataclasses.replace(definition().payload, kernel=kernel)
    )
    a = manager.ensure(VmSpec("a", "h1", a_def))
    assert a.phase is Phase.RUNNING and a.pid is not None

    probe = json.loads((a_paths.run_dir / "probe.json").read_text())
    uid = manager.jail.uid_of("a") if manager.jail is not None else None
    assert uid is not None and probe["uid"] == uid and uid != manager.jail.uid_of("b")  # type: ignore[union-attr]
    assert probe["capabilities"] == 0
    assert probe["read"] == {
        "/etc/shadow": "ENOENT",  # not in its root
        str(tls_key): "ENOENT",
        str(state.vm_dir("a") / "vm.json"): "ENOENT",  # the worker's records: not shown
        str(b_disk): "ENOENT",  # another VM's directory: not shown
        kernel: "ok",  # its own image's store path: shown, read-only
    }
    assert probe["write"] == {
        escape: "EROFS",  # its own store path is read-only
        beside: "EROFS",  # so is everything but its writable directories
        str(a_paths.run_dir / "mine"): "ok",
    }
    assert probe["connect"] == {str(b_paths.api_socket): "ENOENT"}
    # Its own pid namespace: it is pid 1 and sees nobody else.
    assert probe["pid"] == 1 and probe["processes"] == [1]
    assert probe["signal"] == {str(os.getpid()): "ESRCH", "1": "ok"}  # "1" is itself
    assert probe["fork"]["error"] == "EAGAIN" and probe["fork"]["forked"] < 32
    assert probe["setuid"] == probe["setgid"] == probe["setgroups"] == "EPERM"
    # The jail's own seccomp filter (probed before the fake installs its
    # own): no user namespace, whose capabilities would open much more of
    # the kernel, nor any other.
    assert probe["unshare_user"] == probe["unshare_mount"] == "EPERM"
    assert not Path(escape).exists() and not Path(beside).exists()

    # From the outside: the same VMM as the worker recorded it.
    status = _status(a.pid)
    assert status["Uid"].split() == [str(uid)] * 4
    assert status["NoNewPrivs"] == "1" and int(status["CapEff"], 16) == 0
    assert status["Seccomp"] == "2"
    # The jail's filter, and its own (cloud-hypervisor --seccomp true).
    assert status["Seccomp_filters"] == "2"
    # cloud-hypervisor's own layers asked for: its filter, and Landlock with
    # the paths the jail shows it (its run directory rw, its kernel r).
    argv = Path(f"/proc/{a.pid}/cmdline").read_bytes().decode().split("\0")
    assert argv[argv.index("--seccomp") + 1] == "true" and "--landlock" in argv
    rules = {argv[i + 1] for i, arg in enumerate(argv) if arg == "--landlock-rules"}
    assert f"path={a_paths.run_dir},access=rw" in rules
    assert any(r.startswith(f"path={image}") and r.endswith(",access=r") for r in rules), rules
    limits = limits_for(a_def, JailPolicy(pids_max=32))
    seen = a.confinement
    assert seen is not None and seen.jailed and all(seen.enforced().values())
    assert seen.limits.memory_bytes == limits.memory_bytes
    assert seen.limits.cpus == limits.cpus and seen.limits.pids == 32
    assert not [e for e in recorder.events("a") if e.kind is EventKind.WARNING]
    # Its files are its own; the worker's records are not.
    assert a_paths.run_dir.stat().st_uid == uid
    assert (a_paths.run_dir / "mine").stat().st_uid == uid
    assert state.vm_dir("a").stat().st_uid == 0
    # The run directory's owner is the uid's record: no file of its own.
    assert not (state.vm_dir("a") / JAIL_FILE).exists()


def test_a_limit_the_host_cannot_enforce_is_a_warning_event(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    """A host whose cgroups lack a controller (here: this host's mount table
    without its pids hierarchy): the VM still runs, jailed, and a warning
    event says which limit does not hold and why."""
    without_pids = "\n".join(
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if not (" - cgroup " in line and "pids" in line.rsplit(" ", 1)[-1].split(","))
    )
    found = cgroups.detect(CGROUP_PARENT, instance_name(state_dir), mountinfo=without_pids)
    if not isinstance(found, cgroups.CgroupsV1):
        pytest.skip(f"this host does not use cgroup v1 for the controllers: {found.describe()}")
    manager = make_manager(
        jail=Jail(JailPolicy(cgroup_parent=CGROUP_PARENT), state_dir, cgroups=found)
    )
    obs = manager.ensure(VmSpec("vm1", "h1", definition()))
    assert obs.phase is Phase.RUNNING and obs.confinement is not None
    enforced = obs.confinement.enforced()
    assert not enforced[Layer.PIDS] and enforced[Layer.MEMORY] and enforced[Layer.CPU]
    [warning] = [e for e in recorder.events("vm1") if e.kind is EventKind.WARNING]
    assert "pids: not enforced: no cgroup v1 hierarchy has the pids controller" in warning.message


def test_unconfined_is_reported_not_silent(
    make_manager: ManagerFactory, recorder: Recorder
) -> None:
    manager = make_manager(jail=None)
    obs = manager.ensure(VmSpec("vm1", "h1", definition()))
    assert obs.confinement is not None and not obs.confinement.jailed
    assert obs.confinement.summary().startswith("not jailed: uid 0 (root); no namespaces")
    [warning] = [e for e in recorder.events("vm1") if e.kind is EventKind.WARNING]
    assert warning.message.startswith("not confined (--unconfined)")
    assert "uid 0" in warning.message and "no memory limit" in warning.message


def test_past_memory_max_the_vmm_is_killed_and_the_event_names_the_oom(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    manager = make_manager(policy_memory_overhead_mib=64)
    limit = (256 + 64) * MIB
    # The fake allocates past its memory.max (guest 256 MiB + 64 MiB) once booted.
    write_faults(state_dir, "vm1", {"allocate_after_boot": limit // MIB + 64})
    first = manager.ensure(VmSpec("vm1", "h1", definition()))
    assert first.confinement is not None and first.confinement.limits.memory_bytes == limit
    recorder.wait_for(lambda: EventKind.CRASHED in recorder.kinds("vm1"))
    [crash] = [e for e in recorder.events("vm1") if e.kind is EventKind.CRASHED]
    assert "OOM killer" in crash.message and "memory.max (320 MiB" in crash.message
    assert not _alive(first.pid or 0)
    # Without the fault it runs again (a restart under a fresh cgroup).
    write_faults(state_dir, "vm1", {})
    recorder.wait_for(lambda: EventKind.RESTARTED in recorder.kinds("vm1"))


def test_the_cgroup_and_the_uid_go_with_the_vm(
    make_manager: ManagerFactory, state_dir: Path
) -> None:
    manager = make_manager()
    jail = manager.jail
    assert jail is not None
    one = manager.ensure(VmSpec("one", "h1", definition()))
    two = manager.ensure(VmSpec("two", "h1", definition()))
    assert (jail.uid_of("one"), jail.uid_of("two")) == (
        JailPolicy().uid_first,
        JailPolicy().uid_first + 1,
    )
    dirs = _cgroup_dirs(state_dir, "one")
    assert dirs and all(d.is_dir() for d in dirs)
    pid = one.pid
    assert pid is not None
    assert all(pid in {int(p) for p in (d / "cgroup.procs").read_text().split()} for d in dirs)
    manager.remove("one")
    assert not any(d.exists() for d in dirs)
    assert jail.uid_of("one") is None
    # The freed uid is the next VM's: uids stay dense.
    three = manager.ensure(VmSpec("three", "h1", definition()))
    assert jail.uid_of("three") == JailPolicy().uid_first and three.pid != two.pid


def test_the_next_worker_reads_each_vms_uid_from_its_run_directory(state_dir: Path) -> None:
    # Issue 31: a jail.json per VM was a new inode per start; the run
    # directory, given to the VM's uid at every launch, records it already.
    policy = JailPolicy()
    first, second = policy.uid_first, policy.uid_first + 1
    vms = state_dir / "vms"
    for vm_id, owner in (("a-given", first), ("never-given", 0), ("b-same-uid", first)):
        (vms / vm_id / "run").mkdir(parents=True)
        os.chown(vms / vm_id / "run", owner, owner)
    (vms / "older").mkdir()  # an earlier release's record: still read
    (vms / "older" / JAIL_FILE).write_text(json.dumps({"uid": second, "gid": second}))
    (vms / "broken").mkdir()
    (vms / "broken" / JAIL_FILE).write_text("{")
    (vms / "stray-file").write_text("not a VM's directory")
    jail = make_jail(state_dir)
    try:
        assert jail.uid_of("a-given") == first
        assert jail.uid_of("older") == second
        assert jail.uid_of("never-given") is None and jail.uid_of("broken") is None
        assert jail.uid_of("b-same-uid") is None  # another VM's uid: it gets a new one
        assert jail.uid_of("stray-file") is None
    finally:
        jail.close()


def test_a_restart_keeps_the_vms_cgroup_and_its_uid(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    """A crashed VMM's restart runs in the cgroup its last VMM left (kept,
    its limits rewritten: the same directory, not one made anew) under the
    VM's uid."""
    manager = make_manager()
    first = manager.ensure(VmSpec("vm1", "h1", definition()))
    assert first.pid is not None
    uid = manager.jail.uid_of("vm1") if manager.jail else None
    kept = [d.stat().st_ino for d in _cgroup_dirs(state_dir, "vm1")]
    os.kill(first.pid, signal.SIGKILL)
    recorder.wait_for(lambda: EventKind.RESTARTED in recorder.kinds("vm1"))
    again = manager.get_or_raise("vm1")
    _wait_for(lambda: manager.get_or_raise("vm1").phase is Phase.RUNNING, "running again")
    again = manager.get_or_raise("vm1")
    assert again.pid not in (None, first.pid)
    assert again.confinement is not None and again.confinement.uid == uid
    dirs = _cgroup_dirs(state_dir, "vm1")
    assert [d.stat().st_ino for d in dirs] == kept  # the same cgroups, not made anew
    assert {int(p) for p in (dirs[0] / "cgroup.procs").read_text().split()} == {again.pid}


def test_a_worker_killed_9_readopts_its_jailed_vmms(
    make_manager: ManagerFactory, state_dir: Path, recorder: Recorder
) -> None:
    """kill -9 of the worker (tests/vmm/worker_proc.py, which jails its
    VMMs like a worker): the VMMs keep running in their jails, its jailer
    ends with it, and the next worker re-adopts each VMM with its uid, its
    cgroup and its limits."""
    worker = subprocess.Popen(
        [sys.executable, str(WORKER_PROC), str(state_dir), "a", "b"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert worker.stdout is not None
        pids = json.loads(worker.stdout.readline())
        uids = {vm: int(_status(pid)["Uid"].split()[0]) for vm, pid in pids.items()}
    finally:
        worker.kill()
        worker.wait()
        if worker.stdout is not None:
            worker.stdout.close()
    assert all(_alive(pid) for pid in pids.values())
    manager = make_manager()
    recovered = {o.vm_id: o for o in manager.recover()}
    for vm_id, pid in pids.items():
        seen = recovered[vm_id]
        assert seen.pid == pid and seen.phase is Phase.RUNNING  # re-adopted, not restarted
        assert seen.confinement is not None and seen.confinement.jailed
        assert seen.confinement.uid == uids[vm_id] == manager.jail.uid_of(vm_id)  # type: ignore[union-attr]
        assert seen.confinement.enforced()[Layer.MEMORY]
        assert "re-adopted" in recorder.events(vm_id)[0].message
        assert f"uid {uids[vm_id]}" in recorder.events(vm_id)[0].message
    # A new VM gets a uid no re-adopted VMM has.
    c = manager.ensure(VmSpec("c", "h1", definition()))
    assert c.confinement is not None and c.confinement.uid not in uids.values()


def test_the_sweep_kills_and_removes_what_no_vm_owns(
    make_manager: ManagerFactory, state_dir: Path, driver: Any
) -> None:
    """A VM whose state is gone but whose VMM still runs (its directory
    deleted by hand): the next worker's sweep finds it by its cgroup, kills
    it and removes the cgroup."""
    manager = make_manager()
    lost = manager.ensure(VmSpec("lost", "h1", definition()))
    assert lost.pid is not None
    manager.close()
    assert manager.jail is not None
    manager.jail.close()
    shutil.rmtree(StateDir(state_dir).vm_dir("lost"))
    jail = make_jail(state_dir)
    try:
        assert jail.sweep(owned=set()) == ["lost"]
        assert not _alive(lost.pid)
        assert not any(d.exists() for d in _cgroup_dirs(state_dir, "lost"))
    finally:
        jail.close()


def test_a_path_the_vm_needs_that_is_not_there_is_refused(
    make_manager: ManagerFactory, recorder: Recorder
) -> None:
    manager = make_manager()
    missing = VmDefinition.from_vm_config(config(payload={"kernel": "/nix/store/0-gone/vmlinux"}))
    with pytest.raises(Exception, match="not there") as raised:
        manager.ensure(VmSpec("vm1", "h1", missing))
    assert "/nix/store/0-gone/vmlinux" in str(raised.value.details)  # type: ignore[attr-defined]
    assert manager.get_or_raise("vm1").phase is Phase.FAILED


def test_a_writable_path_outside_the_vm_is_refused(
    make_manager: ManagerFactory, tmp_path: Path
) -> None:
    manager = make_manager()
    outside = tmp_path / "disk.img"
    outside.write_bytes(b"\0" * 512)
    bad = definition(disks=[{"path": str(outside), "id": "disk0"}])
    with pytest.raises(Exception, match="cannot run in its jail") as raised:
        manager.ensure(VmSpec("vm1", "h1", bad))
    assert "outside the VM's writable directories" in str(raised.value.details)  # type: ignore[attr-defined]


def test_limits_follow_the_definition(make_manager: ManagerFactory) -> None:
    manager = make_manager(policy_cpu_overcommit=2.0, policy_memory_overhead_mib=32)
    big = definition(cpus={"boot_vcpus": 3, "max_vcpus": 3}, memory={"size": 128 * MIB})
    obs = manager.ensure(VmSpec("vm1", "h1", big))
    assert obs.confinement is not None
    assert obs.confinement.limits.memory_bytes == 160 * MIB
    assert obs.confinement.limits.cpus == 1.5
    summary = obs.confinement.summary()
    assert "memory.max 160 MiB" in summary and "cpu.max 1.5 CPU" in summary


@pytest.fixture
def late_runtime(tmp_path: Path) -> Iterator[tuple[Path, CloudHypervisorDriver]]:
    """A driver whose VMM needs a runtime file that is not there yet."""
    late = tmp_path / "late-runtime-file"
    drv = fake_driver(runtime_paths=[str(late)])
    yield late, drv
    drv.close()


def test_a_runtime_file_of_the_vmm_missing_is_retried_not_fatal(
    late_runtime: tuple[Path, CloudHypervisorDriver], make_manager: ManagerFactory
) -> None:
    # The VMM's own files, not the VM's (its package mid-upgrade): a
    # temporary failure, tried again, not the VM refused for good.
    late, driver = late_runtime
    manager = make_manager(driver=driver)
    with pytest.raises(VmmError, match="not there") as raised:
        manager.ensure(VmSpec("vm1", "h1", definition()))
    assert str(late) in str(raised.value.details)
    assert manager.get_or_raise("vm1").phase is not Phase.FAILED
    late.write_text("here now\n")
    _wait_for(
        lambda: manager.get_or_raise("vm1").phase is Phase.RUNNING,
        "the VM started once its VMM's runtime file is there",
    )
