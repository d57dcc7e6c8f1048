"""The VM definition: what one VM is made of, typed, written down once.

An image's ``vm-config.json`` is a cloud-hypervisor ``VmConfig`` (OpenAPI
v53). Confinement (``procurator.core.confinement``) reads it into a
``VmDefinition``, keeping only what the dataclasses below name and checking
every host path; the worker completes it (disk copies, serial file, NIC).
The VMM backends render a definition: cloud-hypervisor as its ``VmConfig``
JSON (``to_vm_config``), QEMU as a command line. So the schema lives here
and nowhere else: the JSON codec, confinement's allow-list (a key that is
not a field here is refused) and each backend's support check read it.

Shape: one frozen dataclass per ``VmConfig`` section, its field names the
JSON keys. A field that is ``None`` is unset and absent from the JSON (the
VMM's default applies); required fields have no default. Lists are tuples.
The worker's own parts are typed too: ``serial_file`` (``serial``), the NIC
(``net``: one entry, the worker's tap and MAC over the image's tunables).

Invariants of a ``VmDefinition``: device ids are unique; every disk, the
kernel, initramfs and firmware are absolute paths. Confinement guarantees
more (paths inside the image's closure, resources within the worker's
limits); a definition read back from the worker's own state
(``from_vm_config``) was confined when it was written.

The codec (``read_section`` / ``write_section``) is generic over these
dataclasses: a field's type (``str``, ``int``, ``bool``, a section, a tuple
of either, optionally ``| None``) says how its JSON is checked. It reports
every problem at once, one line each, naming the key (``disks[1].path``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from procurator.core.errors import ValidationError

__all__ = [
    "Balloon",
    "Console",
    "Cpus",
    "Disk",
    "Memory",
    "Nic",
    "NicTuning",
    "Payload",
    "PciSegment",
    "Platform",
    "RateLimitGroup",
    "RateLimiter",
    "Rng",
    "Rtc",
    "TokenBucket",
    "Topology",
    "VmDefinition",
    "json_type",
    "read_section",
    "write_section",
]

_S = TypeVar("_S")


# ---------------------------------------------------------------- sections


@dataclass(frozen=True, slots=True)
class TokenBucket:
    size: int
    refill_time: int
    one_time_burst: int | None = None


@dataclass(frozen=True, slots=True)
class RateLimiter:
    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _OnPci:
    """Where a virtio device sits on the guest's PCI buses."""

    iommu: bool | None = None
    pci_segment: int | None = None
    pci_device_id: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Device(_OnPci):
    """A virtio device with an id of its own (its counters' key)."""

    id: str | None = None


@dataclass(frozen=True, slots=True)
class Payload:
    kernel: str | None = None
    initramfs: str | None = None
    firmware: str | None = None
    cmdline: str | None = None


@dataclass(frozen=True, slots=True)
class Topology:
    threads_per_core: int | None = None
    cores_per_die: int | None = None
    dies_per_package: int | None = None
    packages: int | None = None


@dataclass(frozen=True, slots=True)
class Cpus:
    boot_vcpus: int = 1
    max_vcpus: int = 1
    topology: Topology | None = None
    kvm_hyperv: bool | None = None
    max_phys_bits: int | None = None
    nested: bool | None = None


@dataclass(frozen=True, slots=True)
class Memory:
    size: int = 512 << 20
    mergeable: bool | None = None
    shared: bool | None = None
    thp: bool | None = None
    prefault: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Disk(_Device):
    path: str
    readonly: bool | None = None
    direct: bool | None = None
    num_queues: int | None = None
    queue_size: int | None = None
    serial: str | None = None
    rate_limiter_config: RateLimiter | None = None
    rate_limit_group: str | None = None
    image_type: str | None = None
    sparse: bool | None = None
    lock_granularity: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NicTuning(_OnPci):
    """What an image may say about its NIC: everything but where it is
    plugged in (tap, MAC, addresses) and its id (``net0``), which the
    worker decides."""

    num_queues: int | None = None
    queue_size: int | None = None
    mtu: int | None = None
    rate_limiter_config: RateLimiter | None = None
    offload_tso: bool | None = None
    offload_ufo: bool | None = None
    offload_csum: bool | None = None


@dataclass(frozen=True, slots=True)
class Nic:
    """The VM's one NIC: the worker's tap and MAC (``host_mac``: the tap's
    own, so the VMM keeps it) under the image's tunables; id ``net0``."""

    tap: str
    mac: str
    host_mac: str | None = None
    tuning: NicTuning = NicTuning()

    ID = "net0"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rng(_Device):
    src: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Balloon(_Device):
    size: int
    deflate_on_oom: bool | None = None
    free_page_reporting: bool | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Rtc(_Device):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Console(_Device):
    """The virtio console; the worker sets its mode (``Off`` or ``Null``)."""

    mode: str = "Off"


@dataclass(frozen=True, slots=True)
class Platform:
    num_pci_segments: int | None = None
    system_serial_number: str | None = None
    serial_number: str | None = None
    system_uuid: str | None = None
    uuid: str | None = None
    oem_strings: tuple[str, ...] | None = None
    system_manufacturer: str | None = None
    system_product_name: str | None = None
    system_version: str | None = None
    system_family: str | None = None
    system_sku_number: str | None = None
    chassis_asset_tag: str | None = None


@dataclass(frozen=True, slots=True)
class RateLimitGroup:
    id: str
    rate_limiter_config: RateLimiter | None = None


@dataclass(frozen=True, slots=True)
class PciSegment:
    pci_segment: int
    mmio32_aperture_weight: int | None = None
    mmio64_aperture_weight: int | None = None


# -------------------------------------------------------------- definition


@dataclass(frozen=True, slots=True)
class VmDefinition:
    """One VM, ready for a VMM backend to render (see the module docstring).
    ``serial_file``: the file the serial port writes to (None: no serial
    port); ``net``: the NIC (None: no network at all)."""

    payload: Payload
    cpus: Cpus = Cpus()
    memory: Memory = Memory()
    disks: tuple[Disk, ...] = ()
    net: Nic | None = None
    serial_file: str | None = None
    console: Console = Console()
    rng: Rng | None = None
    balloon: Balloon | None = None
    rtc: Rtc | None = None
    platform: Platform | None = None
    rate_limit_groups: tuple[RateLimitGroup, ...] | None = None
    pci_segments: tuple[PciSegment, ...] | None = None
    iommu: bool | None = None
    watchdog: bool | None = None
    pvpanic: bool | None = None

    #: The top-level VmConfig keys a definition renders (and confinement lets
    #: an image use).
    KEYS: typing.ClassVar[tuple[str, ...]] = (
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

    def __post_init__(self) -> None:
        problems = []
        ids = [d.id for d in self.disks if d.id is not None]
        if self.net is not None:
            ids.append(Nic.ID)
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            problems.append(f"device ids used twice: {', '.join(duplicates)}")
        paths = [
            ("payload.kernel", self.payload.kernel),
            ("payload.initramfs", self.payload.initramfs),
            ("payload.firmware", self.payload.firmware),
            *((f"disks[{i}].path", d.path) for i, d in enumerate(self.disks)),
        ]
        for where, path in paths:
            if path is not None and not path.startswith("/"):
                problems.append(f"{where}: {path!r} is not an absolute path")
        if self.payload.kernel is None and self.payload.firmware is None:
            problems.append("payload: names neither a kernel nor a firmware")
        if problems:
            raise ValidationError("invalid VM definition", details=problems)

    def with_nic(self, nic: Nic | None, *, cmdline: str | None) -> VmDefinition:
        """This definition with ``nic`` and the kernel command line
        ``cmdline`` (None: none)."""
        return dataclasses.replace(
            self, net=nic, payload=dataclasses.replace(self.payload, cmdline=cmdline)
        )

    # -- the VmConfig JSON ------------------------------------------------------

    def to_vm_config(self) -> dict[str, Any]:
        """The cloud-hypervisor ``VmConfig``: unset fields left out."""
        out: dict[str, Any] = {
            "payload": write_section(self.payload),
            "cpus": write_section(self.cpus),
            "memory": write_section(self.memory),
        }
        if self.disks:
            out["disks"] = [write_section(d) for d in self.disks]
        if self.net is not None:
            out["net"] = [
                {
                    **write_section(self.net.tuning),
                    "tap": self.net.tap,
                    "mac": self.net.mac,
                    **({"host_mac": self.net.host_mac} if self.net.host_mac else {}),
                    "id": Nic.ID,
                }
            ]
        for key in ("rng", "balloon", "rtc", "platform"):
            section = getattr(self, key)
            if section is not None:
                out[key] = write_section(section)
        for key in ("rate_limit_groups", "pci_segments"):
            items = getattr(self, key)
            if items is not None:
                out[key] = [write_section(item) for item in items]
        for key in ("iommu", "watchdog", "pvpanic"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        out["serial"] = (
            {"mode": "File", "file": self.serial_file}
            if self.serial_file is not None
            else {"mode": "Off"}
        )
        out["console"] = write_section(self.console)
        return out

    @classmethod
    def from_vm_config(cls, config: Mapping[str, Any]) -> VmDefinition:
        """Read back what ``to_vm_config`` wrote (the worker's own state, e.g.
        ``vm.json``): the worker's parts (NIC, serial file) included. Raises
        ``ValidationError`` naming every problem."""
        problems = [
            f"{key}: not a field of a VM definition" for key in config if key not in cls.KEYS
        ]
        parts = _stored_sections(config, problems)
        nets = read_list(_StoredNic, config["net"], "net", problems) if "net" in config else ()
        if len(nets) > 1:
            problems.append(f"net: {len(nets)} entries; a VM has one NIC")
        parts["net"] = nets[0].nic() if nets else None
        serial = config.get("serial", {"mode": "Off"})
        parts["serial_file"] = serial.get("file") if isinstance(serial, Mapping) else None
        if not isinstance(serial, Mapping) or (
            serial.get("mode"),
            parts["serial_file"] is None,
        ) not in (("File", False), ("Off", True)):
            problems.append(f"serial: {serial!r} is neither a file nor off")
        for key in ("iommu", "watchdog", "pvpanic"):
            parts[key] = config.get(key)
            if not isinstance(parts[key], bool | None):
                problems.append(f"{key}: must be a boolean, not {json_type(parts[key])}")
        if "payload" not in config:
            problems.append("payload: required")
        if problems:
            raise ValidationError("not a VM definition", details=problems)
        return cls(**parts)


def _stored_sections(config: Mapping[str, Any], problems: list[str]) -> dict[str, Any]:
    """The sections of a stored definition, by ``VmDefinition`` field."""

    def one(key: str, kind: type[_S]) -> _S | None:
        return read_section(kind, config[key], key, problems) if key in config else None

    def many(key: str, kind: type[_S]) -> tuple[_S, ...] | None:
        return read_list(kind, config[key], key, problems) if key in config else None

    return {
        "payload": one("payload", Payload),
        "cpus": one("cpus", Cpus) or Cpus(),
        "memory": one("memory", Memory) or Memory(),
        "disks": many("disks", Disk) or (),
        "console": one("console", Console) or Console(),
        "rng": one("rng", Rng),
        "balloon": one("balloon", Balloon),
        "rtc": one("rtc", Rtc),
        "platform": one("platform", Platform),
        "rate_limit_groups": many("rate_limit_groups", RateLimitGroup),
        "pci_segments": many("pci_segments", PciSegment),
    }


@dataclass(frozen=True, slots=True, kw_only=True)
class _StoredNic(NicTuning):
    """A ``net`` entry as ``to_vm_config`` writes it (flat JSON)."""

    tap: str
    mac: str
    host_mac: str | None = None
    id: str | None = None

    def nic(self) -> Nic:
        tuning = {f.name: getattr(self, f.name) for f in dataclasses.fields(NicTuning)}
        return Nic(tap=self.tap, mac=self.mac, host_mac=self.host_mac, tuning=NicTuning(**tuning))


# ------------------------------------------------------------------- codec


@dataclass(frozen=True, slots=True)
class _FieldType:
    """How one field's JSON is checked: its base kind, whether it is a
    tuple of that kind, and whether it is required."""

    kind: type
    many: bool
    required: bool


_TYPES: dict[type, dict[str, _FieldType]] = {}


def fields_of(kind: type) -> dict[str, _FieldType]:
    """The JSON fields of a section dataclass, by name (cached)."""
    found = _TYPES.get(kind)
    if found is None:
        hints = typing.get_type_hints(kind)
        found = {}
        for f in dataclasses.fields(kind):
            hint = hints[f.name]
            required = f.default is dataclasses.MISSING
            args = typing.get_args(hint)
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                hint = next(a for a in args if a is not type(None))
            many = typing.get_origin(hint) is tuple
            base = typing.get_args(hint)[0] if many else hint
            found[f.name] = _FieldType(base, many, required)
        _TYPES[kind] = found
    return found


_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    bool: "a boolean",
}


def json_type(value: object) -> str:
    """The JSON name of ``value``'s type, for messages."""
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


def _is(value: object, kind: type) -> bool:
    if kind is int:  # JSON has no separate bool/int; Python's bool is an int
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def read_section(
    kind: type[_S],
    value: object,
    where: str,
    problems: list[str],
    *,
    refused: Mapping[str, str] | None = None,
    skip: frozenset[str] = frozenset(),
) -> _S | None:
    """``value`` (JSON) as a ``kind`` section, or None when it cannot be one;
    every problem is appended to ``problems``: keys in ``refused`` (with the
    reason), keys that are not fields of ``kind`` (``skip``: fields an image
    may not set, as if unknown), ill-typed values, missing required fields.
    Nested sections are read the same way (without ``refused``)."""
    if not isinstance(value, Mapping):
        problems.append(f"{where}: must be an object, not {json_type(value)}")
        return None
    fields = fields_of(kind)
    allowed = [name for name in fields if name not in skip]
    kept: dict[str, Any] = {}
    broken = False
    for name, item in value.items():
        if refused and name in refused:
            problems.append(f"{where}.{name}: refused: {refused[name]}")
        elif name not in allowed:
            problems.append(
                f"{where}.{name}: unknown or not allowed; allowed: {', '.join(allowed) or 'none'}"
            )
        else:
            ftype = fields[name]
            read = _read_value(ftype, item, f"{where}.{name}", problems)
            if read is _INVALID:
                broken = broken or ftype.required
            else:
                kept[name] = read
    for name, ftype in fields.items():
        if ftype.required and name not in value and name not in skip:
            problems.append(f"{where}.{name}: required")
            broken = True
    if broken:
        return None
    return kind(**kept)


_INVALID = object()


def _read_value(ftype: _FieldType, item: object, where: str, problems: list[str]) -> Any:
    if ftype.many:
        if not isinstance(item, list):
            problems.append(f"{where}: must be an array, not {json_type(item)}")
            return _INVALID
        values = [
            _read_one(ftype.kind, element, f"{where}[{i}]", problems)
            for i, element in enumerate(item)
        ]
        return _INVALID if any(v is _INVALID for v in values) else tuple(values)
    return _read_one(ftype.kind, item, where, problems)


def _read_one(kind: type, item: object, where: str, problems: list[str]) -> Any:
    if dataclasses.is_dataclass(kind):
        section = read_section(kind, item, where, problems)
        return _INVALID if section is None else section
    if not _is(item, kind):
        problems.append(f"{where}: must be {_TYPE_NAMES[kind]}, not {json_type(item)}")
        return _INVALID
    return item


def read_list(kind: type[_S], value: object, where: str, problems: list[str]) -> tuple[_S, ...]:
    """A JSON array of ``kind`` sections (the ones that could be read)."""
    if not isinstance(value, list):
        problems.append(f"{where}: must be an array, not {json_type(value)}")
        return ()
    read = [read_section(kind, item, f"{where}[{i}]", problems) for i, item in enumerate(value)]
    return tuple(item for item in read if item is not None)


def write_section(section: object) -> dict[str, Any]:
    """A section as JSON: unset (None) fields left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        value = getattr(section, f.name)
        if value is None:
            continue
        out[f.name] = _write_value(value)
    return out


def _write_value(value: object) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return write_section(value)
    if isinstance(value, tuple):
        return [_write_value(v) for v in value]
    return value
