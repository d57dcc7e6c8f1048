"""What the store port speaks: plain, immutable values (no database type
crosses it) and the store's own errors. See ``procurator.master.store``."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from procurator.core.control import WorkerEvent
from procurator.core.drain import WorkerMode
from procurator.core.errors import ProcuratorError, UnavailableError, ValidationError
from procurator.core.models import (
    Assignment,
    OnWorkerLost,
    PlacementStrategy,
    PreparedImage,
    TransferProgress,
    VmAssignment,
    VmStatus,
    WorkerDiff,
    WorkerInfo,
    WorkerStatus,
)

__all__ = [
    "REQUESTS_KEPT",
    "ROLLOUTS_KEPT",
    "SCHEMA_VERSION",
    "AppliedRequest",
    "Change",
    "ChangeKind",
    "Fence",
    "FencedError",
    "FleetDelta",
    "FleetDump",
    "LeaseState",
    "PlacementRecord",
    "Registration",
    "Removal",
    "RemovalAck",
    "RequestRecordedError",
    "RolloutActiveError",
    "RolloutChangedError",
    "SessionEndedError",
    "StatusWrite",
    "StoreUnavailableError",
    "StoredFleet",
    "StoredWorker",
    "UnpinnedRules",
    "Versions",
    "WorkerDump",
]

SCHEMA_VERSION = 9
"""1: fleet and generations; 2: request ids, removals; 3: worker state
(sessions, leases, statuses), events, leader leases (the HA store); 4: the
unpinned VMs' placement rules and the strategy (``PlacementRecord``); 5:
the snapshots workers last reported (a record of what lives on them, for a
fleet-wide ``snapshot list``; not part of an export); 6: workers' modes
(cordoned, draining and a drain's progress) and handoffs
(``procurator.core.drain``); 7: rollouts (``procurator.core.rollout``: one
document per rollout, the newest ``ROLLOUTS_KEPT``; not part of an
export); 8: each worker's prepared images (``WorkerStatus.prepared``, with
its status: any master's leader sees a rollout's prepare progress); 9:
moves (``procurator.core.move``: one row per move, the newest
``MOVES_KEPT`` that are over; not part of an export) and each worker's
transfers (``WorkerStatus.transfers``, with its status, like the prepared
images)."""

REQUESTS_KEPT = 1000
ROLLOUTS_KEPT = 100
"""Rollouts kept once over (the newest); one under way is always kept."""
"""Request ids kept for replays (the newest this many applies that had one)."""


@dataclass(frozen=True, slots=True)
class Removal:
    """A VM an apply took off a worker: by which generation, and when the
    worker confirmed it (unix ms; None while pending)."""

    generation: int
    acked_unix_ms: int | None = None


@dataclass(frozen=True, slots=True)
class UnpinnedRules:
    """How the scheduler treats one unpinned VM (``core.models.UnpinnedVm``
    without the VM, which is its assignment)."""

    constraints: tuple[tuple[str, str], ...] = ()  # sorted by key
    spread: str = ""
    on_worker_lost: OnWorkerLost = OnWorkerLost.RESCHEDULE


@dataclass(frozen=True, slots=True)
class PlacementRecord:
    """What an apply stores of its fleet besides the assignments, so that
    healing can place the fleet again without a new apply: the rules of
    each unpinned VM, by VM id, and the strategy. A VM not in ``unpinned``
    is pinned: healing never moves it."""

    unpinned: Mapping[str, UnpinnedRules] = field(default_factory=dict)
    strategy: PlacementStrategy = PlacementStrategy.BINPACK


@dataclass(frozen=True, slots=True)
class Registration:
    """A worker's session as the store records it: which master holds it
    (``master_id``, ``session`` numbers the worker's registrations, so a
    write from an older session is told apart), what the worker said about
    itself, and its lease. ``connected`` is False once the worker
    disconnected or its lease expired (``since_unix_ms`` says when; for an
    expired lease, the last renewal). Lease times are the database's clock."""

    master_id: str
    session: int
    info: WorkerInfo
    connected: bool
    since_unix_ms: int
    renewed_unix_ms: int
    expires_unix_ms: int


@dataclass(frozen=True, slots=True)
class StoredWorker:
    """Everything the store holds about one worker except its desired
    assignment: session, latest status, removals. ``version`` grows with
    every change to any of them (a cache keeps the newest version)."""

    worker_id: str
    version: int = 0
    registration: Registration | None = None
    status: WorkerStatus | None = None
    reported_unix_ms: int = 0
    removals: Mapping[str, Removal] = field(default_factory=dict)
    mode: WorkerMode | None = None  # cordoned or draining (None: ready)


@dataclass(frozen=True, slots=True)
class StoredFleet:
    """What the store holds: the fleet generation, every worker's assignment
    (workers whose VMs were all removed keep an empty one), per worker its
    recorded removals by VM id, the state of every worker the store knows,
    and the newest events (oldest first) with the newest event's seq."""

    generation: int
    assignments: Mapping[str, Assignment]
    removals: Mapping[str, Mapping[str, Removal]] = field(default_factory=dict)
    workers: Mapping[str, StoredWorker] = field(default_factory=dict)
    events: tuple[WorkerEvent, ...] = ()
    event_seq: int = 0


@dataclass(frozen=True, slots=True)
class FleetDelta:
    """The fleet generation now and the assignments of the workers that an
    apply changed after the generation asked about."""

    generation: int
    assignments: Mapping[str, Assignment]


@dataclass(frozen=True, slots=True)
class Versions:
    """What a cache compares with to find what it missed: the generation,
    each worker's version, the newest event's seq."""

    generation: int
    workers: Mapping[str, int]
    event_seq: int


@dataclass(frozen=True, slots=True)
class AppliedRequest:
    """A committed apply that carried a request id: what a replay answers."""

    request_id: str
    generation: int
    op_id: str
    fleet_digest: str
    diffs: tuple[WorkerDiff, ...]


@dataclass(frozen=True, slots=True)
class RemovalAck:
    """A worker observed ``observed_generation``: its removals up to it are
    confirmed at ``unix_ms`` (forgetting them later is the leader's,
    ``Store.forget_removals``)."""

    observed_generation: int
    unix_ms: int


@dataclass(frozen=True, slots=True)
class StatusWrite:
    """One status report, as the rows it changes. ``whole``: ``upserts`` is
    the worker's whole status (VMs the store holds and it does not name are
    deleted; rows equal to what is stored are not rewritten); otherwise
    ``upserts`` and ``deletes`` are what changed since the status this
    session wrote last. Only the session ``(master_id, session)`` may
    write: the store refuses another with ``SessionEndedError``."""

    worker_id: str
    master_id: str
    session: int
    observed_generation: int
    reported_unix_ms: int
    upserts: tuple[VmStatus, ...] = ()
    deletes: tuple[str, ...] = ()
    whole: bool = False
    ack: RemovalAck | None = None
    # Whole in every report (full or changes): replaces the stored one.
    prepared: tuple[PreparedImage, ...] = ()
    # The same (a move's disk transfers; schema version 9).
    transfers: tuple[TransferProgress, ...] = ()


@dataclass(frozen=True, slots=True)
class StatusWritten:
    """What ``write_status`` (or ``unregister``) did to the worker's
    version: ``previous`` (the version the write found) and ``version``
    (the one it made). A cache at
    ``previous`` may take ``version``; a cache at another version misses
    writes made in between (a lease expired, a session reclaimed, an
    apply's removals) and must read the worker."""

    previous: int
    version: int


@dataclass(frozen=True, slots=True)
class Fence:
    """A singleton duty's right to write: the lease ``name`` held by
    ``holder`` in ``epoch``. The store checks it inside the transaction of
    every write made under it."""

    name: str
    holder: str
    epoch: int


@dataclass(frozen=True, slots=True)
class LeaseState:
    """A leader lease as stored, and the database's clock when read."""

    name: str
    holder: str
    epoch: int
    expires_unix_ms: int
    now_unix_ms: int

    @property
    def live(self) -> bool:
        return bool(self.holder) and self.expires_unix_ms > self.now_unix_ms


class ChangeKind(enum.Enum):
    GENERATION = "g"  # an apply committed: value is its generation
    WORKER = "w"  # a worker's state changed: value is its version
    EVENTS = "e"  # events were stored: value is the newest seq
    RESYNC = "resync"  # notifications may have been lost: compare everything


@dataclass(frozen=True, slots=True)
class Change:
    """A change another master (or this one) committed, as notified."""

    kind: ChangeKind
    value: int = 0
    worker_id: str = ""

    def payload(self) -> str:
        """The notification's text: ``g 7``, ``w 12 host-a``, ``e 170...``."""
        text = f"{self.kind.value} {self.value}"
        return f"{text} {self.worker_id}" if self.worker_id else text

    @classmethod
    def parse(cls, payload: str) -> Change | None:
        """The change a payload names; None for one this release does not
        know (a newer master's): the periodic check covers it."""
        parts = payload.split(" ")
        try:
            kind = ChangeKind(parts[0])
            value = int(parts[1])
        except (ValueError, IndexError):
            return None
        if kind is ChangeKind.WORKER and len(parts) == 3:
            return cls(kind, value, parts[2])
        if kind in (ChangeKind.GENERATION, ChangeKind.EVENTS) and len(parts) == 2:
            return cls(kind, value)
        return None


@dataclass(frozen=True, slots=True)
class WorkerDump:
    worker_id: str
    generation: int
    op_id: str
    vms: tuple[VmAssignment, ...]


@dataclass(frozen=True, slots=True)
class FleetDump:
    """What ``procurator master export`` writes and ``import`` reads: the
    durable part of a store (desired state, generations, the apply log,
    request ids, removals, the event seq). Sessions, statuses and events are
    left out: workers register and report again."""

    generation: int
    workers: tuple[WorkerDump, ...]
    applies: tuple[tuple[int, str, int, int, str], ...]  # generation, op id, ms, changed, request
    requests: tuple[tuple[str, int, str, bytes], ...]  # request id, generation, digest, diffs
    removals: tuple[tuple[str, str, int, int | None], ...]  # worker, vm, generation, acked ms
    event_seq: int = 0
    placement: PlacementRecord = field(default_factory=PlacementRecord)


class StoreUnavailableError(UnavailableError):
    """The database cannot be reached (or is busy beyond waiting): the
    message names it. A write that failed so may or may not have
    committed."""


class SessionEndedError(UnavailableError):
    """A write for a worker session that is no longer the worker's current
    one (it registered again, here or with another master, or the session
    ended): the worker must register again."""


class FencedError(UnavailableError):
    """A singleton duty's write under a lease epoch that is no longer the
    live one: another master leads now, nothing was written."""


class RolloutActiveError(ValidationError):
    """A person's apply while a rollout is under way (and not
    ``--supersede``): nothing was applied."""


class RolloutChangedError(ProcuratorError):
    """A rollout's state was written over one that changed meanwhile:
    nothing was written; read it again."""


class RequestRecordedError(ProcuratorError):
    """An apply's request id is recorded already (another master committed
    it meanwhile): nothing was applied; look the request up and replay."""
