"""Confinement: what an image's ``vm-config.json`` may ask of the host.

An image is untrusted input. Whoever can push a store path to the fleet
writes its ``vm-config.json``, a cloud-hypervisor ``VmConfig`` that the VMM,
running as root on the worker, will obey. This module turns such a config
into one that is safe to hand to the VMM, or refuses it with *every* problem
listed (one line each, naming the key), so a hostile or broken image fails
its own VM with a clear message and touches nothing else.

Invariants of a config returned by :func:`confine`:

- Every host path it names is either inside the image's closure (symlinks
  resolved by the caller, the resolved path is what the VMM gets, so a
  symlink cannot be swapped in between) or one the worker chose: the VM's
  writable disk copies, the serial file and the net entry.
- It names no host device, socket or file descriptor: VFIO ``devices``,
  ``user_devices``, ``vdpa``, ``fs``, ``pmem``, ``generic_vhost_user``,
  ``vsock``, ``tpm``, vhost-user disks/NICs, serial/console files and
  sockets, taps, MACs and addresses are refused or overwritten.
- Only keys this module knows are passed through (an allow-list, not a
  deny-list: a key added in a future cloud-hypervisor release is refused
  until someone decides it is harmless).
- ``payload`` is present and names a kernel or firmware; vCPUs and memory
  lie within the worker's limits; devices have stable ids (``disk0``,
  ``net0``...) so the VMM's counters keep their names across restarts.

Resolving symlinks needs I/O, which the core does not do, so confinement is
two pure steps around one impure one::

    wanted = host_paths(config, image_dir)           # core: what to resolve
    resolved = {p: <realpath, kind, size of p> for p in wanted.values()}  # adapter
    confined = confine(config, image_dir=..., closure=..., resolved=..., ...)  # core

Paths are compared as strings: a path is inside the closure when its first
three components (``/nix/store/<hash>-<name>``) name a member of the closure.
"""

from __future__ import annotations

import enum
import posixpath
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import Any

from procurator.core.errors import ValidationError
from procurator.core.validation import LIMITS, STORE_DIR

__all__ = [
    "ALLOWED_KEYS",
    "Confined",
    "DiskCopy",
    "HostSide",
    "ImageLimits",
    "PathKind",
    "ResolvedPath",
    "attach_nic",
    "confine",
    "host_paths",
    "in_closure",
]

MIB = 1 << 20
# cloud-hypervisor's defaults when a config leaves cpus/memory out.
_DEFAULT_VCPUS = 1
_DEFAULT_MEMORY = 512 * MIB
_CONSOLE_MODES = ("Off", "Null")
_RNG_SOURCES = ("/dev/urandom", "/dev/random")
_IMAGE_TYPES = ("Raw", "Qcow2", "Vhdx", "FixedVhd")
_LOCK_GRANULARITIES = ("ByteRange", "Full")


class PathKind(enum.Enum):
    FILE = "file"
    DIRECTORY = "directory"
    MISSING = "missing"
    OTHER = "other"  # device node, socket, fifo: never found in a store


@dataclass(frozen=True, slots=True)
class ResolvedPath:
    """What the adapter found at a lexical path: its real path (every
    symlink resolved, ``os.path.realpath``), what it is, and its size."""

    real: str
    kind: PathKind
    size: int = 0


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What one VM may ask of this worker. ``max_disk_bytes`` 0: unbounded."""

    max_vcpus: int
    max_memory_mib: int
    min_memory_mib: int = LIMITS.min_memory_mib
    max_disks: int = 16
    max_disk_bytes: int = 0
    # x86 Linux's COMMAND_LINE_SIZE; a longer cmdline is cut by the kernel.
    max_cmdline: int = 2048
    max_config_bytes: int = 1 * MIB

    def __post_init__(self) -> None:
        if self.max_vcpus < 1 or self.max_memory_mib < self.min_memory_mib:
            raise ValueError(f"impossible image limits: {self}")


@dataclass(frozen=True, slots=True)
class HostSide:
    """Everything host-facing the worker decides for one VM.

    ``net``: the VM's net entry (tap, MAC, ...) from the network adapter, or
    None: a VM without network, or one whose NIC :func:`attach_nic` adds
    once the image is accepted. ``cmdline_extra``: appended to the
    image's kernel command line (the kernel takes the last of repeated
    parameters, so the worker's win). ``serial_file``: where the serial port
    is written (None: no serial port). ``vcpus`` / ``memory_mib``: the
    assignment's overrides, 0 for "as the image says".
    """

    net: Mapping[str, Any] | None = None
    cmdline_extra: str = ""
    serial_file: str | None = None
    console_mode: str = "Off"
    vcpus: int = 0
    memory_mib: int = 0

    def __post_init__(self) -> None:
        if self.console_mode not in _CONSOLE_MODES:
            raise ValueError(f"console_mode must be one of {_CONSOLE_MODES}")
        if self.vcpus < 0 or self.memory_mib < 0:
            raise ValueError("vcpus and memory_mib overrides must be >= 0")
        if self.serial_file is not None and not posixpath.isabs(self.serial_file):
            raise ValueError(f"serial_file must be absolute: {self.serial_file!r}")


@dataclass(frozen=True, slots=True)
class DiskCopy:
    """A writable disk: the worker copies ``source`` (in the store) to
    ``target`` (in the VM's state dir) before boot."""

    index: int
    source: str
    target: str


@dataclass(frozen=True, slots=True)
class Confined:
    """A safe config, and the disk copies it relies on. ``net_tunables``:
    the image's checked ``net[0]`` tunables (empty when it names none), for
    :func:`attach_nic` when the NIC is attached after confinement."""

    config: dict[str, Any]
    copies: tuple[DiskCopy, ...]
    net_tunables: dict[str, Any]


# ------------------------------------------------------------------ the rules
#
# Each section: the keys passed through (with their JSON type), and the keys
# refused with the reason an operator reads. A key in neither is unknown.

_HOST_SOCKET = "reaches a host socket; the worker does not offer vhost-user devices"
_WORKER_NET = "the worker sets the VM's tap, MAC and addresses itself"
_WORKER_CONSOLE = "the worker sets the serial port and console itself"

_REFUSED_TOP: dict[str, str] = {
    "devices": "VFIO passes host PCI devices through; images may not use host devices",
    "user_devices": "vfio-user devices reach a host socket; images may not use host devices",
    "vdpa": "vDPA passes a host device through; images may not use host devices",
    "fs": "virtio-fs shares a host directory through a vhost-user socket",
    "pmem": "virtio-pmem maps a host file into the guest",
    "generic_vhost_user": "vhost-user devices reach a host socket",
    "vsock": "vsock needs a host socket; the worker does not offer vsock",
    "debug_console": "the debug console writes to a host file or I/O port; " + _WORKER_CONSOLE,
    "tpm": "a vTPM reaches a host socket (swtpm)",
    "numa": "NUMA nodes bind guest memory and vCPUs to host nodes and CPUs",
    "landlock_enable": "the VMM's sandbox is the worker's to configure",
    "landlock_rules": "the VMM's sandbox is the worker's to configure",
}

_PAYLOAD = {"kernel": str, "initramfs": str, "firmware": str, "cmdline": str}
_PAYLOAD_REFUSED = {
    "igvm": "IGVM payloads (confidential guests) are not offered by the worker",
    "host_data": "host data (confidential guests) is not offered by the worker",
}
_CPUS = {
    "boot_vcpus": int,
    "max_vcpus": int,
    "topology": dict,
    "kvm_hyperv": bool,
    "max_phys_bits": int,
    "nested": bool,
}
_CPUS_REFUSED = {
    "affinity": "pins vCPUs to host CPUs; CPU placement is the worker's",
    "core_scheduling": "core scheduling is the worker's to configure",
    "features": "host CPU features (AMX) are the worker's to grant",
}
_TOPOLOGY = {
    "threads_per_core": int,
    "cores_per_die": int,
    "dies_per_package": int,
    "packages": int,
}
_MEMORY = {"size": int, "mergeable": bool, "shared": bool, "thp": bool, "prefault": bool}
_NO_HOTPLUG = "memory hotplug is not offered: the worker budgets memory.size"
_MEMORY_REFUSED = {
    "hotplug_size": _NO_HOTPLUG,
    "hotplugged_size": _NO_HOTPLUG,
    "hotplug_method": _NO_HOTPLUG,
    "zones": "memory zones name host files and NUMA nodes",
    "hugepages": "huge pages are a host resource the worker does not grant",
    "hugepage_size": "huge pages are a host resource the worker does not grant",
    "reserve": "memory reservation is the worker's to configure",
}
_DISK = {
    "path": str,
    "readonly": bool,
    "direct": bool,
    "iommu": bool,
    "num_queues": int,
    "queue_size": int,
    "id": str,
    "serial": str,
    "rate_limiter_config": dict,
    "rate_limit_group": str,
    "pci_segment": int,
    "pci_device_id": int,
    "image_type": str,
    "sparse": bool,
    "lock_granularity": str,
    "backing_files": bool,
    "vhost_user": bool,
}
_DISK_REFUSED = {
    "vhost_socket": _HOST_SOCKET,
    "queue_affinity": "pins queues to host CPUs; CPU placement is the worker's",
}
_NET = {
    "num_queues": int,
    "queue_size": int,
    "mtu": int,
    "iommu": bool,
    "id": str,
    "pci_segment": int,
    "pci_device_id": int,
    "rate_limiter_config": dict,
    "offload_tso": bool,
    "offload_ufo": bool,
    "offload_csum": bool,
    "vhost_user": bool,
}
_NET_REFUSED = {
    "tap": _WORKER_NET,
    "mac": _WORKER_NET,
    "host_mac": _WORKER_NET,
    "ip": _WORKER_NET,
    "mask": _WORKER_NET,
    "fds": "file descriptors are the worker's to pass",
    "vhost_socket": _HOST_SOCKET,
    "vhost_mode": _HOST_SOCKET,
}
_RNG = {"src": str, "iommu": bool, "id": str, "pci_segment": int, "pci_device_id": int}
_BALLOON = {
    "size": int,
    "deflate_on_oom": bool,
    "free_page_reporting": bool,
    "id": str,
    "iommu": bool,
    "pci_segment": int,
    "pci_device_id": int,
}
_RTC = {"id": str, "iommu": bool, "pci_segment": int, "pci_device_id": int}
_CONSOLE = {"mode": str, "iommu": bool, "id": str, "pci_segment": int, "pci_device_id": int}
_CONSOLE_REFUSED = {"file": _WORKER_CONSOLE, "socket": _WORKER_CONSOLE}
_SERIAL = {"mode": str}
_PLATFORM = {
    "num_pci_segments": int,
    "system_serial_number": str,
    "serial_number": str,
    "system_uuid": str,
    "uuid": str,
    "oem_strings": list,
    "system_manufacturer": str,
    "system_product_name": str,
    "system_version": str,
    "system_family": str,
    "system_sku_number": str,
    "chassis_asset_tag": str,
}
_NO_CONFIDENTIAL = "confidential guests need host support the worker does not offer"
_NO_IOMMU_PLUMBING = "IOMMU/VFIO plumbing serves host devices, which images may not use"
_PLATFORM_REFUSED = {
    "tdx": _NO_CONFIDENTIAL,
    "sev_snp": _NO_CONFIDENTIAL,
    "iommufd": _NO_IOMMU_PLUMBING,
    "vfio_p2p_dma": _NO_IOMMU_PLUMBING,
    "iommu_segments": _NO_IOMMU_PLUMBING,
    "iommu_address_width_bits": _NO_IOMMU_PLUMBING,
}
_RATE_LIMITER = {"bandwidth": dict, "ops": dict}
_TOKEN_BUCKET = {"size": int, "one_time_burst": int, "refill_time": int}
_RATE_LIMIT_GROUP = {"id": str, "rate_limiter_config": dict}
_PCI_SEGMENT = {"pci_segment": int, "mmio32_aperture_weight": int, "mmio64_aperture_weight": int}

#: Top-level keys an image may use (everything else is refused).
ALLOWED_KEYS: tuple[str, ...] = (
    "payload",
    "cpus",
    "memory",
    "disks",
    "net",
    "rng",
    "balloon",
    "serial",
    "console",
    "rtc",
    "platform",
    "rate_limit_groups",
    "pci_segments",
    "iommu",
    "watchdog",
    "pvpanic",
)
_TOP_BOOLS = ("iommu", "watchdog", "pvpanic")


# ---------------------------------------------------------------- public API


def host_paths(config: object, image_dir: str) -> dict[str, str]:
    """Every host path ``config`` names, as ``{key: lexical absolute path}``
    (relative paths joined to ``image_dir``, normalised, symlinks *not*
    resolved): what the adapter must resolve before calling :func:`confine`.

    Values that are not well-formed paths are left out; :func:`confine`
    reports them.
    """
    found: dict[str, str] = {}
    for where, raw in _named_paths(config):
        if isinstance(raw, str) and _path_syntax_problem(raw) is None:
            found[where] = _lexical(raw, image_dir)
    return found


def confine(
    config: object,
    *,
    image_dir: str,
    closure: Set[str],
    resolved: Mapping[str, ResolvedPath],
    limits: ImageLimits,
    host: HostSide,
    disk_dir: str,
) -> Confined:
    """Return the safe config for one VM, or raise ``ValidationError`` whose
    ``details`` list every problem, one line each, naming its key.

    ``image_dir`` is the image's store path and ``closure`` its closure
    (``nix-store -qR``); ``resolved`` maps the lexical paths of
    :func:`host_paths` to what is really there; writable disks are copied to
    ``<disk_dir>/disk<i>.img`` (the caller makes the copies).
    """
    problems: list[str] = []
    if not isinstance(config, Mapping):
        raise ValidationError(
            f"{image_dir}/vm-config.json is refused",
            details=[f"the config must be a JSON object, not {_json_type(config)}"],
        )
    paths = _PathChecker(image_dir, closure, resolved, problems)

    for key in config:
        if not isinstance(key, str):  # not from JSON, but a Mapping may hold anything
            problems.append(f"{key!r}: keys must be strings")
        elif key in _REFUSED_TOP:
            problems.append(f"{key}: refused: {_REFUSED_TOP[key]}")
        elif key not in ALLOWED_KEYS:
            problems.append(
                f"{key}: unknown or not allowed; an image may use: {', '.join(ALLOWED_KEYS)}"
            )

    out: dict[str, Any] = {}
    out["payload"] = _payload(config, paths, limits, host, problems)
    out["cpus"] = _cpus(config, limits, host, problems)
    out["memory"] = _memory(config, limits, host, problems)
    disks, copies = _disks(config, paths, limits, disk_dir, problems)
    if disks:
        out["disks"] = disks
    tunables = _net_tunables(config, problems)
    if host.net is not None:
        out["net"] = [_nic_entry(tunables, host.net)]
    _simple_sections(config, out, problems)
    out["serial"] = (
        {"mode": "File", "file": host.serial_file}
        if host.serial_file is not None
        else {"mode": "Off"}
    )
    console = _section(config, "console", _CONSOLE, _CONSOLE_REFUSED, problems) or {}
    console.pop("mode", None)  # the worker's
    out["console"] = {**console, "mode": host.console_mode}

    if problems:
        raise ValidationError(
            f"{image_dir}/vm-config.json is refused ({len(problems)} "
            f"problem{'s' if len(problems) > 1 else ''})",
            details=problems,
        )
    return Confined(config=out, copies=copies, net_tunables=tunables)


def attach_nic(
    confined: Confined,
    *,
    net: Mapping[str, Any],
    cmdline_extra: str,
    limits: ImageLimits,
) -> dict[str, Any]:
    """The config of ``confined`` (made with ``HostSide.net`` None and no
    ``cmdline_extra``) with the worker's NIC: the net entry (the image's
    tunables under the worker's tap and MAC) and the kernel command line
    additions. The worker confines an image before it takes a tap and an
    address for it, so a refused image takes neither. Raises
    ``ValidationError`` when the command line grows past the limit."""
    problems: list[str] = []
    payload = dict(confined.config["payload"])
    cmdline = _cmdline(payload.get("cmdline", ""), cmdline_extra, limits, problems)
    if problems:
        raise ValidationError("the VM's kernel command line is refused", details=problems)
    if cmdline:
        payload["cmdline"] = cmdline
    return {**confined.config, "payload": payload, "net": [_nic_entry(confined.net_tunables, net)]}


# ------------------------------------------------------------------ sections


def _payload(
    config: Mapping[str, Any],
    paths: _PathChecker,
    limits: ImageLimits,
    host: HostSide,
    problems: list[str],
) -> dict[str, Any]:
    if "payload" not in config:
        problems.append("payload: required (a kernel or firmware to boot)")
        return {}
    payload = _section(config, "payload", _PAYLOAD, _PAYLOAD_REFUSED, problems)
    if payload is None:
        return {}
    if "kernel" not in payload and "firmware" not in payload:
        problems.append("payload: names neither a kernel nor a firmware")
    for key in ("kernel", "initramfs", "firmware"):
        if key in payload:
            real = paths.check(f"payload.{key}", payload[key])
            if real is not None:
                payload[key] = real
    cmdline = _cmdline(payload.get("cmdline", ""), host.cmdline_extra, limits, problems)
    if cmdline:
        payload["cmdline"] = cmdline
    else:
        payload.pop("cmdline", None)
    return payload


def _cmdline(image: str, extra: str, limits: ImageLimits, problems: list[str]) -> str:
    """The image's kernel command line with the worker's additions (which
    come last: the kernel takes the last of repeated parameters)."""
    cmdline = " ".join(p.strip() for p in (image, extra) if p.strip())
    if "\x00" in cmdline:
        problems.append("payload.cmdline: must not contain NUL characters")
    elif len(cmdline.encode()) >= limits.max_cmdline:
        problems.append(
            f"payload.cmdline: {len(cmdline.encode())} bytes with the worker's additions; "
            f"the limit is {limits.max_cmdline - 1}"
        )
    return cmdline


def _cpus(
    config: Mapping[str, Any], limits: ImageLimits, host: HostSide, problems: list[str]
) -> dict[str, Any]:
    cpus = _section(config, "cpus", _CPUS, _CPUS_REFUSED, problems) or {}
    if "topology" in cpus:
        cpus["topology"] = _section(
            cpus, "topology", _TOPOLOGY, {}, problems, where="cpus.topology"
        )
    boot = cpus.get("boot_vcpus", _DEFAULT_VCPUS)
    most = cpus.get("max_vcpus", boot)
    for key, value in (("boot_vcpus", boot), ("max_vcpus", most)):
        if value < 1:
            problems.append(f"cpus.{key}: {value} is below 1")
    if boot > most:
        problems.append(f"cpus.boot_vcpus: {boot} exceeds cpus.max_vcpus ({most})")
    origin = ""
    if host.vcpus:
        boot, most, origin = host.vcpus, max(most, host.vcpus), " (the assignment's override)"
    for key, value in (("boot_vcpus", boot), ("max_vcpus", most)):
        if value > limits.max_vcpus:
            problems.append(
                f"cpus.{key}: {value}{origin} exceeds this worker's limit of "
                f"{limits.max_vcpus} vCPUs"
            )
    cpus["boot_vcpus"], cpus["max_vcpus"] = boot, most
    return cpus


def _memory(
    config: Mapping[str, Any], limits: ImageLimits, host: HostSide, problems: list[str]
) -> dict[str, Any]:
    memory = _section(config, "memory", _MEMORY, _MEMORY_REFUSED, problems) or {}
    size = memory.get("size", _DEFAULT_MEMORY)
    origin = ""
    if host.memory_mib:
        size, origin = host.memory_mib * MIB, " (the assignment's override)"
    if size < limits.min_memory_mib * MIB:
        problems.append(
            f"memory.size: {size} bytes{origin} is below the minimum of {limits.min_memory_mib} MiB"
        )
    elif size > limits.max_memory_mib * MIB:
        problems.append(
            f"memory.size: {size} bytes{origin} exceeds this worker's limit of "
            f"{limits.max_memory_mib} MiB"
        )
    memory["size"] = size
    return memory


def _disks(
    config: Mapping[str, Any],
    paths: _PathChecker,
    limits: ImageLimits,
    disk_dir: str,
    problems: list[str],
) -> tuple[list[dict[str, Any]], tuple[DiskCopy, ...]]:
    entries = _list(config, "disks", problems)
    if len(entries) > limits.max_disks:
        problems.append(f"disks: {len(entries)} disks; the limit is {limits.max_disks}")
        return [], ()
    disks: list[dict[str, Any]] = []
    copies: list[DiskCopy] = []
    for i, entry in enumerate(entries):
        where = f"disks[{i}]"
        disk = _section({where: entry}, where, _DISK, _DISK_REFUSED, problems)
        if disk is None:
            continue
        _rate_limiter(disk, where, problems)
        if disk.get("vhost_user"):
            problems.append(f"{where}.vhost_user: refused: {_HOST_SOCKET}")
        if disk.get("backing_files"):
            problems.append(
                f"{where}.backing_files: refused: a backing file is a host path the "
                "worker cannot confine"
            )
        _enum(disk, where, "image_type", _IMAGE_TYPES, problems)
        _enum(disk, where, "lock_granularity", _LOCK_GRANULARITIES, problems)
        if "path" not in disk:
            if "path" not in entry:  # else it was ill-typed, and already reported
                problems.append(f"{where}.path: required")
            continue
        real = paths.check(f"{where}.path", disk["path"], max_size=limits.max_disk_bytes)
        disk["id"] = f"disk{i}"
        if real is None:
            continue
        if disk.get("readonly", False):
            disk["path"] = real  # the store is read-only anyway
        else:
            target = f"{disk_dir}/disk{i}.img"
            copies.append(DiskCopy(index=i, source=real, target=target))
            disk["path"] = target
        disks.append(disk)
    return disks, tuple(copies)


def _net_tunables(config: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """The image's checked net[0] tunables. Without a worker-made tap
    (``HostSide.net`` None, no :func:`attach_nic`) the VM gets no NIC at
    all, whatever the image asked: cloud-hypervisor would create a host tap
    itself."""
    entries = _list(config, "net", problems)
    if len(entries) > 1:
        problems.append(f"net: {len(entries)} entries; the worker gives each VM one NIC")
        return {}
    tunables: dict[str, Any] = {}
    if entries:
        tunables = _section({"net[0]": entries[0]}, "net[0]", _NET, _NET_REFUSED, problems) or {}
        _rate_limiter(tunables, "net[0]", problems)
        if tunables.get("vhost_user"):
            problems.append(f"net[0].vhost_user: refused: {_HOST_SOCKET}")
    return tunables


def _nic_entry(tunables: Mapping[str, Any], net: Mapping[str, Any]) -> dict[str, Any]:
    return {**tunables, **net, "id": "net0"}


def _simple_sections(config: Mapping[str, Any], out: dict[str, Any], problems: list[str]) -> None:
    rng = _section(config, "rng", _RNG, {}, problems)
    if rng is not None:
        if rng.get("src") not in _RNG_SOURCES:
            problems.append(
                f"rng.src: {_shown(rng.get('src'))} is not an entropy source the worker "
                f"offers; use one of {', '.join(_RNG_SOURCES)}"
            )
        out["rng"] = rng
    balloon = _section(config, "balloon", _BALLOON, {}, problems)
    if balloon is not None:
        if "size" not in balloon:
            problems.append("balloon.size: required")
        elif not 0 <= balloon["size"] <= out["memory"]["size"]:
            problems.append(
                f"balloon.size: {balloon['size']} is not between 0 and memory.size "
                f"({out['memory']['size']})"
            )
        out["balloon"] = balloon
    rtc = _section(config, "rtc", _RTC, {}, problems)
    if rtc is not None:
        out["rtc"] = rtc
    platform = _section(config, "platform", _PLATFORM, _PLATFORM_REFUSED, problems)
    if platform is not None:
        strings = platform.get("oem_strings", [])
        if not all(isinstance(s, str) for s in strings):
            problems.append("platform.oem_strings: must be a list of strings")
        out["platform"] = platform
    for key, fields in (("rate_limit_groups", _RATE_LIMIT_GROUP), ("pci_segments", _PCI_SEGMENT)):
        if key in config:
            items = [
                _section({f"{key}[{i}]": e}, f"{key}[{i}]", fields, {}, problems)
                for i, e in enumerate(_list(config, key, problems))
            ]
            out[key] = [item for item in items if item is not None]
    for i, group in enumerate(out.get("rate_limit_groups", [])):
        _rate_limiter(group, f"rate_limit_groups[{i}]", problems)
    for key in _TOP_BOOLS:
        if key in config:
            if isinstance(config[key], bool):
                out[key] = config[key]
            else:
                problems.append(f"{key}: must be a boolean, not {_json_type(config[key])}")
    # serial: only its mode may be named, and the worker overwrites it.
    _section(config, "serial", _SERIAL, _CONSOLE_REFUSED, problems)


# ------------------------------------------------------------------- helpers


def _section(
    parent: Mapping[str, Any],
    key: str,
    fields: Mapping[str, type],
    refused: Mapping[str, str],
    problems: list[str],
    *,
    where: str | None = None,
) -> dict[str, Any] | None:
    """A copy of ``parent[key]`` holding only its well-typed allowed fields,
    with a problem for each refused, unknown or ill-typed one; None when
    the key is absent or not an object."""
    if key not in parent:
        return None
    where = where or key
    value = parent[key]
    if not isinstance(value, Mapping):
        problems.append(f"{where}: must be an object, not {_json_type(value)}")
        return None
    kept: dict[str, Any] = {}
    for name, item in value.items():
        if name in refused:
            problems.append(f"{where}.{name}: refused: {refused[name]}")
        elif name not in fields:
            problems.append(
                f"{where}.{name}: unknown or not allowed; allowed: {', '.join(fields) or 'none'}"
            )
        elif not _has_type(item, fields[name]):
            problems.append(
                f"{where}.{name}: must be {_TYPE_NAMES[fields[name]]}, not {_json_type(item)}"
            )
        else:
            kept[name] = item
    return kept


def _rate_limiter(section: dict[str, Any], where: str, problems: list[str]) -> None:
    """Replace ``section["rate_limiter_config"]`` by its checked copy."""
    if "rate_limiter_config" not in section:
        return
    where = f"{where}.rate_limiter_config"
    limiter = _section(section, "rate_limiter_config", _RATE_LIMITER, {}, problems, where=where)
    for bucket in ("bandwidth", "ops"):
        if limiter is not None and bucket in limiter:
            limiter[bucket] = _section(
                limiter, bucket, _TOKEN_BUCKET, {}, problems, where=f"{where}.{bucket}"
            )
    section["rate_limiter_config"] = limiter


def _list(parent: Mapping[str, Any], key: str, problems: list[str]) -> list[Any]:
    value = parent.get(key, [])
    if not isinstance(value, list):
        problems.append(f"{key}: must be an array, not {_json_type(value)}")
        return []
    return value


def _enum(
    section: dict[str, Any], where: str, key: str, allowed: tuple[str, ...], problems: list[str]
) -> None:
    if key in section and section[key] not in allowed:
        problems.append(f"{where}.{key}: {_shown(section[key])} is not one of {', '.join(allowed)}")


_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    bool: "a boolean",
    dict: "an object",
    list: "an array",
}


def _has_type(value: object, wanted: type) -> bool:
    if wanted is int:  # JSON has no separate bool/int, Python's bool is an int
        return isinstance(value, int) and not isinstance(value, bool)
    if wanted is dict:
        return isinstance(value, Mapping)
    return isinstance(value, wanted)


def _json_type(value: object) -> str:
    names: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (Mapping, "an object"),
        ((list, tuple), "an array"),
        (type(None), "null"),
    ]
    for kind, name in names:
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _shown(value: object) -> str:
    # Long enough for any store path plus a file name, short enough to keep
    # a hostile config from flooding the status message.
    text = repr(value)
    return text if len(text) <= 300 else text[:297] + "..."


def _named_paths(config: object) -> list[tuple[str, object]]:
    """(key, raw value) of every host path a config names, well-formed or not."""
    if not isinstance(config, Mapping):
        return []
    named: list[tuple[str, object]] = []
    payload = config.get("payload")
    if isinstance(payload, Mapping):
        named += [
            (f"payload.{k}", payload[k])
            for k in ("kernel", "initramfs", "firmware")
            if k in payload
        ]
    disks = config.get("disks")
    if isinstance(disks, list):
        named += [
            (f"disks[{i}].path", d["path"])
            for i, d in enumerate(disks)
            if isinstance(d, Mapping) and "path" in d
        ]
    return named


def _path_syntax_problem(raw: object) -> str | None:
    if not isinstance(raw, str):
        return f"must be a string, not {_json_type(raw)}"
    if not raw:
        return "must not be empty"
    if "\x00" in raw:
        return "must not contain NUL characters"
    if ".." in raw.split("/"):
        return f"{_shown(raw)} must not contain '..'"
    return None


def _lexical(raw: str, image_dir: str) -> str:
    return posixpath.normpath(posixpath.join(image_dir, raw))


def in_closure(path: str, closure: Set[str]) -> bool:
    """Whether ``path`` (absolute, normalised) lies inside a member of
    ``closure`` (a set of store paths)."""
    parts = path.split("/")
    # ['', 'nix', 'store', '<hash>-<name>', ...]
    return path.startswith(STORE_DIR + "/") and len(parts) >= 4 and "/".join(parts[:4]) in closure


@dataclass(slots=True)
class _PathChecker:
    image_dir: str
    closure: Set[str]
    resolved: Mapping[str, ResolvedPath]
    problems: list[str]

    def check(self, where: str, raw: object, *, max_size: int = 0) -> str | None:
        """The real path the VMM should open for ``raw``, or None after
        recording why it may not."""

        def report(text: str) -> None:
            self.problems.append(f"{where}: {text}")

        syntax = _path_syntax_problem(raw)
        if syntax is not None or not isinstance(raw, str):
            report(syntax or "must be a string")
            return None
        lexical = _lexical(raw, self.image_dir)
        if not in_closure(lexical, self.closure):
            report(f"{_shown(raw)} is outside the image's closure")
            return None
        found = self.resolved.get(lexical)
        if found is None:
            report(f"{_shown(raw)} was not resolved (a bug in the worker)")
            return None
        if found.kind is PathKind.MISSING:
            report(f"{_shown(raw)} does not exist in the image")
            return None
        if not in_closure(found.real, self.closure):
            report(
                f"{_shown(raw)} resolves through a symlink to {_shown(found.real)}, "
                "outside the image's closure"
            )
            return None
        if found.kind is not PathKind.FILE:
            report(f"{_shown(raw)} is a {found.kind.value}, not a regular file")
            return None
        if max_size and found.size > max_size:
            report(f"{_shown(raw)} is {found.size} bytes; the limit is {max_size}")
            return None
        return found.real
