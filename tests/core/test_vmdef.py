"""The typed VM definition and its VmConfig JSON codec: the schema written
down once, read by confinement, the stored state and both VMM backends."""

from __future__ import annotations

from typing import Any

import pytest

from procurator.core.confinement import (
    ALLOWED_KEYS,
    HostSide,
    ImageLimits,
    PathKind,
    ResolvedPath,
    confine,
    host_paths,
)
from procurator.core.errors import ValidationError
from procurator.core.vmdef import (
    Disk,
    Nic,
    Payload,
    RateLimiter,
    TokenBucket,
    VmDefinition,
    read_section,
)

IMG = "/nix/store/" + "a" * 32 + "-web-vm"
MIB = 1 << 20
LIMITER = {
    "bandwidth": {"size": 1 << 20, "refill_time": 100},
    "ops": {"size": 10, "refill_time": 1},
}


def rich_image() -> dict[str, Any]:
    """An image's vm-config.json naming every field an image may name."""
    return {
        "payload": {"kernel": "vmlinux", "initramfs": "initrd", "cmdline": "console=ttyS0"},
        "cpus": {
            "boot_vcpus": 2,
            "max_vcpus": 2,
            "topology": {
                "threads_per_core": 1,
                "cores_per_die": 2,
                "dies_per_package": 1,
                "packages": 1,
            },
            "kvm_hyperv": False,
            "max_phys_bits": 46,
            "nested": False,
        },
        "memory": {
            "size": 256 * MIB,
            "mergeable": True,
            "shared": False,
            "thp": True,
            "prefault": False,
        },
        "disks": [
            {
                "path": "seed.img",
                "readonly": True,
                "direct": False,
                "iommu": False,
                "num_queues": 1,
                "queue_size": 128,
                "serial": "seed",
                "rate_limiter_config": LIMITER,
                "rate_limit_group": "group0",
                "pci_segment": 0,
                "pci_device_id": 3,
                "image_type": "Raw",
                "sparse": True,
                "lock_granularity": "ByteRange",
            }
        ],
        "net": [
            {
                "num_queues": 2,
                "queue_size": 256,
                "mtu": 1500,
                "iommu": False,
                "pci_segment": 0,
                "pci_device_id": 4,
                "rate_limiter_config": LIMITER,
                "offload_tso": True,
                "offload_ufo": True,
                "offload_csum": True,
            }
        ],
        "rng": {"src": "/dev/urandom", "iommu": False, "id": "rng0", "pci_segment": 0},
        "balloon": {"size": 64 * MIB, "deflate_on_oom": True, "free_page_reporting": False},
        "rtc": {"id": "rtc0"},
        "console": {"id": "console0", "iommu": False},
        "platform": {
            "num_pci_segments": 1,
            "system_serial_number": "ssn",
            "serial_number": "sn",
            "system_uuid": "u1",
            "uuid": "u2",
            "oem_strings": ["a", "b"],
            "system_manufacturer": "m",
            "system_product_name": "p",
            "system_version": "v",
            "system_family": "f",
            "system_sku_number": "s",
            "chassis_asset_tag": "t",
        },
        "rate_limit_groups": [{"id": "group0", "rate_limiter_config": LIMITER}],
        "pci_segments": [
            {"pci_segment": 0, "mmio32_aperture_weight": 1, "mmio64_aperture_weight": 2}
        ],
        "iommu": False,
        "watchdog": True,
        "pvpanic": True,
    }


def confined_rich() -> VmDefinition:
    config = rich_image()
    resolved = {
        path: ResolvedPath(real=path, kind=PathKind.FILE, size=4096)
        for path in host_paths(config, IMG).values()
    }
    return confine(
        config,
        image_dir=IMG,
        closure=frozenset({IMG}),
        resolved=resolved,
        limits=ImageLimits(max_vcpus=4, max_memory_mib=1024),
        host=HostSide(serial_file="/var/s.log", console_mode="Null"),
        disk_dir="/var/disks",
    ).definition


def test_every_field_an_image_may_name_reaches_the_definition() -> None:
    """The allow-list is the schema: nothing an image may name is dropped on
    the way (only the worker's parts are set: paths, ids, serial, console
    mode)."""
    rendered = confined_rich().to_vm_config()
    expected = rich_image()
    expected["payload"] |= {"kernel": f"{IMG}/vmlinux", "initramfs": f"{IMG}/initrd"}
    expected["disks"][0] |= {"path": f"{IMG}/seed.img", "id": "disk0"}
    expected["console"] |= {"mode": "Null"}
    expected["serial"] = {"mode": "File", "file": "/var/s.log"}
    del expected["net"]  # the NIC waits for the worker's tap (attach_nic)
    assert rendered == expected
    assert set(rendered) <= set(ALLOWED_KEYS)


def test_a_stored_definition_reads_back_as_it_was_written() -> None:
    definition = confined_rich().with_nic(
        Nic(tap="pvm-web", mac="52:54:00:00:00:01", host_mac="fe:54:00:00:00:01"),
        cmdline="console=ttyS0 ip=10.0.0.2",
    )
    assert VmDefinition.from_vm_config(definition.to_vm_config()) == definition


def test_a_stored_definition_that_is_not_one_is_refused_with_every_problem() -> None:
    with pytest.raises(ValidationError) as info:
        VmDefinition.from_vm_config(
            {
                "cpus": {"boot_vcpus": "two"},
                "disks": [{"readonly": True}],
                "net": [{"tap": "a", "mac": "m"}, {"tap": "b", "mac": "n"}],
                "serial": {"mode": "Tty"},
                "bogus": 1,
                "watchdog": "yes",
            }
        )
    details = info.value.details
    assert "bogus: not a field of a VM definition" in details
    assert "cpus.boot_vcpus: must be an integer, not a string" in details
    assert "disks[0].path: required" in details
    assert "net: 2 entries; a VM has one NIC" in details
    assert "serial: {'mode': 'Tty'} is neither a file nor off" in details
    assert "watchdog: must be a boolean, not a string" in details
    assert "payload: required" in details


def test_the_definitions_invariants() -> None:
    with pytest.raises(ValidationError, match="neither a kernel nor a firmware"):
        VmDefinition(payload=Payload(cmdline="quiet"))
    with pytest.raises(ValidationError, match="not an absolute path"):
        VmDefinition(payload=Payload(kernel="vmlinux"))
    with pytest.raises(ValidationError, match="device ids used twice: net0"):
        VmDefinition(
            payload=Payload(kernel="/k"),
            disks=(Disk(path="/d", id="net0"),),
            net=Nic(tap="t", mac="m"),
        )


def test_sections_are_read_with_every_problem_named() -> None:
    problems: list[str] = []
    limiter = read_section(
        RateLimiter,
        {"bandwidth": {"size": 1}, "ops": {"size": 1, "refill_time": 2}, "burst": 3},
        "disks[0].rate_limiter_config",
        problems,
    )
    assert limiter == RateLimiter(bandwidth=None, ops=TokenBucket(size=1, refill_time=2))
    assert problems == [
        "disks[0].rate_limiter_config.bandwidth.refill_time: required",
        "disks[0].rate_limiter_config.burst: unknown or not allowed; allowed: bandwidth, ops",
    ]
    problems = []
    assert read_section(Disk, {"path": 3}, "disks[1]", problems, refused={"x": "no"}) is None
    assert problems == ["disks[1].path: must be a string, not an integer"]
