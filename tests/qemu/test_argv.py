"""The VmDefinition -> qemu-system-x86_64 translation (pure, fast)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from procurator.core.errors import ValidationError
from procurator.core.vmdef import (
    Balloon,
    Console,
    Cpus,
    Disk,
    Memory,
    Nic,
    NicTuning,
    Payload,
    Platform,
    Rng,
    Topology,
    VmDefinition,
)
from procurator.worker.vmm.base import VmmPaths, VmmRejected
from procurator.worker.vmm.qemu import QemuDriver, qemu_argv

PATHS = VmmPaths(
    vm_dir=Path("/var/lib/procurator/vms/web-1"),
    api_socket=Path("/var/lib/procurator/vms/web-1/api.sock"),
    event_file=Path("/var/lib/procurator/vms/web-1/events"),
    log_file=Path("/var/lib/procurator/vms/web-1/vmm.log"),
    serial_file=Path("/var/lib/procurator/vms/web-1/serial.log"),
)
MIB = 1024 * 1024


def base(**changes: object) -> VmDefinition:
    definition = VmDefinition(
        payload=Payload(
            kernel="/nix/store/abc-img/vmlinux",
            initramfs="/nix/store/abc-img/initrd",
            cmdline="console=ttyS0",
        ),
        cpus=Cpus(boot_vcpus=2, max_vcpus=2),
        memory=Memory(size=256 * MIB),
        serial_file=str(PATHS.serial_file),
    )
    return dataclasses.replace(definition, **changes)  # type: ignore[arg-type]


def option(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_minimal_definition_under_tcg() -> None:
    argv = qemu_argv(base(), PATHS, accel="tcg")
    assert argv[0] == "qemu-system-x86_64"
    assert "-S" in argv  # paused until QMP says cont
    assert {"-nodefaults", "-no-user-config"} <= set(argv)
    assert option(argv, "-accel") == ["tcg"]
    assert option(argv, "-M")[0].startswith("microvm,")
    assert "acpi=on" in option(argv, "-M")[0]
    assert option(argv, "-smp") == ["2"]
    assert option(argv, "-m") == ["256M"]
    assert option(argv, "-kernel") == ["/nix/store/abc-img/vmlinux"]
    assert option(argv, "-initrd") == ["/nix/store/abc-img/initrd"]
    assert option(argv, "-append") == ["console=ttyS0 tsc_early_khz=2600000"]
    # The worker's serial file.
    assert option(argv, "-chardev")[0] == f"file,id=serial0,path={PATHS.serial_file}"
    assert option(argv, "-serial") == ["chardev:serial0"]
    assert f"socket,id=qmp,path={PATHS.api_socket},server=on,wait=off" in option(argv, "-chardev")
    assert option(argv, "-mon") == ["chardev=qmp,mode=control"]


def test_binary_and_its_own_arguments_come_first() -> None:
    argv = qemu_argv(base(), PATHS, accel="tcg", binary="/opt/my qemu/run", args=["--x", "y"])
    assert argv[:3] == ["/opt/my qemu/run", "--x", "y"]


def test_kvm_uses_host_cpu_and_keeps_cmdline() -> None:
    argv = qemu_argv(base(), PATHS, accel="kvm")
    assert option(argv, "-accel") == ["kvm"]
    assert option(argv, "-cpu") == ["host"]
    assert option(argv, "-append") == ["console=ttyS0"]


def test_tcg_parameter_already_set_is_not_repeated() -> None:
    payload = Payload(kernel="/nix/store/abc-img/vmlinux", cmdline="quiet tsc_early_khz=3000000")
    argv = qemu_argv(base(payload=payload), PATHS, accel="tcg")
    assert option(argv, "-append") == ["quiet tsc_early_khz=3000000"]
    assert option(argv, "-initrd") == []


def test_memory_rounds_up_to_mib() -> None:
    argv = qemu_argv(base(memory=Memory(size=256 * MIB + 1)), PATHS, accel="tcg")
    assert option(argv, "-m") == ["257M"]


def test_disks_nic_and_rng() -> None:
    definition = base(
        disks=(
            Disk(path="/vms/web-1/root.img", id="root"),
            Disk(path="/nix/store/abc-img/data,1.img", readonly=True, direct=True, serial="s1"),
        ),
        net=Nic(tap="pt-web1", mac="52:54:00:12:34:56", host_mac="fe:54:00:12:34:56"),
        rng=Rng(src="/dev/urandom"),
    )
    argv = qemu_argv(definition, PATHS, accel="tcg")
    assert option(argv, "-drive") == [
        "if=none,id=drive-root,file=/vms/web-1/root.img,format=raw,readonly=off",
        # A comma in a path is doubled, as QEMU's option syntax wants.
        "if=none,id=drive-_disk1,file=/nix/store/abc-img/data,,1.img,format=raw,readonly=on,"
        "cache.direct=on",
    ]
    assert option(argv, "-netdev") == ["tap,id=netdev-net0,ifname=pt-web1,script=no,downscript=no"]
    assert option(argv, "-device") == [
        "virtio-blk-device,drive=drive-root,id=id-root",
        "virtio-blk-device,drive=drive-_disk1,id=id-_disk1,serial=s1",
        "virtio-net-device,netdev=netdev-net0,id=id-net0,mac=52:54:00:12:34:56",
        "virtio-rng-device,rng=rng0",
    ]
    assert option(argv, "-object") == ["rng-random,id=rng0,filename=/dev/urandom"]


def test_image_formats_and_the_nic_mtu() -> None:
    definition = base(
        disks=(Disk(path="/d.qcow2", id="disk0", image_type="Qcow2"),),
        net=Nic(tap="pt-web1", mac="52:54:00:12:34:56", tuning=NicTuning(mtu=9000)),
    )
    argv = qemu_argv(definition, PATHS, accel="tcg")
    assert "format=qcow2" in option(argv, "-drive")[0]
    assert option(argv, "-device")[-1].endswith(",host_mtu=9000")


def test_no_serial_file_drops_the_isa_serial() -> None:
    argv = qemu_argv(base(serial_file=None), PATHS, accel="tcg")
    assert option(argv, "-serial") == []
    assert "isa-serial=off" in option(argv, "-M")[0]


def test_a_null_console_is_a_virtio_console() -> None:
    argv = qemu_argv(base(console=Console(mode="Null")), PATHS, accel="tcg")
    assert "null,id=console0" in option(argv, "-chardev")
    assert "virtconsole,chardev=console0,id=console0" in option(argv, "-device")
    assert "virtconsole,chardev=console0,id=console0" not in option(
        qemu_argv(base(), PATHS, accel="tcg"), "-device"
    )


def test_performance_hints_are_left_out() -> None:
    definition = base(
        cpus=Cpus(boot_vcpus=1, max_vcpus=4, max_phys_bits=46, kvm_hyperv=False, nested=False),
        memory=Memory(size=512 * MIB, thp=True, mergeable=False, shared=True),
        disks=(Disk(path="/d", id="disk0", num_queues=4, queue_size=128, sparse=True),),
        platform=Platform(serial_number="sn"),
        iommu=False,
        watchdog=False,
    )
    argv = qemu_argv(definition, PATHS, accel="tcg")
    assert option(argv, "-smp") == ["1"]
    QemuDriver(accel="tcg").check(definition)  # nothing to refuse


def test_every_unsupported_field_is_named() -> None:
    definition = base(
        payload=Payload(firmware="/nix/store/abc-img/fw"),
        cpus=Cpus(boot_vcpus=2, max_vcpus=2, topology=Topology(packages=1), kvm_hyperv=True),
        disks=(Disk(path="/vms/d.img", id="disk0", iommu=True),),
        net=Nic(tap="t0", mac="52:54:00:00:00:01", tuning=NicTuning(iommu=True)),
        balloon=Balloon(size=MIB),
        watchdog=True,
        pvpanic=True,
        rng=Rng(src="/dev/urandom", pci_segment=1),
    )
    with pytest.raises(VmmRejected) as raised:
        qemu_argv(definition, PATHS, accel="tcg")
    problems = "\n".join(raised.value.details)
    for where in (
        "payload.firmware",
        "cpus.topology",
        "cpus.kvm_hyperv",
        "disks[0].iommu",
        "net[0].iommu",
        "balloon",
        "watchdog",
        "pvpanic",
        "rng.pci_segment",
    ):
        assert f"{where}: not supported by the QEMU driver" in problems, where
    assert "web-1" in str(raised.value)
    # The driver refuses the same before anything is taken on the host.
    with pytest.raises(VmmRejected) as checked:
        QemuDriver(accel="tcg").check(definition)
    assert checked.value.details == raised.value.details


def test_ids_must_be_valid_for_qemu_and_unique() -> None:
    with pytest.raises(VmmRejected) as raised:
        qemu_argv(base(disks=(Disk(path="/a", id="bad id"),)), PATHS, accel="tcg")
    assert "disks[0].id" in "\n".join(raised.value.details)
    # Unique ids are the definition's own invariant, whatever the VMM.
    with pytest.raises(ValidationError, match="used twice: x"):
        base(disks=(Disk(path="/a", id="x"), Disk(path="/b", id="x")))
