"""Plain data of the domain: what is desired, what is observed.

These are the only types that cross between adapters (Cap'n Proto, SQLite,
the VmManager) and the core. They are immutable; every collection is a tuple
so values can be shared between threads and compared cheaply.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "Assignment",
    "Capacity",
    "EventKind",
    "Fleet",
    "Phase",
    "PowerChange",
    "PowerState",
    "VmAssignment",
    "VmEvent",
    "VmStatus",
    "WorkerDiff",
    "WorkerInfo",
    "WorkerStatus",
]


class PowerState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


class Phase(enum.Enum):
    """What an operator needs to know about a VM, in one word."""

    UNKNOWN = "unknown"
    PENDING = "pending"
    REALISING = "realising"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"
    CRASH_LOOP = "crashLoop"
    REMOVING = "removing"


class EventKind(enum.Enum):
    UNKNOWN = "unknown"
    CREATED = "created"
    BOOTED = "booted"
    CRASHED = "crashed"
    RESTARTED = "restarted"
    REPLACED = "replaced"
    STOPPED = "stopped"
    FAILED = "failed"
    READOPTED = "readopted"
    REMOVED = "removed"
    PAUSED = "paused"
    RESUMED = "resumed"


@dataclass(frozen=True, slots=True)
class VmAssignment:
    """One desired VM. ``hash`` is its identity: a new hash means a new VM."""

    id: str
    hash: str
    nix_store_path: str
    power: PowerState = PowerState.RUNNING
    vcpus: int = 0  # 0: as the image says
    memory_mib: int = 0  # 0: as the image says


@dataclass(frozen=True, slots=True)
class Assignment:
    """Everything one worker should run, as of ``generation``."""

    worker_id: str
    generation: int
    vms: tuple[VmAssignment, ...] = ()
    op_id: str = ""


@dataclass(frozen=True, slots=True)
class Fleet:
    """A whole desired fleet: worker id -> its VMs (sorted by worker id)."""

    workers: tuple[tuple[str, tuple[VmAssignment, ...]], ...] = ()

    def as_dict(self) -> dict[str, tuple[VmAssignment, ...]]:
        return dict(self.workers)

    @property
    def vm_count(self) -> int:
        return sum(len(vms) for _, vms in self.workers)


@dataclass(frozen=True, slots=True)
class VmStatus:
    id: str
    phase: Phase
    observed_hash: str = ""
    message: str = ""
    restarts: int = 0
    address: str = ""
    observed_power: PowerState = PowerState.STOPPED
    # Settled: the op that last acted on the VM; otherwise the assignment's.
    op_id: str = ""


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    worker_id: str
    observed_generation: int
    vms: tuple[VmStatus, ...] = ()


@dataclass(frozen=True, slots=True)
class Capacity:
    vcpus: int = 0
    memory_mib: int = 0
    max_vms: int = 0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    worker_id: str
    version: str = ""
    capacity: Capacity = field(default_factory=Capacity)
    metrics_url: str = ""
    driver: str = ""


@dataclass(frozen=True, slots=True)
class PowerChange:
    vm_id: str
    before: PowerState
    after: PowerState


@dataclass(frozen=True, slots=True)
class WorkerDiff:
    """How one worker's assignment changes with an apply."""

    worker_id: str
    added: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    power_changed: tuple[PowerChange, ...] = ()
    # Entries changed otherwise (resources under an explicit, unchanged hash):
    # the worker needs the new assignment, the VM is kept.
    updated: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (
            self.added or self.replaced or self.removed or self.power_changed or self.updated
        )


@dataclass(frozen=True, slots=True)
class VmEvent:
    vm_id: str
    kind: EventKind
    message: str = ""
    op_id: str = ""
    unix_time_ms: int = 0
