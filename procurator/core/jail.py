"""The jail every VMM runs in: policy, limits, uid slots and what a
running VMM is observed to be confined by. Pure: no I/O.

A guest that escapes its VMM holds what the VMM holds. So a worker never
runs a VMM with its own privileges: every VMM is *jailed* (Firecracker's
word; "confinement" in ``procurator.core.confinement`` is the other half:
what an image's config may ask of the host). The layers, each of which
stops something the others do not:

- **its own unprivileged uid and gid** (one per *slot* of the worker's
  configured range, kept by the VM for its lifetime), no capabilities, no
  new privileges: it cannot read what other VMs and the worker own, change
  its uid, or gain anything by exec;
- **a mount namespace** rooted in a read-only tmpfs (``pivot_root``) that
  holds only what this VMM needs: the VM's writable directories, the
  image's store paths read-only, the VMM's own runtime files read-only, a
  handful of devices, a ``/proc`` of its own: no ``/etc/shadow``, no other
  VM, no ``/nix/store`` beyond its own paths, no worker state or keys;
- **a pid namespace** (the VMM is its pid 1): it sees and can signal no
  other process, and everything it forks dies with it;
- **a cgroup** with ``memory.max`` (guest memory + ``memory_overhead``),
  ``cpu.max`` (its vCPUs over ``cpu_overcommit``) and ``pids.max``;
- **a syscall filter**: the VMM's own (cloud-hypervisor ``--seccomp``,
  QEMU ``-sandbox``), asked for by its driver.

What a VMM *is* confined by is observed, never assumed: ``Confinement`` is
read back from the OS for the running process (its uid, capabilities,
namespaces, seccomp mode, and the limits its cgroup actually holds), and a
layer that is missing is reported (``Confinement.missing``) as a warning,
never silence.

Invariants:

- A slot is an index into ``[uid_first, uid_first + uid_count)``; slot k
  runs as uid = gid = ``uid_first + k``. ``SlotTable`` always hands out
  the lowest free one, so a worker's uids stay dense and predictable.
- ``limits_for`` depends only on the definition and the policy, so a VM's
  limits change exactly when its hash does (new vCPUs or memory).
- ``JailPolicy`` refuses a range that includes uid 0 or runs past 2^32-2,
  and limits that could not run any VMM.
"""

from __future__ import annotations

import enum
import math
import posixpath
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from procurator.core.defaults import DEFAULT_OVERCOMMIT
from procurator.core.errors import ValidationError
from procurator.core.vmdef import VmDefinition

__all__ = [
    "CPU_PERIOD_US",
    "DEFAULT_UID_COUNT",
    "DEFAULT_UID_FIRST",
    "Confinement",
    "JailPolicy",
    "Layer",
    "LimitsRead",
    "ResourceLimits",
    "SlotTable",
    "VmPathsPlan",
    "limits_for",
    "plan_vm_paths",
]

MIB = 1 << 20
#: systemd's documented unused range starts at 0x70000000 (1879048192),
#: above the ranges it hands to containers; 65,536 ids from there.
DEFAULT_UID_FIRST = 0x70000000
DEFAULT_UID_COUNT = 65536
#: The last uid a slot may have: (uid_t)-1 is "no change" to the kernel.
_UID_LIMIT = 2**32 - 2
#: cpu.max's period: 100 ms, the kernel's default.
CPU_PERIOD_US = 100_000


@dataclass(frozen=True, slots=True)
class JailPolicy:
    """How a worker jails its VMMs (the ``procurator worker`` flags).

    ``memory_overhead_mib``: what a VMM may use beyond its guest's memory
    (its own code, page tables, device buffers, QEMU's translation cache
    under TCG); ``memory.max`` is the guest's memory plus this.
    ``cpu_overcommit``: vCPUs sold per host CPU; a VM's ``cpu.max`` is its
    vCPUs divided by this (1.0: a VM never uses more than its vCPUs'
    worth). ``pids_max``: tasks (threads included) in the VMM's cgroup.
    ``cgroup_parent``: where VM cgroups go, relative to the worker's own
    cgroup (cgroup v1) or to its parent (v2), or absolute when it starts
    with ``/``; each worker adds a directory of its own below it.
    """

    uid_first: int = DEFAULT_UID_FIRST
    uid_count: int = DEFAULT_UID_COUNT
    memory_overhead_mib: int = 256
    cpu_overcommit: float = DEFAULT_OVERCOMMIT
    pids_max: int = 256
    cgroup_parent: str = "procurator"

    def __post_init__(self) -> None:
        problems = []
        if self.uid_first < 1 or self.uid_count < 1:
            problems.append(
                f"uid range {self.uid_first}+{self.uid_count}: must start above 0 "
                "(root) and hold at least one id"
            )
        elif self.uid_first + self.uid_count - 1 > _UID_LIMIT:
            problems.append(f"uid range {self.uid_first}+{self.uid_count} runs past {_UID_LIMIT}")
        if self.memory_overhead_mib < 16:
            problems.append(
                f"VMM memory overhead {self.memory_overhead_mib} MiB: at least 16 MiB "
                "(no VMM starts in less)"
            )
        if not (0.01 <= self.cpu_overcommit <= 1000) or math.isnan(self.cpu_overcommit):
            problems.append(f"CPU overcommit {self.cpu_overcommit}: must be 0.01-1000")
        if self.pids_max < 8:
            problems.append(f"pids.max {self.pids_max}: at least 8 (a VMM runs several threads)")
        parent = self.cgroup_parent
        parts = [p for p in parent.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts) or "\n" in parent:
            problems.append(f"cgroup parent {parent!r} must name a directory (no . or ..)")
        if problems:
            raise ValidationError("invalid jail configuration", details=problems)

    @property
    def uid_last(self) -> int:
        return self.uid_first + self.uid_count - 1

    def uid(self, slot: int) -> int:
        if not 0 <= slot < self.uid_count:
            raise ValueError(f"slot {slot} outside 0-{self.uid_count - 1}")
        return self.uid_first + slot

    def slot_of(self, uid: int) -> int | None:
        """The slot of ``uid``, None when it is not in the range."""
        slot = uid - self.uid_first
        return slot if 0 <= slot < self.uid_count else None


class SlotTable:
    """Which uid slot each VM holds (the worker's jail keeps one, under its
    lock; not thread-safe), and the lowest slot that may be free: a VM's first
    start takes the lowest free slot without looking at every VM's (issue
    31: a set of the fleet's slots and a scan from slot 0 were a start's
    cost that grew with the fleet), and a released slot lowers it again,
    so the slots handed out are the lowest free ones, as before."""

    def __init__(self, count: int) -> None:
        self._count = count
        self._by_vm: dict[str, int] = {}
        self._taken: set[int] = set()
        self._free_from = 0  # every slot below it is taken

    def get(self, vm_id: str) -> int | None:
        return self._by_vm.get(vm_id)

    def vm_ids(self) -> list[str]:
        return list(self._by_vm)

    def take(self, vm_id: str, slot: int) -> bool:
        """Record that ``vm_id`` holds ``slot``; False (nothing recorded)
        when another VM holds it."""
        if slot in self._taken:
            return False
        self._by_vm[vm_id] = slot
        self._taken.add(slot)
        return True

    def take_free(self, vm_id: str) -> int | None:
        """The lowest free slot, now ``vm_id``'s; None when all are taken."""
        slot = self._free_from
        while slot in self._taken:
            slot += 1
        self._free_from = slot
        if slot >= self._count:
            return None
        self.take(vm_id, slot)
        self._free_from = slot + 1
        return slot

    def pop(self, vm_id: str) -> None:
        slot = self._by_vm.pop(vm_id, None)
        if slot is not None:
            self._taken.discard(slot)
            self._free_from = min(self._free_from, slot)


@dataclass(frozen=True, slots=True)
class ResourceLimits:
    """What a VMM's cgroup is given: ``memory_bytes`` (``memory.max``; no
    swap), ``cpu_quota_us`` per ``cpu_period_us`` (``cpu.max``), ``pids``
    (``pids.max``)."""

    memory_bytes: int
    cpu_quota_us: int
    pids: int
    cpu_period_us: int = CPU_PERIOD_US

    @property
    def cpus(self) -> float:
        return self.cpu_quota_us / self.cpu_period_us


def limits_for(definition: VmDefinition, policy: JailPolicy) -> ResourceLimits:
    """A VM's limits: its guest memory plus the VMM's overhead, its boot
    vCPUs' worth of CPU time (divided by the overcommit), ``pids_max``."""
    memory = definition.memory.size + policy.memory_overhead_mib * MIB
    vcpus = max(1, definition.cpus.boot_vcpus)
    quota = max(1000, math.ceil(vcpus * CPU_PERIOD_US / policy.cpu_overcommit))
    return ResourceLimits(memory_bytes=memory, cpu_quota_us=quota, pids=policy.pids_max)


# -- the VM's own paths ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VmPathsPlan:
    """What a jailed VMM sees of the host for its VM (beyond its runtime
    files and devices): ``writable`` directories, bound read-write, and
    ``readonly`` paths the definition names outside them (kernel,
    initramfs, firmware, read-only disks), bound read-only."""

    writable: tuple[str, ...]
    readonly: tuple[str, ...]
    devices: tuple[str, ...] = ()


def plan_vm_paths(definition: VmDefinition, writable: Collection[str]) -> VmPathsPlan:
    """Which host paths the VMM of ``definition`` needs, given the VM's
    ``writable`` directories. Every writable thing the definition names (a
    disk that is not read-only, the serial file) must lie inside one of
    them; anything else it names is exposed read-only. A device it names
    (the entropy source) is listed in ``devices``. Raises
    ``ValidationError`` listing every path that cannot be given."""
    dirs = tuple(posixpath.normpath(d) for d in writable)
    readonly: list[str] = []
    devices: list[str] = []
    problems: list[str] = []

    def inside(path: str) -> bool:
        return any(path == d or path.startswith(d.rstrip("/") + "/") for d in dirs)

    def need(path: str | None, where: str, *, write: bool) -> None:
        if path is None:
            return
        path = posixpath.normpath(path)
        if not posixpath.isabs(path):
            problems.append(f"{where}: {path!r} is not an absolute path")
        elif inside(path):
            return
        elif write:
            problems.append(
                f"{where}: {path} is outside the VM's writable directories "
                f"({', '.join(dirs)}): a jailed VMM may write nowhere else"
            )
        elif path not in readonly:
            readonly.append(path)

    payload = definition.payload
    need(payload.kernel, "payload.kernel", write=False)
    need(payload.initramfs, "payload.initramfs", write=False)
    need(payload.firmware, "payload.firmware", write=False)
    for i, disk in enumerate(definition.disks):
        need(disk.path, f"disks[{i}].path", write=not disk.readonly)
    need(definition.serial_file, "serial.file", write=True)
    if definition.rng is not None:
        devices.append(definition.rng.src)
    if problems:
        raise ValidationError("the VM cannot run in its jail", details=problems)
    return VmPathsPlan(writable=dirs, readonly=tuple(readonly), devices=tuple(devices))


# -- what a running VMM is confined by (observed) ---------------------------------


class Layer(enum.Enum):
    """One layer of a VMM's jail, as reported per VM."""

    UID = "uid"  # its own unprivileged uid, no capabilities, no new privileges
    MOUNT_NS = "mount-ns"  # its own mount namespace (a root of its own)
    PID_NS = "pid-ns"  # its own pid namespace
    SECCOMP = "seccomp"  # a syscall filter installed
    MEMORY = "memory"  # memory.max
    CPU = "cpu"  # cpu.max
    PIDS = "pids"  # pids.max


@dataclass(frozen=True, slots=True)
class LimitsRead:
    """A cgroup's limits as read back from it: None for a limit that is not
    set (or a controller that is not there). ``version``: 1 or 2; 0 when the
    VMM is in no cgroup of ours."""

    version: int = 0
    path: str = ""
    memory_bytes: int | None = None
    cpus: float | None = None
    pids: int | None = None


@dataclass(frozen=True, slots=True)
class Confinement:
    """What one running VMM is confined by, read from the OS (``/proc`` and
    its cgroup). ``jailed`` False: launched with ``--unconfined`` (or by a
    worker that did not jail it); the rest then says what it really has.
    ``seccomp_filters``: filters installed (``Seccomp_filters``; the
    VMM's own: cloud-hypervisor's or QEMU's). ``notes``: what the worker
    could not set up, in words (e.g. a controller it may not use)."""

    jailed: bool
    uid: int
    gid: int
    capabilities: int
    no_new_privs: bool
    own_mount_ns: bool
    own_pid_ns: bool
    seccomp_filters: int
    limits: LimitsRead = field(default_factory=LimitsRead)
    notes: tuple[str, ...] = ()

    def enforced(self) -> Mapping[Layer, bool]:
        """Every layer, True where it holds."""
        lim = self.limits
        return {
            Layer.UID: self.uid != 0 and self.capabilities == 0 and self.no_new_privs,
            Layer.MOUNT_NS: self.own_mount_ns,
            Layer.PID_NS: self.own_pid_ns,
            Layer.SECCOMP: self.seccomp_filters > 0,
            Layer.MEMORY: lim.memory_bytes is not None,
            Layer.CPU: lim.cpus is not None,
            Layer.PIDS: lim.pids is not None,
        }

    def missing(self) -> tuple[str, ...]:
        """One line per layer that does not hold, saying what is lost."""
        held = self.enforced()
        lines = []
        why = {
            Layer.UID: (
                f"runs as uid {self.uid} with capabilities {self.capabilities:#x}"
                f"{'' if self.no_new_privs else ', may gain privileges by exec'}"
            ),
            Layer.MOUNT_NS: "sees the worker's whole filesystem (no mount namespace)",
            Layer.PID_NS: "sees every process of the host (no pid namespace)",
            Layer.SECCOMP: "no syscall filter installed",
            Layer.MEMORY: "no memory limit (memory.max)",
            Layer.CPU: "no CPU limit (cpu.max)",
            Layer.PIDS: "no task limit (pids.max)",
        }
        for layer, ok in held.items():
            if not ok:
                lines.append(why[layer])
        return (*lines, *self.notes)

    def summary(self) -> str:
        """One line for ``describe`` and events."""
        if not self.jailed and not any(self.enforced().values()):
            return "unconfined (runs as root, sees the host)"
        lim = self.limits
        parts = [f"uid {self.uid}" if self.uid else "uid 0 (root)"]
        ns = [n for n, ok in (("mount", self.own_mount_ns), ("pid", self.own_pid_ns)) if ok]
        parts.append(f"{'+'.join(ns)} ns" if ns else "no namespaces")
        parts.append(
            f"seccomp ({self.seccomp_filters} filter{'s' if self.seccomp_filters != 1 else ''})"
            if self.seccomp_filters
            else "no seccomp"
        )
        if lim.version:
            limits = [
                f"memory.max {lim.memory_bytes // MIB} MiB"
                if lim.memory_bytes is not None
                else "memory.max unset",
                f"cpu.max {lim.cpus:g} CPU" if lim.cpus is not None else "cpu.max unset",
                f"pids.max {lim.pids}" if lim.pids is not None else "pids.max unset",
            ]
            parts.append(f"cgroup v{lim.version}: {', '.join(limits)}")
        else:
            parts.append("no cgroup limits")
        text = "; ".join(parts)
        return text if self.jailed else f"not jailed: {text}"
