"""Confinement: what an image's ``vm-config.json`` may ask of the host.

An image is untrusted input. Whoever can push a store path to the fleet
writes its ``vm-config.json``, a cloud-hypervisor ``VmConfig`` that the VMM,
running as root on the worker, will obey. This module reads such a config
into a typed ``VmDefinition`` (``procurator.core.vmdef``, the one place the
schema is written down) that is safe to hand to a VMM, or refuses it with
*every* problem listed (one line each, naming the key), so a hostile or
broken image fails its own VM with a clear message and touches nothing else.

Invariants of a definition returned by :func:`confine`:

- Every host path it names is either inside the image's closure (symlinks
  resolved by the caller, the resolved path is what the VMM gets, so a
  symlink cannot be swapped in between) or one the worker chose: the VM's
  writable disk copies and the serial file.
- It names no host device, socket or file descriptor: VFIO ``devices``,
  ``user_devices``, ``vdpa``, ``fs``, ``pmem``, ``generic_vhost_user``,
  ``vsock``, ``tpm``, vhost-user disks/NICs, serial/console files and
  sockets, taps, MACs and addresses are refused.
- Only what the definition's dataclasses name is passed through (an
  allow-list, not a deny-list: a key added in a future cloud-hypervisor
  release is refused until someone adds it to ``vmdef`` and decides it is
  harmless).
- ``payload`` is present and names a kernel or firmware; vCPUs and memory
  lie within the worker's limits; devices have stable ids (``disk0``,
  ``net0``...) so the VMM's counters keep their names across restarts.
- It has no NIC: the worker takes the VM's tap and address only once the
  image is accepted, and adds them with :func:`attach_nic` (the image's NIC
  tunables wait in ``Confined.nic_tuning``), so a refused image takes
  neither.

Resolving symlinks needs I/O, which the core does not do, so confinement is
two pure steps around one impure one::

    wanted = host_paths(config, image_dir)           # core: what to resolve
    resolved = {p: <realpath, kind, size of p> for p in wanted.values()}  # adapter
    confined = confine(config, image_dir=..., closure=..., resolved=..., ...)  # core

Paths are compared as strings: a path is inside the closure when its first
three components (``/nix/store/<hash>-<name>``) name a member of the closure.
"""

from __future__ import annotations

import dataclasses
import enum
import posixpath
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from typing import Any

from procurator.core.errors import ValidationError
from procurator.core.validation import LIMITS, STORE_DIR
from procurator.core.vmdef import (
    Balloon,
    Console,
    Cpus,
    Disk,
    Memory,
    Nic,
    NicTuning,
    Payload,
    PciSegment,
    Platform,
    RateLimitGroup,
    Rng,
    Rtc,
    VmDefinition,
    json_type,
    read_list,
    read_section,
)

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
    """What the worker decides for one VM before its image is read.

    ``serial_file``: where the serial port is written (None: no serial
    port). ``console_mode``: the virtio console's mode. ``vcpus`` /
    ``memory_mib``: the assignment's overrides, 0 for "as the image says".
    The NIC is not here: it is attached to an accepted image
    (:func:`attach_nic`).
    """

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
    """A safe definition (without NIC), the disk copies it relies on, and
    the image's checked NIC tunables for :func:`attach_nic`."""

    definition: VmDefinition
    copies: tuple[DiskCopy, ...]
    nic_tuning: NicTuning = field(default_factory=NicTuning)

    @property
    def config(self) -> dict[str, Any]:
        """The definition as the cloud-hypervisor ``VmConfig`` JSON."""
        return self.definition.to_vm_config()


# ------------------------------------------------------------------ the rules
#
# What a section may hold is its ``vmdef`` dataclass; here are the keys
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
_PAYLOAD_REFUSED = {
    "igvm": "IGVM payloads (confidential guests) are not offered by the worker",
    "host_data": "host data (confidential guests) is not offered by the worker",
}
_CPUS_REFUSED = {
    "affinity": "pins vCPUs to host CPUs; CPU placement is the worker's",
    "core_scheduling": "core scheduling is the worker's to configure",
    "features": "host CPU features (AMX) are the worker's to grant",
}
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
_DISK_REFUSED = {
    "vhost_socket": _HOST_SOCKET,
    "queue_affinity": "pins queues to host CPUs; CPU placement is the worker's",
}
# Refused when true; false (the default) is accepted and dropped.
_DISK_REFUSED_IF_TRUE = {
    "vhost_user": _HOST_SOCKET,
    "backing_files": "a backing file is a host path the worker cannot confine",
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
_NET_REFUSED_IF_TRUE = {"vhost_user": _HOST_SOCKET}
_CONSOLE_REFUSED = {"file": _WORKER_CONSOLE, "socket": _WORKER_CONSOLE}
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

#: Top-level keys an image may use (everything else is refused).
ALLOWED_KEYS: tuple[str, ...] = VmDefinition.KEYS
_TOP_BOOLS = ("iommu", "watchdog", "pvpanic")


@dataclass(frozen=True, slots=True)
class _ImageSerial:
    """The serial section an image may write: its mode, which the worker
    overwrites anyway (only so that a VmConfig naming it is not refused)."""

    mode: str | None = None


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
    """Return the safe definition of one VM, or raise ``ValidationError``
    whose ``details`` list every problem, one line each, naming its key.

    ``image_dir`` is the image's store path and ``closure`` its closure
    (``nix-store -qR``); ``resolved`` maps the lexical paths of
    :func:`host_paths` to what is really there; writable disks are copied to
    ``<disk_dir>/disk<i>.img`` (the caller makes the copies).
    """
    problems: list[str] = []
    if not isinstance(config, Mapping):
        raise ValidationError(
            f"{image_dir}/vm-config.json is refused",
            details=[f"the config must be a JSON object, not {json_type(config)}"],
        )
    paths = _PathChecker(image_dir, closure, resolved, problems)
    _top_level(config, problems)
    payload = _payload(config, paths, limits, problems)
    cpus = _cpus(config, limits, host, problems)
    memory = _memory(config, limits, host, problems)
    disks, copies = _disks(config, paths, limits, disk_dir, problems)
    nic_tuning = _nic_tuning(config, problems)
    extras = _simple_sections(config, memory, problems)
    if "serial" in config:  # only its mode may be named, and the worker sets it
        read_section(_ImageSerial, config["serial"], "serial", problems, refused=_CONSOLE_REFUSED)
    console = _console(config, host, problems)

    if problems or payload is None:
        raise ValidationError(
            f"{image_dir}/vm-config.json is refused ({len(problems)} "
            f"problem{'s' if len(problems) > 1 else ''})",
            details=problems,
        )
    definition = VmDefinition(
        payload=payload,
        cpus=cpus,
        memory=memory,
        disks=disks,
        serial_file=host.serial_file,
        console=console,
        **extras,
    )
    return Confined(definition=definition, copies=copies, nic_tuning=nic_tuning)


def _top_level(config: Mapping[Any, Any], problems: list[str]) -> None:
    """Problems with the config's top-level keys."""
    for key in config:
        if not isinstance(key, str):  # not from JSON, but a Mapping may hold anything
            problems.append(f"{key!r}: keys must be strings")
        elif key in _REFUSED_TOP:
            problems.append(f"{key}: refused: {_REFUSED_TOP[key]}")
        elif key not in ALLOWED_KEYS:
            problems.append(
                f"{key}: unknown or not allowed; an image may use: {', '.join(ALLOWED_KEYS)}"
            )


def attach_nic(
    confined: Confined, *, nic: Nic, cmdline_extra: str, limits: ImageLimits
) -> VmDefinition:
    """The definition of ``confined`` with the worker's NIC (its tap and MAC
    over the image's tunables) and the kernel command line additions that
    go with it (the guest's ``ip=``; the kernel takes the last of repeated
    parameters, so the worker's win). Raises ``ValidationError`` when the
    command line grows past the limit."""
    problems: list[str] = []
    cmdline = _cmdline(confined.definition.payload.cmdline or "", cmdline_extra, limits, problems)
    if problems:
        raise ValidationError("the VM's kernel command line is refused", details=problems)
    return confined.definition.with_nic(
        dataclasses.replace(nic, tuning=confined.nic_tuning), cmdline=cmdline or None
    )


# ------------------------------------------------------------------ sections


def _payload(
    config: Mapping[str, Any], paths: _PathChecker, limits: ImageLimits, problems: list[str]
) -> Payload | None:
    if "payload" not in config:
        problems.append("payload: required (a kernel or firmware to boot)")
        return None
    payload = read_section(
        Payload, config["payload"], "payload", problems, refused=_PAYLOAD_REFUSED
    )
    if payload is None:
        return None
    if payload.kernel is None and payload.firmware is None:
        problems.append("payload: names neither a kernel nor a firmware")
    real = {
        key: paths.check(f"payload.{key}", getattr(payload, key))
        for key in ("kernel", "initramfs", "firmware")
        if getattr(payload, key) is not None
    }
    cmdline = _cmdline(payload.cmdline or "", "", limits, problems)
    return dataclasses.replace(payload, **real, cmdline=cmdline or None)


def _cmdline(image: str, extra: str, limits: ImageLimits, problems: list[str]) -> str:
    """The image's kernel command line with the worker's additions last."""
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
) -> Cpus:
    raw = config.get("cpus", {})
    cpus = read_section(Cpus, raw, "cpus", problems, refused=_CPUS_REFUSED) or Cpus()
    boot = cpus.boot_vcpus
    most = cpus.max_vcpus if isinstance(raw, Mapping) and "max_vcpus" in raw else boot
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
    return dataclasses.replace(cpus, boot_vcpus=boot, max_vcpus=most)


def _memory(
    config: Mapping[str, Any], limits: ImageLimits, host: HostSide, problems: list[str]
) -> Memory:
    memory = (
        read_section(Memory, config.get("memory", {}), "memory", problems, refused=_MEMORY_REFUSED)
        or Memory()
    )
    size, origin = memory.size, ""
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
    return dataclasses.replace(memory, size=size)


def _disks(
    config: Mapping[str, Any],
    paths: _PathChecker,
    limits: ImageLimits,
    disk_dir: str,
    problems: list[str],
) -> tuple[tuple[Disk, ...], tuple[DiskCopy, ...]]:
    entries = _list(config, "disks", problems)
    if len(entries) > limits.max_disks:
        problems.append(f"disks: {len(entries)} disks; the limit is {limits.max_disks}")
        return (), ()
    disks: list[Disk] = []
    copies: list[DiskCopy] = []
    for i, raw in enumerate(entries):
        where = f"disks[{i}]"
        entry = _refuse_if_true(raw, where, _DISK_REFUSED_IF_TRUE, problems)
        # An image's disk id is accepted and replaced: the worker names devices.
        disk = read_section(Disk, entry, where, problems, refused=_DISK_REFUSED)
        if disk is None:
            continue
        _enum(disk.image_type, f"{where}.image_type", _IMAGE_TYPES, problems)
        _enum(disk.lock_granularity, f"{where}.lock_granularity", _LOCK_GRANULARITIES, problems)
        real = paths.check(f"{where}.path", disk.path, max_size=limits.max_disk_bytes)
        if real is None:
            continue
        if disk.readonly:
            path = real  # the store is read-only anyway
        else:
            path = f"{disk_dir}/disk{i}.img"
            copies.append(DiskCopy(index=i, source=real, target=path))
        disks.append(dataclasses.replace(disk, path=path, id=f"disk{i}"))
    return tuple(disks), tuple(copies)


def _nic_tuning(config: Mapping[str, Any], problems: list[str]) -> NicTuning:
    """The image's checked net[0] tunables. The VM gets a NIC only through
    :func:`attach_nic` (a worker-made tap): without one, cloud-hypervisor
    would create a host tap itself."""
    entries = _list(config, "net", problems)
    if len(entries) > 1:
        problems.append(f"net: {len(entries)} entries; the worker gives each VM one NIC")
        return NicTuning()
    if not entries:
        return NicTuning()
    entry = _refuse_if_true(entries[0], "net[0]", _NET_REFUSED_IF_TRUE, problems)
    if isinstance(entry, Mapping) and "id" in entry:  # accepted, and replaced by net0
        if not isinstance(entry["id"], str):
            problems.append(f"net[0].id: must be a string, not {json_type(entry['id'])}")
        entry = {k: v for k, v in entry.items() if k != "id"}
    tuning = read_section(NicTuning, entry, "net[0]", problems, refused=_NET_REFUSED)
    return tuning if tuning is not None else NicTuning()


def _console(config: Mapping[str, Any], host: HostSide, problems: list[str]) -> Console:
    raw = config.get("console", {})
    if isinstance(raw, Mapping):
        raw = {k: v for k, v in raw.items() if k != "mode"}  # the worker's
    console = read_section(Console, raw, "console", problems, refused=_CONSOLE_REFUSED)
    return dataclasses.replace(console or Console(), mode=host.console_mode)


def _simple_sections(
    config: Mapping[str, Any], memory: Memory, problems: list[str]
) -> dict[str, Any]:
    """The optional sections, by ``VmDefinition`` field name."""
    out: dict[str, Any] = {}
    if "rng" in config:
        rng = read_section(Rng, config["rng"], "rng", problems)
        if rng is not None and rng.src not in _RNG_SOURCES:
            problems.append(
                f"rng.src: {_shown(rng.src)} is not an entropy source the worker "
                f"offers; use one of {', '.join(_RNG_SOURCES)}"
            )
        out["rng"] = rng
    if "balloon" in config:
        balloon = read_section(Balloon, config["balloon"], "balloon", problems)
        if balloon is not None and not 0 <= balloon.size <= memory.size:
            problems.append(
                f"balloon.size: {balloon.size} is not between 0 and memory.size ({memory.size})"
            )
        out["balloon"] = balloon
    if "rtc" in config:
        out["rtc"] = read_section(Rtc, config["rtc"], "rtc", problems)
    if "platform" in config:
        out["platform"] = read_section(
            Platform, config["platform"], "platform", problems, refused=_PLATFORM_REFUSED
        )
    if "rate_limit_groups" in config:
        out["rate_limit_groups"] = read_list(
            RateLimitGroup, config["rate_limit_groups"], "rate_limit_groups", problems
        )
    if "pci_segments" in config:
        out["pci_segments"] = read_list(
            PciSegment, config["pci_segments"], "pci_segments", problems
        )
    for key in _TOP_BOOLS:
        if key in config:
            if isinstance(config[key], bool):
                out[key] = config[key]
            else:
                problems.append(f"{key}: must be a boolean, not {json_type(config[key])}")
    return out


# ------------------------------------------------------------------- helpers


def _refuse_if_true(
    entry: object, where: str, keys: Mapping[str, str], problems: list[str]
) -> object:
    """``entry`` without the ``keys`` an image may only set to false."""
    if not isinstance(entry, Mapping):
        return entry
    for key, reason in keys.items():
        if key not in entry:
            continue
        if not isinstance(entry[key], bool):
            problems.append(f"{where}.{key}: must be a boolean, not {json_type(entry[key])}")
        elif entry[key]:
            problems.append(f"{where}.{key}: refused: {reason}")
    return {k: v for k, v in entry.items() if k not in keys}


def _list(parent: Mapping[str, Any], key: str, problems: list[str]) -> list[Any]:
    value = parent.get(key, [])
    if not isinstance(value, list):
        problems.append(f"{key}: must be an array, not {json_type(value)}")
        return []
    return value


def _enum(value: str | None, where: str, allowed: tuple[str, ...], problems: list[str]) -> None:
    if value is not None and value not in allowed:
        problems.append(f"{where}: {_shown(value)} is not one of {', '.join(allowed)}")


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
        return f"must be a string, not {json_type(raw)}"
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
