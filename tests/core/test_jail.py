"""The jail's pure parts: policy, limits, uid slots, the VM's paths, and
what an observed confinement says."""

from __future__ import annotations

import pytest

from procurator.core.errors import ValidationError
from procurator.core.jail import (
    CPU_PERIOD_US,
    DEFAULT_UID_FIRST,
    Confinement,
    JailPolicy,
    Layer,
    LimitsRead,
    SlotTable,
    limits_for,
    plan_vm_paths,
)
from procurator.core.metrics import VmSnapshot, group_samples, vm_samples
from procurator.core.models import Phase
from procurator.core.vmdef import VmDefinition

MIB = 1 << 20


def _definition(**extra: object) -> VmDefinition:
    config: dict[str, object] = {
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 256 * MIB},
        "payload": {"kernel": "/nix/store/abc-vm/vmlinux", "initramfs": "/nix/store/abc-vm/initrd"},
    }
    config.update(extra)
    return VmDefinition.from_vm_config(config)


def test_the_default_range_is_systemds_unused_one() -> None:
    policy = JailPolicy()
    assert policy.uid_first == DEFAULT_UID_FIRST == 0x70000000
    assert policy.uid(0) == 0x70000000 and policy.uid_last == 0x70000000 + 65535
    assert policy.slot_of(0x70000001) == 1
    assert policy.slot_of(0) is None and policy.slot_of(policy.uid_last + 1) is None
    with pytest.raises(ValueError, match="outside"):
        policy.uid(65536)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"uid_first": 0}, "must start above 0"),
        ({"uid_count": 0}, "at least one id"),
        ({"uid_first": 2**32 - 10, "uid_count": 100}, "runs past"),
        ({"memory_overhead_mib": 8}, "at least 16 MiB"),
        ({"cpu_overcommit": 0.0}, "CPU overcommit"),
        ({"cpu_overcommit": float("nan")}, "CPU overcommit"),
        ({"pids_max": 2}, "pids.max"),
        ({"cgroup_parent": ""}, "cgroup parent"),
        ({"cgroup_parent": "a/../b"}, "cgroup parent"),
    ],
)
def test_a_policy_that_could_run_no_vmm_is_refused(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(ValidationError) as raised:
        JailPolicy(**kwargs)  # type: ignore[arg-type]
    assert any(problem in line for line in raised.value.details), raised.value.details


def test_slots_are_the_lowest_free_ones() -> None:
    table = SlotTable(3)
    assert [table.take_free(vm) for vm in ("a", "b", "c", "d")] == [0, 1, 2, None]
    table.pop("b")
    assert table.take_free("e") == 1
    assert not table.take("f", 0)  # a's


def test_limits_are_the_guests_plus_the_vmms_overhead() -> None:
    limits = limits_for(_definition(), JailPolicy(memory_overhead_mib=64))
    assert limits.memory_bytes == 320 * MIB
    assert limits.cpu_quota_us == CPU_PERIOD_US and limits.cpus == 1.0
    assert limits.pids == 256


def test_cpu_follows_the_vcpus_and_the_overcommit() -> None:
    four = _definition(cpus={"boot_vcpus": 4, "max_vcpus": 8})
    assert limits_for(four, JailPolicy()).cpus == 4.0
    assert limits_for(four, JailPolicy(cpu_overcommit=4.0)).cpus == 1.0
    assert limits_for(four, JailPolicy(cpu_overcommit=3.0)).cpu_quota_us == 133_334
    # Never below a millisecond per period, however high the overcommit.
    assert limits_for(four, JailPolicy(cpu_overcommit=1000)).cpu_quota_us == 1000


def test_the_vm_paths_are_its_writable_dirs_and_its_readonly_files() -> None:
    definition = _definition(
        disks=[
            {"path": "/state/vms/a/disks/img/disk0.img", "id": "disk0"},
            {"path": "/nix/store/abc-vm/data.img", "id": "disk1", "readonly": True},
        ],
        serial={"mode": "File", "file": "/state/vms/a/run/serial.log"},
        rng={"src": "/dev/urandom"},
    )
    plan = plan_vm_paths(definition, ["/state/vms/a/run", "/state/vms/a/disks/"])
    assert plan.writable == ("/state/vms/a/run", "/state/vms/a/disks")
    assert plan.readonly == (
        "/nix/store/abc-vm/vmlinux",
        "/nix/store/abc-vm/initrd",
        "/nix/store/abc-vm/data.img",
    )
    assert plan.devices == ("/dev/urandom",)


def test_a_writable_path_outside_the_vms_dirs_is_refused_naming_each() -> None:
    definition = _definition(
        disks=[{"path": "/var/lib/other/disk.img", "id": "disk0"}],
        serial={"mode": "File", "file": "/state/vms/b/run/serial.log"},
    )
    with pytest.raises(ValidationError) as raised:
        plan_vm_paths(definition, ["/state/vms/a/run"])
    assert len(raised.value.details) == 2
    assert "disks[0].path: /var/lib/other/disk.img is outside" in raised.value.details[0]
    assert "serial.file: /state/vms/b/run/serial.log is outside" in raised.value.details[1]
    # A sibling whose name starts like the directory is not inside it.
    sneaky = _definition(disks=[{"path": "/state/vms/a/run-evil/disk.img", "id": "d"}])
    with pytest.raises(ValidationError):
        plan_vm_paths(sneaky, ["/state/vms/a/run"])


def _confinement(**changes: object) -> Confinement:
    base: dict[str, object] = {
        "jailed": True,
        "uid": 0x70000000,
        "gid": 0x70000000,
        "capabilities": 0,
        "no_new_privs": True,
        "own_mount_ns": True,
        "own_pid_ns": True,
        "seccomp_filters": 1,
        "limits": LimitsRead(version=1, path="/x/vm1", memory_bytes=512 * MIB, cpus=1.0, pids=256),
    }
    base.update(changes)
    return Confinement(**base)  # type: ignore[arg-type]


def test_a_whole_jail_misses_nothing() -> None:
    full = _confinement()
    assert all(full.enforced().values()) and full.missing() == ()
    assert full.summary() == (
        "uid 1879048192; mount+pid ns; seccomp (1 filter); "
        "cgroup v1: memory.max 512 MiB, cpu.max 1 CPU, pids.max 256"
    )


def test_every_missing_layer_is_said() -> None:
    partial = _confinement(
        seccomp_filters=0,
        own_pid_ns=False,
        limits=LimitsRead(version=1, memory_bytes=None, cpus=1.0, pids=None),
        notes=("memory: not enforced: no cgroup v1 hierarchy has the memory controller",),
    )
    held = partial.enforced()
    assert not held[Layer.SECCOMP] and not held[Layer.PID_NS] and not held[Layer.MEMORY]
    assert held[Layer.CPU] and held[Layer.UID]
    assert partial.missing() == (
        "sees every process of the host (no pid namespace)",
        "no syscall filter installed",
        "no memory limit (memory.max)",
        "no task limit (pids.max)",
        "memory: not enforced: no cgroup v1 hierarchy has the memory controller",
    )
    assert "memory.max unset" in partial.summary()


def test_root_with_capabilities_is_not_a_jail() -> None:
    root = _confinement(jailed=False, uid=0, capabilities=0x1FF, no_new_privs=False)
    assert not root.enforced()[Layer.UID]
    assert root.missing()[0] == (
        "runs as uid 0 with capabilities 0x1ff, may gain privileges by exec"
    )
    nothing = Confinement(
        jailed=False,
        uid=0,
        gid=0,
        capabilities=0x1FF,
        no_new_privs=False,
        own_mount_ns=False,
        own_pid_ns=False,
        seccomp_filters=0,
    )
    assert nothing.summary() == "unconfined (runs as root, sees the host)"


def test_a_vms_confinement_is_in_its_metrics() -> None:
    samples = vm_samples(
        VmSnapshot(
            id="web-1",
            phase=Phase.RUNNING,
            confinement=_confinement(limits=LimitsRead(version=2, memory_bytes=64 * MIB)),
        )
    )
    layers = {
        dict(s.labels)["layer"]: s.value for s in samples if s.name == "procurator_vm_confinement"
    }
    assert layers == {
        "uid": 1.0,
        "mount-ns": 1.0,
        "pid-ns": 1.0,
        "seccomp": 1.0,
        "memory": 1.0,
        "cpu": 0.0,
        "pids": 0.0,
    }
    limits = {s.name: s.value for s in samples if s.name.endswith("_limit_bytes")}
    assert limits == {"procurator_vm_memory_limit_bytes": 64.0 * MIB}
    # A limit that does not hold is absent, not a made-up number.
    assert not [
        s for s in samples if s.name in ("procurator_vm_cpu_limit_cpus", "procurator_vm_pids_limit")
    ]
    # Every sample fits the catalogue the master relays with.
    families, dropped = group_samples(samples, prefix=(("worker", "w1"),))
    assert dropped == 0 and families
