"""Plain data of the domain: what is desired, what is observed.

These are the only types that cross between adapters (Cap'n Proto, SQLite,
the VmManager) and the core. They are immutable; every collection is a tuple
(or a frozenset) so values can be shared between threads and compared cheaply.

Placement (docs/SCHEDULING.md): a ``Fleet`` holds pinned VMs per worker and
``unpinned`` VMs the scheduler places; ``core.placement.place`` takes the
fleet, one ``WorkerFacts`` per known worker and the previous assignments,
and answers a ``Placement`` (where each unpinned VM goes, what moved and
why) or an ``Unplaceable`` (each VM that does not fit, and its shortfall).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = [
    "Assignment",
    "Capacity",
    "DiskTransfer",
    "EventKind",
    "Fleet",
    "Health",
    "HealthCheck",
    "HealthKind",
    "OnWorkerLost",
    "Phase",
    "Placement",
    "PlacementPolicy",
    "PlacementReason",
    "PlacementStrategy",
    "PowerChange",
    "PowerState",
    "PrepareState",
    "PreparedImage",
    "RolloutPolicy",
    "Shortfall",
    "TransferProgress",
    "TransferState",
    "UnpinnedVm",
    "Unplaceable",
    "VmAssignment",
    "VmEvent",
    "VmPlacement",
    "VmStatus",
    "WorkerDiff",
    "WorkerFacts",
    "WorkerInfo",
    "WorkerState",
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
    # Something holds only in part (a limit the worker could not enforce,
    # a VMM not jailed); the VM runs.
    WARNING = "warning"
    # A snapshot of the VM was taken, or the VM was restored from one.
    SNAPSHOTTED = "snapshotted"
    RESTORED = "restored"
    # The master moved the VM to another worker (an apply or healing): the
    # message says from where and why. Stored under the new worker.
    RESCHEDULED = "rescheduled"
    # A move's phase (procurator.core.move): the message says which, from
    # where to where, and why a move failed. Stored under the worker that
    # holds the VM (the source until the switch).
    MOVING = "moving"


class HealthKind(enum.Enum):
    """How a worker checks a VM's guest (docs/ROLLOUTS.md)."""

    NONE = "none"  # the VM running is the check
    TCP = "tcp"  # a TCP connect to the guest's address and ``port``
    HTTP = "http"  # GET ``path`` on the guest's ``port`` answers ``expect``


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """What the worker checks of a VM (sent with the VM, never its identity:
    changing the check never replaces the VM). The VM is ``healthy`` once
    the check has passed continuously for ``min_healthy_ms``."""

    kind: HealthKind = HealthKind.NONE
    port: int = 0  # tcp, http
    path: str = ""  # http: starts with "/"
    expect: int = 200  # http status
    min_healthy_ms: int = 10_000
    interval_ms: int = 0  # 0: the worker's default


class Health(enum.Enum):
    """A VM's health as its worker reports it (``VmStatus.health``)."""

    UNCHECKED = "unchecked"  # no check assigned, or no guest running
    PENDING = "pending"  # checking; not passed for min_healthy_ms yet
    HEALTHY = "healthy"  # passed continuously for min_healthy_ms
    UNHEALTHY = "unhealthy"  # failing (the message says how)


class PrepareState(enum.Enum):
    PENDING = "pending"
    READY = "ready"  # realised and rooted on the worker
    FAILED = "failed"  # could not be realised: the message says why


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """A worker's progress on one image its assignment asks it to prepare
    (realise and root without running: a rollout's first phase)."""

    path: str
    state: PrepareState = PrepareState.PENDING
    message: str = ""


class TransferState(enum.Enum):
    """A worker's part in a move's disk transfer (``TransferProgress``)."""

    PENDING = "pending"  # the source: its VM not stopped yet
    SENDING = "sending"
    SENT = "sent"  # the target acknowledged the whole set
    RECEIVED = "received"  # the target: the whole set is stored (live: its VMM holds the state)
    FAILED = "failed"  # the message says why (the source retries)
    READY = "ready"  # a live move's target: its incoming VMM listens (``memory``, ``disks``)


@dataclass(frozen=True, slots=True)
class DiskTransfer:
    """A move's disk transfer a worker takes part in (sent in its
    assignment while the move is transferring; docs/SNAPSHOTS.md, "Moves"):
    the target (``receive``) accepts the VM's disks presenting ``token``;
    the source sends them to ``peer`` (the target's transfer address,
    ``HOST:PORT``) once the VM is stopped."""

    vm_id: str
    op_id: str
    receive: bool
    token: str = field(repr=False)  # a credential: never in a repr, a log or an error
    peer: str = ""
    # A live move's (docs/SNAPSHOTS.md, "Live moves"): the target launches
    # ``incoming`` (the VM as its source's assignment has it, until the
    # switch) as an incoming VMM and reports where it listens; the source
    # migrates the running VM to ``peer`` (memory and state) and ``disks``
    # ("": none to mirror) with ``token``.
    live: bool = False
    disks: str = ""
    incoming: VmAssignment | None = None
    # A cold move's source: the target's worker id when its transfer port
    # serves TLS (``WorkerInfo.transfer_tls``): send only in TLS, to that
    # worker's certificate ("": plain TCP).
    peer_tls_worker: str = ""


@dataclass(frozen=True, slots=True)
class TransferProgress:
    """A worker's progress on one ``DiskTransfer`` of its assignment. A
    live move's target, ``ready``, says where its incoming VMM listens:
    ``memory`` and ``disks`` (HOST:PORT; "": no disks to mirror); a live
    move's source is ``sending`` (bytes of the migration), ``sent`` once
    ``send_migration`` returned (its guest stopped for good, the target
    holding the whole state) or ``failed`` (its guest runs on)."""

    vm_id: str
    op_id: str
    state: TransferState
    done: int = 0
    total: int = 0
    message: str = ""
    memory: str = ""
    disks: str = ""


@dataclass(frozen=True, slots=True)
class VmAssignment:
    """One desired VM. ``hash`` is its identity: a new hash means a new VM."""

    id: str
    hash: str
    nix_store_path: str
    power: PowerState = PowerState.RUNNING
    vcpus: int = 0  # 0: as the image says
    memory_mib: int = 0  # 0: as the image says
    # Sent to workers only (never in a fleet, never stored): the VM is
    # ``on_worker_lost = "reschedule"``, so a worker cut off from every
    # master fences it (procurator.core.fence).
    reschedule: bool = False
    # Sent to workers only: the check the worker runs (None: none, and the
    # VM reports Health.UNCHECKED). Not part of the VM's identity.
    health: HealthCheck | None = None


@dataclass(frozen=True, slots=True)
class Assignment:
    """Everything one worker should run, as of ``generation``."""

    worker_id: str
    generation: int
    vms: tuple[VmAssignment, ...] = ()
    op_id: str = ""
    # Store paths to realise and root without running them (a rollout's
    # prepare phase); the worker reports each in WorkerStatus.prepared.
    prepare: tuple[str, ...] = ()
    # The moves' disk transfers it takes part in (WorkerStatus.transfers).
    transfers: tuple[DiskTransfer, ...] = ()


class OnWorkerLost(enum.Enum):
    """What becomes of an unpinned VM when its worker's lease expires."""

    RESCHEDULE = "reschedule"  # placed on another worker
    WAIT = "wait"  # stays, shown unavailable, until its worker is back


class PlacementStrategy(enum.Enum):
    BINPACK = "binpack"  # the fullest worker that fits: keeps whole workers free
    SPREAD = "spread"  # the emptiest worker that fits: evens the load


@dataclass(frozen=True, slots=True)
class PlacementPolicy:
    """The fleet file's ``[placement]`` section."""

    strategy: PlacementStrategy = PlacementStrategy.BINPACK


@dataclass(frozen=True, slots=True)
class RolloutPolicy:
    """How VMs are replaced (the fleet file's ``[rollout]``, overridable
    per spread group and per VM; docs/ROLLOUTS.md). ``health`` holds the
    check and ``min_healthy_ms`` (the fleet file's ``min_healthy_time``);
    kind ``none``: the VM running is the check."""

    max_parallel: int = 1
    health: HealthCheck = field(default_factory=HealthCheck)
    healthy_deadline_ms: int = 300_000
    canary: int = 0
    auto_revert: bool = True
    auto_promote: bool = False


@dataclass(frozen=True, slots=True)
class UnpinnedVm:
    """A VM of the fleet file's ``[[vms]]`` list: the scheduler picks its
    worker. ``vm.vcpus`` and ``vm.memory_mib`` are always set (required)."""

    vm: VmAssignment
    # Worker labels that must match, sorted by key: (("kvm", "true"), ("zone", "b")).
    constraints: tuple[tuple[str, str], ...] = ()
    spread: str = ""  # group name: its VMs go to different workers where they can
    on_worker_lost: OnWorkerLost = OnWorkerLost.RESCHEDULE

    @property
    def id(self) -> str:
        return self.vm.id


@dataclass(frozen=True, slots=True)
class Fleet:
    """A whole desired fleet: worker id -> its pinned VMs (sorted by worker
    id), and the unpinned VMs the scheduler places (sorted by VM id).

    ``workers`` alone is what the master assigns: a fleet with ``unpinned``
    VMs is turned into one without by ``core.fleet.resolve_fleet`` once
    ``core.placement.place`` has placed them."""

    workers: tuple[tuple[str, tuple[VmAssignment, ...]], ...] = ()
    unpinned: tuple[UnpinnedVm, ...] = ()
    placement: PlacementPolicy = field(default_factory=PlacementPolicy)
    # ``[rollout]`` (None: none, VMs are replaced at once); overrides per
    # spread group and per VM (each a whole policy: the fleet-wide one, or
    # the defaults, with the override's keys), sorted by name.
    rollout: RolloutPolicy | None = None
    group_rollouts: tuple[tuple[str, RolloutPolicy], ...] = ()
    vm_rollouts: tuple[tuple[str, RolloutPolicy], ...] = ()

    def rollout_for(self, vm_id: str, group: str = "") -> RolloutPolicy | None:
        """The policy of one VM: its own, else its spread group's, else the
        fleet's; None: it is not replaced by a rollout."""
        for name, policy in self.vm_rollouts:
            if name == vm_id:
                return policy
        for name, policy in self.group_rollouts:
            if group and name == group:
                return policy
        return self.rollout

    def as_dict(self) -> dict[str, tuple[VmAssignment, ...]]:
        """The pinned VMs per worker (unpinned ones are nobody's yet)."""
        return dict(self.workers)

    @property
    def vm_count(self) -> int:
        return sum(len(vms) for _, vms in self.workers) + len(self.unpinned)


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
    health: Health = Health.UNCHECKED


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    worker_id: str
    observed_generation: int
    vms: tuple[VmStatus, ...] = ()
    # One entry per path of the assignment's ``prepare``.
    prepared: tuple[PreparedImage, ...] = ()
    # One entry per transfer of the assignment's ``transfers``.
    transfers: tuple[TransferProgress, ...] = ()


@dataclass(frozen=True, slots=True)
class Capacity:
    vcpus: int = 0
    memory_mib: int = 0
    max_vms: int = 0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a worker says of itself when it registers. ``labels`` (sorted
    by key) and the overcommit ratios are the scheduler's: it offers
    ``floor(capacity.vcpus * cpu_overcommit)`` vCPUs and
    ``floor(capacity.memory_mib * memory_overcommit)`` MiB to unpinned VMs."""

    worker_id: str
    version: str = ""
    capacity: Capacity = field(default_factory=Capacity)
    metrics_url: str = ""
    driver: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    cpu_overcommit: float = 1.0
    memory_overcommit: float = 1.0
    # HOST:PORT where it takes a move's disks ("": it takes no moves).
    transfer_address: str = ""
    # Its VMM driver can move a running VM (``Capabilities.live_move``);
    # False from a worker older than live moves.
    live_moves: bool = False
    # Its transfer port serves TLS (it runs with fleet certificates);
    # False from a worker older than TLS on the transfers: plain.
    transfer_tls: bool = False


class WorkerState(enum.Enum):
    """A worker as the scheduler sees it."""

    READY = "ready"  # takes new VMs
    CORDONED = "cordoned"  # keeps its VMs, takes no new ones
    DRAINING = "draining"  # its unpinned VMs go elsewhere, takes no new ones
    LOST = "lost"  # lease expired: its `reschedule` VMs go elsewhere


@dataclass(frozen=True, slots=True)
class WorkerFacts:
    """What the scheduler knows of one worker: what it offers (its host's
    capacity times its overcommit ratios), its labels, its state, and the
    store paths it has realised (a VM whose image is among them is placed
    there rather than on an equally good worker, so a move downloads
    nothing). ``incoming``: the VMs moving to it (a move under way, not
    yet switched: ``procurator.core.move``), as their source's assignment
    has them; they count against its capacity as its own VMs do, while
    they also count on their source (docs/SCHEDULING.md)."""

    worker_id: str
    capacity: Capacity = field(default_factory=Capacity)
    cpu_overcommit: float = 4.0
    memory_overcommit: float = 1.0
    labels: tuple[tuple[str, str], ...] = ()  # sorted by key
    state: WorkerState = WorkerState.READY
    images: frozenset[str] = frozenset()
    incoming: tuple[VmAssignment, ...] = ()  # sorted by VM id


class PlacementReason(enum.Enum):
    """Why an unpinned VM is where a placement puts it."""

    NEW = "new"  # not placed before
    KEPT = "kept"  # stays on the worker it had
    WORKER_GONE = "worker gone"  # its worker is not known any more
    WORKER_LOST = "worker lost"  # lease expired and the VM says reschedule
    WORKER_DRAINING = "worker draining"
    CONSTRAINTS = "constraints no longer match"
    NO_LONGER_FITS = "no longer fits"


@dataclass(frozen=True, slots=True)
class VmPlacement:
    """Where one unpinned VM goes. ``previous_worker`` is "" for a VM that
    had none; the VM moves when it is set and differs from ``worker_id``."""

    vm_id: str
    worker_id: str
    reason: PlacementReason
    previous_worker: str = ""
    detail: str = ""  # for a move: what the previous worker lacks, in words

    @property
    def moved(self) -> bool:
        return bool(self.previous_worker) and self.previous_worker != self.worker_id


@dataclass(frozen=True, slots=True)
class Placement:
    """The answer of ``place``: every unpinned VM's worker (sorted by VM id),
    the VMs waiting for a lost worker (pinned, or unpinned with
    ``on_worker_lost = "wait"``), and warnings (pinned VMs over a worker's
    capacity, or declaring no resources)."""

    vms: tuple[VmPlacement, ...] = ()
    unavailable: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    # The resource workers were ranked by: "memory" or "vcpus", whichever
    # the fleet needs the larger share of (docs/SCHEDULING.md).
    ranked_by: str = "memory"

    def as_dict(self) -> dict[str, str]:
        """VM id -> worker id."""
        return {p.vm_id: p.worker_id for p in self.vms}

    @property
    def moves(self) -> tuple[VmPlacement, ...]:
        return tuple(p for p in self.vms if p.moved)


@dataclass(frozen=True, slots=True)
class Shortfall:
    """One VM no worker can take, and why, in words (``message``)."""

    vm_id: str
    vcpus: int
    memory_mib: int
    message: str


@dataclass(frozen=True, slots=True)
class Unplaceable:
    """The answer of ``place`` when some VM fits nowhere: the fleet is
    refused whole. ``vms`` is sorted by VM id."""

    vms: tuple[Shortfall, ...]

    @property
    def message(self) -> str:
        return f"{len(self.vms)} VM(s) cannot be placed; nothing was applied"


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
