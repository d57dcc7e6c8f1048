"""Confinement of an image's vm-config.json: the pure rules, without Nix.

The adapter's part (resolving symlinks on disk) is played by ``resolved``
here; tests/nix/test_image.py does the same against a real store.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from procurator.core.confinement import (
    ALLOWED_KEYS,
    Confined,
    DiskCopy,
    HostSide,
    ImageLimits,
    PathKind,
    ResolvedPath,
    attach_nic,
    confine,
    host_paths,
)
from procurator.core.errors import ValidationError
from procurator.core.vmdef import Nic, NicTuning

IMG = "/nix/store/" + "a" * 32 + "-web-vm"
KERNEL_PKG = "/nix/store/" + "b" * 32 + "-linux-6.1"
STRANGER = "/nix/store/" + "c" * 32 + "-not-in-closure"
CLOSURE = frozenset({IMG, KERNEL_PKG})
DISK_DIR = "/var/lib/procurator/vms/web/disks/" + IMG.rsplit("/", 1)[1]
LIMITS = ImageLimits(max_vcpus=4, max_memory_mib=2048)
NET = {"tap": "pvm-web", "mac": "52:54:00:12:34:56"}
NIC = Nic(tap=NET["tap"], mac=NET["mac"])
IP_ARG = "ip=10.0.0.2::10.0.0.1:255.255.255.0"
HOST = HostSide(serial_file="/var/s.log")
MIB = 1 << 20


def resolve_all(
    config: Any,
    *,
    links: Mapping[str, str] | None = None,
    kinds: Mapping[str, PathKind] | None = None,
    size: int = 4096,
) -> dict[str, ResolvedPath]:
    """What a real filesystem would say: every path is a file unless told."""
    links, kinds = links or {}, kinds or {}
    return {
        path: ResolvedPath(
            real=links.get(path, path), kind=kinds.get(path, PathKind.FILE), size=size
        )
        for path in host_paths(config, IMG).values()
    }


@dataclass(frozen=True)
class Ran:
    """What the VMM would be given (``config``: the VmConfig JSON), the
    disk copies it relies on, and the confined image itself."""

    config: dict[str, Any]
    copies: tuple[DiskCopy, ...]
    confined: Confined


def run(
    config: Any,
    *,
    host: HostSide = HOST,
    nic: Nic | None = NIC,
    limits: ImageLimits = LIMITS,
    **kw: Any,
) -> Ran:
    """Confine ``config``, then attach ``nic`` (and the guest's ``ip=``) as
    the worker does once the image is accepted."""
    confined = confine(
        config,
        image_dir=IMG,
        closure=CLOSURE,
        resolved=resolve_all(config, **kw),
        limits=limits,
        host=host,
        disk_dir=DISK_DIR,
    )
    definition = (
        attach_nic(confined, nic=nic, cmdline_extra=IP_ARG, limits=limits)
        if nic is not None
        else confined.definition
    )
    return Ran(definition.to_vm_config(), confined.copies, confined)


def problems(config: Any, **kw: Any) -> tuple[str, ...]:
    with pytest.raises(ValidationError) as info:
        run(config, **kw)
    assert info.value.details, "a refusal must say why"
    return info.value.details


def valid() -> dict[str, Any]:
    return {
        "payload": {"kernel": "vmlinux", "initramfs": "initrd.img", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 256 * MIB},
        "disks": [{"path": "disk.img"}, {"path": f"{KERNEL_PKG}/modules.img", "readonly": True}],
        "rng": {"src": "/dev/urandom"},
    }


# ------------------------------------------------------------- what passes


def test_valid_config_is_completed_by_the_worker() -> None:
    confined = run(valid())
    config = confined.config
    assert config["payload"] == {
        "kernel": f"{IMG}/vmlinux",
        "initramfs": f"{IMG}/initrd.img",
        "cmdline": "console=ttyS0 ip=10.0.0.2::10.0.0.1:255.255.255.0",
    }
    assert config["cpus"] == {"boot_vcpus": 2, "max_vcpus": 2}
    assert config["memory"] == {"size": 256 * MIB}
    # The writable disk is the worker's copy, the read-only one stays in the store.
    assert config["disks"] == [
        {"path": f"{DISK_DIR}/disk0.img", "id": "disk0"},
        {"path": f"{KERNEL_PKG}/modules.img", "readonly": True, "id": "disk1"},
    ]
    assert [(c.index, c.source, c.target) for c in confined.copies] == [
        (0, f"{IMG}/disk.img", f"{DISK_DIR}/disk0.img")
    ]
    assert config["net"] == [{**NET, "id": "net0"}]
    assert config["serial"] == {"mode": "File", "file": "/var/s.log"}
    assert config["console"] == {"mode": "Off"}
    assert config["rng"] == {"src": "/dev/urandom"}
    json.dumps(config)  # the VMM gets it as JSON


def test_defaults_are_made_explicit_and_optional_parts_left_out() -> None:
    config = run({"payload": {"kernel": "vmlinux"}}, host=HostSide(), nic=None).config
    assert config == {
        "payload": {"kernel": f"{IMG}/vmlinux"},
        "cpus": {"boot_vcpus": 1, "max_vcpus": 1},
        "memory": {"size": 512 * MIB},
        "serial": {"mode": "Off"},
        "console": {"mode": "Off"},
    }


def test_symlink_inside_the_closure_is_replaced_by_its_target() -> None:
    config = {"payload": {"kernel": "vmlinux"}}
    links = {f"{IMG}/vmlinux": f"{KERNEL_PKG}/bzImage"}
    assert run(config, links=links).config["payload"]["kernel"] == f"{KERNEL_PKG}/bzImage"


def test_assignment_overrides_resources() -> None:
    host = HostSide(vcpus=3, memory_mib=1024)
    config = run(valid(), host=host).config
    assert config["cpus"] == {"boot_vcpus": 3, "max_vcpus": 3}
    assert config["memory"]["size"] == 1024 * MIB


def test_image_net_tunables_merge_under_the_worker_entry() -> None:
    config = valid() | {"net": [{"num_queues": 4, "mtu": 9000, "id": "mine"}]}
    assert run(config).config["net"] == [{"num_queues": 4, "mtu": 9000, **NET, "id": "net0"}]
    # Without a worker tap there is no NIC (cloud-hypervisor would make a tap itself).
    assert "net" not in run(config, nic=None).config


def test_the_nic_is_attached_once_the_image_is_accepted() -> None:
    # The worker confines an image before it takes a tap and an address:
    # the confined definition has no NIC; attaching it adds the worker's tap
    # and MAC over the image's tunables, and the guest's ip= last.
    config = valid() | {"net": [{"num_queues": 4, "mtu": 9000, "id": "mine"}]}
    without = run(config, nic=None)
    assert "net" not in without.config
    assert without.confined.nic_tuning == NicTuning(num_queues=4, mtu=9000)
    attached = attach_nic(without.confined, nic=NIC, cmdline_extra=IP_ARG, limits=LIMITS)
    assert attached.to_vm_config()["net"] == [{"num_queues": 4, "mtu": 9000, **NET, "id": "net0"}]
    assert attached.payload.cmdline == f"console=ttyS0 {IP_ARG}"
    # Only the worker's addition pushes this command line past the limit.
    near = run({"payload": {"kernel": "k", "cmdline": "x" * 2030}}, nic=None)
    with pytest.raises(ValidationError) as info:
        attach_nic(near.confined, nic=NIC, cmdline_extra=IP_ARG, limits=LIMITS)
    assert info.value.details[0].startswith("payload.cmdline: 2066 bytes with the worker's")


# ------------------------------------------------------------ host paths


def test_config_naming_etc_shadow_is_refused() -> None:
    config = valid()
    config["disks"].append({"path": "/etc/shadow"})
    assert problems(config) == ("disks[2].path: '/etc/shadow' is outside the image's closure",)


@pytest.mark.parametrize(
    "path",
    ["../../../etc/passwd", f"{IMG}/../{STRANGER}/vmlinux", "a/../vmlinux", "/nix/store/.."],
)
def test_dotdot_is_refused(path: str) -> None:
    (problem,) = problems({"payload": {"kernel": path}})
    assert problem.startswith("payload.kernel: '")
    assert problem.endswith(" must not contain '..'")


def test_store_path_outside_the_closure_is_refused() -> None:
    config = {"payload": {"kernel": f"{STRANGER}/vmlinux"}}
    assert problems(config) == (
        f"payload.kernel: '{STRANGER}/vmlinux' is outside the image's closure",
    )


def test_symlink_leaving_the_closure_is_refused() -> None:
    config = {"payload": {"kernel": "vmlinux"}, "disks": [{"path": "disk.img"}]}
    links = {f"{IMG}/vmlinux": "/boot/vmlinuz", f"{IMG}/disk.img": f"{STRANGER}/x"}
    assert problems(config, links=links) == (
        "payload.kernel: 'vmlinux' resolves through a symlink to '/boot/vmlinuz', "
        "outside the image's closure",
        f"disks[0].path: 'disk.img' resolves through a symlink to '{STRANGER}/x', "
        "outside the image's closure",
    )


def test_missing_files_and_directories_are_refused() -> None:
    config = {"payload": {"kernel": "vmlinux", "initramfs": "lib"}}
    kinds = {f"{IMG}/vmlinux": PathKind.MISSING, f"{IMG}/lib": PathKind.DIRECTORY}
    assert problems(config, kinds=kinds) == (
        "payload.kernel: 'vmlinux' does not exist in the image",
        "payload.initramfs: 'lib' is a directory, not a regular file",
    )


@pytest.mark.parametrize("value", [42, "", "a\x00b", None])
def test_ill_formed_paths_are_refused(value: object) -> None:
    (problem,) = problems({"payload": {"kernel": "vmlinux"}, "disks": [{"path": value}]})
    assert problem.startswith("disks[0].path: ")


def test_disk_size_limit() -> None:
    limits = ImageLimits(max_vcpus=4, max_memory_mib=2048, max_disk_bytes=1000)
    (problem,) = problems({"payload": {"kernel": "k"}, "disks": [{"path": "d"}]}, limits=limits)
    assert problem == "disks[0].path: 'd' is 4096 bytes; the limit is 1000"


# ------------------------------------------------------ keys that reach the host


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("devices", [{"path": "/sys/bus/pci/devices/0000:01:00.0/"}]),
        ("vdpa", [{"path": "/dev/vhost-vdpa-0", "num_queues": 1}]),
        ("user_devices", [{"socket": "/run/vfio-user.sock"}]),
        ("fs", [{"tag": "root", "socket": "/run/virtiofsd.sock"}]),
        ("pmem", [{"file": "/dev/sda"}]),
        ("vsock", {"cid": 3, "socket": "/run/vsock.sock"}),
        ("generic_vhost_user", [{"socket": "/run/x.sock"}]),
        ("tpm", {"socket": "/run/swtpm.sock"}),
        ("numa", [{"guest_numa_id": 0}]),
        ("debug_console", {"mode": "File", "file": "/etc/cron.d/x"}),
        ("landlock_rules", [{"path": "/", "access": "rw"}]),
    ],
)
def test_host_resource_keys_are_refused(key: str, value: object) -> None:
    (problem,) = problems(valid() | {key: value})
    assert problem.startswith(f"{key}: refused: ")


def test_vfio_device_message_is_clear() -> None:
    config = valid() | {"devices": [{"path": "/sys/bus/pci/devices/0000:01:00.0/"}]}
    assert problems(config) == (
        "devices: refused: VFIO passes host PCI devices through; images may not use host devices",
    )


def test_unknown_key_lists_what_is_allowed() -> None:
    (problem,) = problems(valid() | {"sgx_epc": []})
    assert (
        problem == f"sgx_epc: unknown or not allowed; an image may use: {', '.join(ALLOWED_KEYS)}"
    )


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("disks", "vhost_socket", "/run/vhost.sock"),
        ("disks", "vhost_user", True),
        ("disks", "backing_files", True),
        ("disks", "queue_affinity", [{"queue_index": 0, "host_cpus": [0]}]),
        ("net", "tap", "eth0"),
        ("net", "mac", "52:54:00:00:00:01"),
        ("net", "vhost_socket", "/run/ovs.sock"),
        ("net", "fds", [3]),
        ("serial", "file", "/etc/passwd"),
        ("console", "socket", "/run/console.sock"),
        ("cpus", "affinity", [{"vcpu": 0, "host_cpus": [0]}]),
        ("memory", "zones", [{"id": "z", "size": 1, "file": "/dev/mem"}]),
        ("memory", "hugepages", True),
        ("payload", "igvm", "x.igvm"),
        ("platform", "tdx", True),
    ],
)
def test_host_reaching_subkeys_are_refused(section: str, key: str, value: object) -> None:
    config = valid()
    if section in ("disks", "net"):
        config[section] = [{"path": "disk.img"} if section == "disks" else {}]
        config[section][0][key] = value
    else:
        default = {"mode": "Tty"} if section in ("serial", "console") else {}
        config[section] = dict(config.get(section, default), **{key: value})
    (problem,) = problems(config)
    index = "[0]" if section in ("disks", "net") else ""
    assert problem.startswith(f"{section}{index}.{key}: refused: ")


def test_rng_source_must_be_an_entropy_device() -> None:
    (problem,) = problems(valid() | {"rng": {"src": "/dev/sda"}})
    assert problem.startswith("rng.src: '/dev/sda' is not an entropy source")


# ----------------------------------------------------------------- bounds


@pytest.mark.parametrize(
    ("cpus", "host", "expected"),
    [
        ({"boot_vcpus": 8, "max_vcpus": 8}, HostSide(), ["boot_vcpus: 8", "max_vcpus: 8"]),
        ({"boot_vcpus": 1, "max_vcpus": 16}, HostSide(), ["max_vcpus: 16"]),
        ({"boot_vcpus": 0, "max_vcpus": 1}, HostSide(), ["boot_vcpus: 0 is below 1"]),
        ({"boot_vcpus": 3, "max_vcpus": 2}, HostSide(), ["boot_vcpus: 3 exceeds cpus.max"]),
        (
            {"boot_vcpus": 1, "max_vcpus": 1},
            HostSide(vcpus=5),
            ["boot_vcpus: 5 (the", "max_vcpus: 5 (the"],
        ),
        ({"boot_vcpus": True, "max_vcpus": 1}, HostSide(), ["boot_vcpus: must be an integer"]),
    ],
)
def test_vcpu_bounds(cpus: dict[str, Any], host: HostSide, expected: list[str]) -> None:
    found = problems({"payload": {"kernel": "k"}, "cpus": cpus}, host=host)
    assert len(found) == len(expected)
    for problem, start in zip(found, expected, strict=True):
        assert problem.startswith(f"cpus.{start}")


@pytest.mark.parametrize(
    ("size", "host", "expected"),
    [
        (4096 * MIB, HostSide(), "exceeds this worker's limit of 2048 MiB"),
        (1 * MIB, HostSide(), "is below the minimum of 16 MiB"),
        (64 * MIB, HostSide(memory_mib=4096), "(the assignment's override) exceeds"),
        ("1G", HostSide(), "must be an integer, not a string"),
    ],
)
def test_memory_bounds(size: object, host: HostSide, expected: str) -> None:
    (problem,) = problems({"payload": {"kernel": "k"}, "memory": {"size": size}}, host=host)
    assert problem.startswith("memory.size: ")
    assert expected in problem


def test_payload_is_required_and_must_boot_something() -> None:
    assert problems({}) == ("payload: required (a kernel or firmware to boot)",)
    assert problems({"payload": {"cmdline": "quiet"}}) == (
        "payload: names neither a kernel nor a firmware",
    )
    assert problems([1, 2]) == ("the config must be a JSON object, not an array",)


def test_cmdline_limit_counts_the_worker_additions() -> None:
    long = "x" * 2030
    (problem,) = problems({"payload": {"kernel": "k", "cmdline": long}})
    assert problem.startswith("payload.cmdline: 2066 bytes with the worker's additions")


def test_every_problem_is_listed_at_once() -> None:
    config = {
        "payload": {"kernel": "/etc/shadow"},
        "cpus": {"boot_vcpus": 64, "max_vcpus": 64},
        "disks": [{"path": "/dev/sda"}, {"path": "d", "vhost_socket": "/run/s"}],
        "devices": [{"path": "/sys/bus/pci/devices/0000:01:00.0/"}],
        "serial": {"mode": "File", "file": "/etc/motd"},
    }
    with pytest.raises(ValidationError) as info:
        run(config)
    assert info.value.message == f"{IMG}/vm-config.json is refused (7 problems)"
    keys = sorted(line.split(":", 1)[0] for line in info.value.details)
    assert keys == sorted(
        [
            "devices",
            "payload.kernel",
            "cpus.boot_vcpus",
            "cpus.max_vcpus",
            "disks[0].path",
            "disks[1].vhost_socket",
            "serial.file",
        ]
    )
    assert "  - payload.kernel: '/etc/shadow' is outside the image's closure" in str(info.value)


# --------------------------------------------------------------- properties

_SUBKEYS = [
    "path", "kernel", "initramfs", "firmware", "cmdline", "file", "socket", "tap", "mac",
    "vhost_socket", "vhost_user", "readonly", "size", "boot_vcpus", "max_vcpus", "mode", "src",
    "id", "backing_files", "fds", "topology", "bandwidth", "rate_limiter_config",
]  # fmt: skip
_TOP = [*ALLOWED_KEYS, "devices", "vsock", "fs", "pmem", "vdpa", "tpm", "bogus"]
_PATHS = [
    "vmlinux", "disk.img", "/etc/shadow", "../x", f"{KERNEL_PKG}/k", f"{STRANGER}/k", "/dev/sda",
    "/dev/urandom", "", f"{IMG}/disk.img",
]  # fmt: skip
_leaf = st.one_of(
    st.sampled_from(_PATHS),
    st.integers(min_value=-2, max_value=1 << 40),
    st.booleans(),
    st.none(),
    st.text(max_size=5),
)
_json: st.SearchStrategy[Any] = st.recursive(
    _leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(_SUBKEYS), children, max_size=4),
    ),
    max_leaves=20,
)
_configs = st.dictionaries(st.sampled_from(_TOP), _json, max_size=6)


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


@settings(max_examples=400, deadline=None)
@given(config=_configs, symlinks_escape=st.booleans())
def test_no_config_reaches_the_host(config: dict[str, Any], symlinks_escape: bool) -> None:
    """Whatever an image says, confine either refuses it with
    ValidationError or returns a config whose every path is in the closure
    or the worker's."""
    links = (
        {p: "/etc/shadow" for p in host_paths(config, IMG).values()} if symlinks_escape else None
    )
    try:
        confined = run(config, links=links)
    except ValidationError as err:
        assert err.details
        return
    out = confined.config
    assert set(out) <= set(ALLOWED_KEYS)
    assert {"devices", "vsock", "fs", "pmem", "vdpa"}.isdisjoint(out)
    owned = {"/var/s.log", "/dev/urandom", "/dev/random", *NET.values()}
    for text in _strings(out):
        if text.startswith("/") and text not in owned:
            assert text.startswith((f"{IMG}/", f"{KERNEL_PKG}/", f"{DISK_DIR}/")), text
    for disk in out.get("disks", []):
        assert set(disk).isdisjoint({"vhost_socket", "queue_affinity"})
        assert not disk.get("vhost_user") and not disk.get("backing_files")
    assert out["serial"] == {"mode": "File", "file": "/var/s.log"}
    assert out["net"] == [{**NET, "id": "net0"}] or "net" not in out
    json.dumps(out)


@settings(max_examples=200, deadline=None)
@given(key=st.sampled_from(["devices", "vsock", "fs", "pmem", "vdpa", "user_devices"]), value=_json)
def test_a_refused_key_is_always_named(key: str, value: Any) -> None:
    details = problems(valid() | {key: value})
    assert any(line.startswith(f"{key}: refused: ") for line in details)
