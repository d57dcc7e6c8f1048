"""The VmConfig -> qemu-system-x86_64 translation (pure, fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from procurator.worker.vmm.base import VmmPaths, VmmRejected
from procurator.worker.vmm.qemu import qemu_argv

PATHS = VmmPaths(
    vm_dir=Path("/var/lib/procurator/vms/web-1"),
    api_socket=Path("/var/lib/procurator/vms/web-1/api.sock"),
    event_file=Path("/var/lib/procurator/vms/web-1/events"),
    log_file=Path("/var/lib/procurator/vms/web-1/vmm.log"),
    serial_file=Path("/var/lib/procurator/vms/web-1/serial.log"),
)


def base_config(**extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 256 * 1024 * 1024},
        "payload": {
            "kernel": "/nix/store/abc-img/vmlinux",
            "initramfs": "/nix/store/abc-img/initrd",
            "cmdline": "console=ttyS0",
        },
    }
    config.update(extra)
    return config


def option(argv: list[str], flag: str) -> list[str]:
    """Every value given to ``flag``."""
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_minimal_config_under_tcg() -> None:
    argv = qemu_argv(base_config(), PATHS, accel="tcg")
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
    # No serial in the config: the worker's serial file.
    assert option(argv, "-chardev")[0] == f"file,id=serial0,path={PATHS.serial_file}"
    assert option(argv, "-serial") == ["chardev:serial0"]
    assert f"socket,id=qmp,path={PATHS.api_socket},server=on,wait=off" in option(argv, "-chardev")
    assert option(argv, "-mon") == ["chardev=qmp,mode=control"]


def test_kvm_uses_host_cpu_and_keeps_cmdline() -> None:
    argv = qemu_argv(base_config(), PATHS, accel="kvm")
    assert option(argv, "-accel") == ["kvm"]
    assert option(argv, "-cpu") == ["host"]
    assert option(argv, "-append") == ["console=ttyS0"]


def test_tcg_parameter_already_set_is_not_repeated() -> None:
    config = base_config()
    config["payload"]["cmdline"] = "console=ttyS0 tsc_early_khz=3000000"
    argv = qemu_argv(config, PATHS, accel="tcg")
    assert option(argv, "-append") == ["console=ttyS0 tsc_early_khz=3000000"]


def test_memory_rounds_up_to_mib() -> None:
    argv = qemu_argv(base_config(memory={"size": 256 * 1024 * 1024 + 1}), PATHS, accel="tcg")
    assert option(argv, "-m") == ["257M"]


def test_disks_nets_and_rng() -> None:
    config = base_config(
        disks=[
            {"path": "/vms/web-1/root.img", "id": "root"},
            {"path": "/nix/store/abc-img/data,1.img", "readonly": True, "direct": True},
        ],
        net=[{"tap": "pt-web1", "mac": "52:54:00:12:34:56", "ip": "192.168.249.1"}],
        rng={"src": "/dev/urandom"},
    )
    argv = qemu_argv(config, PATHS, accel="tcg")
    assert option(argv, "-drive") == [
        "if=none,id=drive-root,file=/vms/web-1/root.img,format=raw,readonly=off",
        # A comma in a path is doubled, as QEMU's option syntax wants.
        "if=none,id=drive-_disk1,file=/nix/store/abc-img/data,,1.img,format=raw,readonly=on,"
        "cache.direct=on",
    ]
    assert option(argv, "-netdev") == ["tap,id=netdev-_net0,ifname=pt-web1,script=no,downscript=no"]
    assert option(argv, "-device") == [
        "virtio-blk-device,drive=drive-root,id=id-root",
        "virtio-blk-device,drive=drive-_disk1,id=id-_disk1",
        "virtio-net-device,netdev=netdev-_net0,id=id-_net0,mac=52:54:00:12:34:56",
        "virtio-rng-device,rng=rng0",
    ]
    assert option(argv, "-object") == ["rng-random,id=rng0,filename=/dev/urandom"]


def test_serial_off_drops_the_isa_serial() -> None:
    argv = qemu_argv(base_config(serial={"mode": "Off"}), PATHS, accel="tcg")
    assert option(argv, "-serial") == []
    assert "isa-serial=off" in option(argv, "-M")[0]


def test_console_file_is_a_virtio_console() -> None:
    config = base_config(console={"mode": "File", "file": "/vms/web-1/console.log"})
    argv = qemu_argv(config, PATHS, accel="tcg")
    assert "file,id=console0,path=/vms/web-1/console.log" in option(argv, "-chardev")
    assert "virtconsole,chardev=console0,id=console0" in option(argv, "-device")


def test_defaults_and_performance_hints_are_accepted() -> None:
    config = base_config(
        cpus={"boot_vcpus": 1, "max_vcpus": 4, "max_phys_bits": 46, "kvm_hyperv": False},
        memory={"size": 512 * 1024 * 1024, "thp": True, "mergeable": False},
        iommu=False,
        watchdog=False,
    )
    argv = qemu_argv(config, PATHS, accel="tcg")
    assert option(argv, "-smp") == ["1"]


def test_every_unsupported_field_is_named() -> None:
    config = base_config(
        memory={"size": 256 * 1024 * 1024, "hugepages": True},
        payload={"firmware": "/nix/store/abc-img/fw", "kernel": "vmlinux"},
        disks=[{"path": "/vms/d.img", "vhost_user": True}],
        net=[{"mac": "not-a-mac"}],
        vsock={"cid": 3, "socket": "/x"},
        serial={"mode": "Pty"},
    )
    with pytest.raises(VmmRejected) as raised:
        qemu_argv(config, PATHS, accel="tcg")
    problems = "\n".join(raised.value.details)
    for where in (
        "memory.hugepages",
        "payload.firmware",
        "payload.kernel",  # relative
        "disks[0].vhost_user",
        "net[0].tap",
        "net[0].mac",
        "config.vsock",
        "serial.mode",
    ):
        assert where in problems, where
    assert "web-1" in str(raised.value)


def test_ids_must_be_unique_and_valid() -> None:
    config = base_config(
        disks=[{"path": "/a", "id": "x"}, {"path": "/b", "id": "x"}],
        net=[{"tap": "t0", "id": "bad id"}],
    )
    with pytest.raises(VmmRejected) as raised:
        qemu_argv(config, PATHS, accel="tcg")
    problems = "\n".join(raised.value.details)
    assert "disks[1].id" in problems
    assert "net[0].id" in problems
