"""The master: desired fleet, generations, connected workers, their status.

Trio only. The Cap'n Proto server (``procurator.rpc.master_server``) calls
these methods through the bridge; a worker's ``Node`` capability stays on
the capnp thread and reaches this module as a :class:`WorkerNode` (an opaque
handle whose methods cross the bridge).

**Stateless over its store.** Everything a master knows is in the store
(``procurator.master.store``): the fleet and its generations, the apply
log, request ids, removals, every worker's session and lease, its latest
status, recent events, the leader lease. Several masters may share one
(PostgreSQL) store and all serve workers and clients (docs/HA.md). What a
master keeps in memory are caches of the store, rebuilt from it at start
and kept current by what it writes itself and by the store's change
notifications (``Store.watch``), with a periodic comparison of versions
(``sync_interval``) as the backstop, so a lost notification delays a
change and never loses it (it runs every ``sync_interval`` however often
other work wakes the syncer, and a change heard while a worker is being
read makes it read again). Only two things are a master's own: the
sessions of the workers connected to *it* (their ``Node`` and pusher, the
metric samples they relay: a session's first report is whole, later ones
may be changes against what the session's reports left,
``procurator.core.metrics.apply_metrics_report``), and its change index.

Invariants:

- **Caches only move forward.** The fleet cache (``_assignments``,
  ``_generation``) changes under ``_apply_lock``, only to a newer
  generation: after this master's commit, or from the store's changes
  since the cached generation. A worker's cached state (session, status,
  removals) is replaced only by a newer version of it, and a cache takes
  the version of its own status write only when that write found the
  cached version (``StatusWritten.previous``): else other writes came in
  between (a lease expired, a session reclaimed, an apply's removals) and
  the worker is read whole, lest the new version hide them. Events enter the
  rings in seq order: read from the store (``_pull_events``; the store
  mints seqs under a lock, so a cursor skips nothing) or, on a store only
  this master writes, as this master stored them, with the seqs the store
  gave them (``_add_events``).
- **An apply is one transaction** that mints the generation and checks the
  expected one inside it. The fleet cache is brought up to date from the
  store before the diff (one cheap query: the workers changed since); if
  another master still commits in between, the commit is refused as stale,
  the cache catches up and the apply is diffed again (``_APPLY_ATTEMPTS``),
  so a stale cache never makes a confusing error. With
  ``expected_generation``, a fleet that moved is the caller's
  ``StaleGenerationError``. Two masters can never both win.
- An apply is validated and diffed before anything is stored; a rejected
  apply changes nothing. A no-op apply stores nothing and returns the current
  generation with ``changed=False``.
- **Placement.** A fleet's unpinned VMs are placed in each apply attempt,
  after the cache is brought up to date and before the diff, from the
  cached workers and assignments (``procurator.master.scheduling``): the
  assignments are the previous placement, so a VM keeps its worker and
  every master computes the same answer from the same store. What is
  stored and pushed is the resolved fleet: workers get plain assignments.
  A fleet with a VM that fits nowhere is refused whole (``ValidationError``
  naming each VM and its shortfall). The rules of the unpinned VMs are
  stored with the apply (``PlacementRecord``), also by an apply that moves
  no VM. **Healing** is a singleton duty of the leader (``_heal``): a
  worker not connected for a whole lease, once this master has been up for
  a whole lease, is lost (``scheduling.is_lost``); its ``reschedule`` VMs
  are placed again (the stored fleet, partially: what fits nowhere stays,
  unavailable) and committed as a new generation fenced by the leader's
  epoch.
- After a commit (this master's, or one heard of), each *affected* worker
  connected here gets the new assignment pushed at once; unaffected workers
  are not contacted. Every session has one pusher task and a latest-wins
  slot: at most one push per worker is in flight, a newer assignment
  overwrites one not yet sent, and a push that times out ends the session
  (the worker reconnects and pulls). So a slow or dead worker never delays
  an apply or another worker.
- **Pushing changes.** Once a session's worker is known to hold a whole
  assignment of generation G (it acknowledged a push of it or pulled it on
  this session: ``_Session.held``, only ever moving forward), it is pushed
  only the changes from G to the new assignment (``Node.pushChanges``,
  ``procurator.core.assignments``), computed from the two assignments this
  master has cached (O(that worker's VMs), never the fleet); the whole
  assignment goes instead when the changes would be no smaller. A worker
  that answers the call unsupported (an older release) gets whole
  assignments for the rest of its session. A worker that holds another
  generation than G does not guess: it pulls the whole assignment (which
  is then what it holds), and the periodic resync heals a lost push either
  way. A push of a generation the worker pulled already is not sent.
- **One session per worker, fleet-wide.** Registering stores a new session
  (numbered) held by this master, which ends the worker's older session
  wherever it was: a master that hears of it closes its connection, and
  the store refuses that session's writes (``SessionEndedError``, which
  ends it here too). Before registering, a master brings its fleet cache up
  to date, so a worker that failed over never reports a generation its new
  master has not heard of. Calls on an ended session fail with
  ``UnavailableError``; reports on a session are accepted only for its own
  worker id (else ``UnauthorizedError``), and only about what that worker
  may speak for (below).
- **Leases.** Each master renews the leases of the sessions it holds every
  ``worker_lease / 3`` seconds (the database's clock decides expiry); a
  session it holds that the store no longer shows as its own was taken
  over and ends here. Marking workers whose lease expired as lost (a master
  died with its sessions) is a singleton duty of the leader
  (``procurator.master.leader``), as is forgetting removals confirmed more
  than ``report_grace`` ago. A store with a single master (SQLite) ends at
  start the sessions an earlier run left.
- **Who may report what.** A worker's reports may name only VMs it may
  speak for, and only generations the master issued to it:

  - its *assignment*: the VMs of its current assignment;
  - its *pending removals*: each VM an apply took off it (removed, or moved
    to another worker) by generation G, until it reports an observed
    generation >= G. It is stopping that VM and says so until then; during
    a move the VM is the new worker's assignment and the old one's pending
    removal, and both report it (``describe`` shows the assigned worker's);
  - its *confirmed removals*: once the worker reports an observed generation
    >= G, the removal is confirmed, and for ``report_grace`` seconds (300)
    after that its events and metric samples may still name the VM (they
    travel apart from the status and may arrive after it: the ``removed``
    event does).

  A status report (whole, or the status after merging a change report) may
  name a VM of the assignment, or of a pending removal by a generation G
  above the report's own observed generation (a report that claims to have
  observed G cannot still show the VM: that is ``ValidationError``). Its
  observed generation must be at most the generation of the worker's
  assignment (0 before it has one): ``ValidationError`` otherwise. Events
  and per-VM metric samples may name a VM of the assignment, a pending
  removal, or a removal confirmed within ``report_grace``; anything else is
  ``UnauthorizedError`` (of a metrics change, what it leaves held is
  vetted, as a whole report is: the samples it carries and the held series
  it does not end, so a worker cannot keep a VM's series by no longer
  naming them; a series that ended needs no voice). A refused report is
  refused whole, logged with the worker id at WARNING, and nothing of it is
  stored (a ``reportStatusAndEvents`` carries two reports, each vetted and
  refused on its own: the status changes first, then the events). The
  status vet of a change report looks only at the entries it carries when
  nothing else can have changed the verdict (``_vet_status``). Before
  refusing, a master whose caches may be behind the store
  (another master's apply heard of in part) catches up on the fleet and
  that worker: a report is refused only against what the store holds.

  Removals are store rows written in the apply's transaction; a report that
  confirms some confirms them in the transaction that stores the status.
  A VM put back on the worker is its assignment again; taken off again, its
  removal is pending with the new generation.
- **Status reports write only what changed**: a change report writes the
  VMs it names; a whole report (the first of every session) writes the
  VMs whose stored status differs. The store holds exactly what the
  session last wrote (only the current session may write), so a change
  report always applies to the status it was computed against.
- **Listed workers.** ``fleet_status`` and ``fleet_view`` list a worker while
  it has VMs assigned, is connected (to any master), or has pending removals
  (it may still run VMs the fleet no longer wants; the master cannot know
  until it says so). A worker removed from the fleet is listed until it
  confirmed the removal and is disconnected.
- **Request ids.** An apply may carry a client-chosen request id (1 to 64
  of ``[A-Za-z0-9._-]``; "" for none). A committed apply records it in the
  store, in the transaction of its generation, with a digest of the fleet
  and its diffs. An apply (or dry run) whose request id is recorded applies
  nothing: it answers that apply's result with ``replayed=True`` (same
  generation, op id and diffs), whatever the fleet is at now, also after a
  restart and on another master; with a different fleet it is refused
  (``ValidationError``). Dry runs and no-op applies record nothing. The
  store keeps the newest 1,000 request ids (``REQUESTS_KEPT``): a retry
  within that many applies is recognised.
- **Fleet patches** (``apply_patch``, ``procurator.core.fleetpatch``): a
  client may send only the parts of its fleet file (per worker, and the
  settings) that this master does not hold, by digest, from the fleet of
  the newest apply this master committed or found a no-op (``_applied``).
  The patch is assembled into the client's whole fleet, validated
  incrementally (the rules of one part on the parts sent; VM ids unique and
  the totals against an index of the held fleet), then applied exactly as
  a whole apply of that fleet (placement, diff, rollouts, request ids).
  Parts are content-addressed, so another apply in between (here or on
  another master, or a restart) only makes the patch name more parts
  ``missing``: nothing is merged and nothing is lost. A big worker's part
  comes as chunks (a one-VM change sends one): ``_applied`` keeps the
  chunks of that fleet only, by digest, so the cache is bounded by the
  held fleet and replaced with it; a worker whose chunks are the very
  ones held keeps its list (the diff passes it by identity).
- Events are stored bounded (at most ``events_per_vm`` per VM and
  ``events_total`` in all) and cached in rings with the same bounds, so a
  worker flooding events, or a fleet churning through VM ids, cannot grow
  the master or its store.
- **The database away.** While the store cannot be reached (its
  notifications stopped, or a call failed) and until a full comparison
  succeeded again, applies, status reads and reports fail at once with
  ``UnavailableError`` naming the database; workers keep running their
  VMs on their last assignment and reconnect; the master needs no restart.
  The database may come back without its last commits (status reports and
  sessions commit with ``synchronous_commit = off``; a failover may promote
  a replica that was behind), and a worker whose report was acknowledged
  does not send it again: so before serving again, a master writes anew
  the last status of every session it still holds (``_restore_statuses``),
  and serves only if the database did not go away again meanwhile (what it
  wrote may be lost with that outage too: it writes again after it).
  A failed apply changed nothing unless its commit was under way: then the
  outcome is unknown to the master too, and the request id settles it.
- Every log record of an apply and of the pushes, status transitions and
  events it causes carries its ``op_id`` (``procurator.logs``).
- The change index (``change_index``) moves on every change a control
  client can see in a status or description: an apply that changes the
  fleet, a status or event report, a session starting or ending, on any
  master. It starts from the wall clock in microseconds, so an index from
  before a restart (or from another master) does not come back; blocking
  reads (``wait_change``) wait while the index still equals the caller's,
  at most ``max_waiters`` of them at once.

Lock order: a session's ``reporting`` (its status reports, one at a time)
→ ``_apply_lock`` (the fleet cache) → ``_sessions_lock`` (this master's
sessions against the store's) → ``_events_lock`` (the event cursor). Only
the store is awaited under them (a report's vet may catch the cache up,
under ``_apply_lock``), and the (pure) diff in a thread under
``_apply_lock``; the syncer takes ``reporting`` (the restore after the
database's return) holding none of the others.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import itertools
import json
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NoReturn, Protocol

import trio

from procurator.core.assignments import AssignmentChanges, assignment_changes
from procurator.core.control import (
    ApplyResult,
    FleetStatus,
    VmDescription,
    WorkerConnection,
    WorkerEvent,
)
from procurator.core.defaults import (
    DEFAULT_LEADER_LEASE,
    DEFAULT_PUSH_TIMEOUT,
    DEFAULT_SYNC_INTERVAL,
    DEFAULT_WORKER_LEASE,
)
from procurator.core.drain import (
    DEFAULT_MAX_UNAVAILABLE,
    Handoff,
    ModeAction,
    ModeChange,
    WorkerMode,
    worker_state,
)
from procurator.core.errors import (
    LimitExceededError,
    NotFoundError,
    ProcuratorError,
    StaleGenerationError,
    UnauthorizedError,
    UnavailableError,
    UnsupportedError,
    ValidationError,
)
from procurator.core.fleet import diff_assignments, diff_fleets, validate_fleet
from procurator.core.fleetpatch import (
    FleetParts,
    FleetPatch,
    PatchAnswer,
    assemble,
    diff_patched,
)
from procurator.core.metrics import (
    FleetView,
    MetricSample,
    MetricsReport,
    SeriesKey,
    WorkerView,
    apply_metrics_report,
)
from procurator.core.models import (
    Assignment,
    EventKind,
    Fleet,
    OnWorkerLost,
    Phase,
    Placement,
    PlacementPolicy,
    PlacementReason,
    VmAssignment,
    VmEvent,
    VmPlacement,
    VmStatus,
    WorkerDiff,
    WorkerInfo,
    WorkerState,
    WorkerStatus,
)
from procurator.core.move import (
    DEFAULT_MOVE_TIMEOUT_S,
    MOVES_KEPT,
    Move,
    MoveAction,
    MoveKind,
    MovePhase,
    ahead_of,
    check_move,
    shortfall,
    transfer_progress,
)
from procurator.core.move import step as move_step
from procurator.core.rollout import Rollout, RolloutAction, RolloutPhase, RolloutView, act, view
from procurator.core.rollout import step as rollout_step
from procurator.core.snapshot import SnapshotAction, SnapshotInfo, SnapshotRequest
from procurator.core.status import StatusChanges, StatusMerger
from procurator.core.validation import LIMITS, check_request_id
from procurator.logs import log_context, new_op_id, some
from procurator.master.drain import live_or_handoff, plan_drains
from procurator.master.leader import Leadership
from procurator.master.move import plan_move, with_moves
from procurator.master.rollout import begin as begin_rollout
from procurator.master.rollout import with_rollout
from procurator.master.scheduling import (
    KnownWorker,
    is_lost,
    placement_record,
    resolve,
    stored_fleet,
    with_fence_marks,
    worker_facts,
)
from procurator.master.store import (
    Change,
    ChangeKind,
    Fence,
    FleetDelta,
    Registration,
    Removal,
    RemovalAck,
    RequestRecordedError,
    SessionEndedError,
    StatusWrite,
    Store,
    StoredFleet,
    StoredWorker,
    StoreUnavailableError,
)
from procurator.master.store.model import RolloutChangedError, UnpinnedRules

__all__ = [
    "DesiredStateStore",
    "MasterService",
    "WorkerNode",
    "default_master_id",
    "fleet_digest",
    "new_op_id",
]

logger = logging.getLogger(__name__)

DesiredStateStore = Store
"""The store port as the service names it (``procurator.master.store.Store``)."""

_APPLY_ATTEMPTS = 8
_NO_ASSIGNMENT = Assignment("", 0)
_EVENTS_PAGE = 1000


def default_master_id() -> str:
    """``<host name>-<6 hex digits>``: unique per master process."""
    return f"{socket.gethostname().split('.')[0] or 'master'}-{secrets.token_hex(3)}"


def fleet_digest(fleet: Fleet) -> str:
    """A digest of what ``fleet`` asks for, independent of the order in which
    workers and VMs are listed: tells a retried request from a reused id."""
    canonical = sorted(
        (
            worker_id,
            sorted(
                (vm.id, vm.hash, vm.nix_store_path, vm.power.value, vm.vcpus, vm.memory_mib)
                for vm in vms
            ),
        )
        for worker_id, vms in fleet.workers
    )
    if not fleet.unpinned and fleet.placement == PlacementPolicy():
        # A pinned fleet's digest is what it was before unpinned VMs existed.
        return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()
    unpinned = sorted(
        (
            u.id,
            u.vm.hash,
            u.vm.nix_store_path,
            u.vm.power.value,
            u.vm.vcpus,
            u.vm.memory_mib,
            u.constraints,
            u.spread,
            u.on_worker_lost.value,
        )
        for u in fleet.unpinned
    )
    whole = [canonical, unpinned, fleet.placement.strategy.value]
    return hashlib.sha256(json.dumps(whole, separators=(",", ":")).encode()).hexdigest()


class WorkerNode(Protocol):
    """The master's handle on one connected worker's ``Node`` capability."""

    @property
    def connection_id(self) -> int:
        """Identifies the network connection the node came over."""
        ...

    async def push(self, assignment: Assignment) -> None:
        """Deliver ``assignment``; returns once the worker took note of it."""
        ...

    async def push_changes(self, changes: AssignmentChanges) -> None:
        """Deliver what changed since ``changes.base_generation``; as
        ``push``, and ``UnsupportedError`` from a worker that does not take
        changes (an older release)."""
        ...

    async def snapshot(self, request: SnapshotRequest) -> SnapshotInfo:
        """The worker's answer to a snapshot operation (its typed error)."""
        ...

    async def list_snapshots(self, vm_id: str = "") -> tuple[SnapshotInfo, ...]:
        """The worker's snapshots (of one VM, or all)."""
        ...

    async def aclose(self) -> None:
        """Close the worker's connection (idempotent)."""
        ...


@dataclass(eq=False)
class _Session:
    """A session of a worker connected to this master."""

    token: int
    worker_id: str
    epoch: int  # the store's number of this session
    info: WorkerInfo
    node: WorkerNode
    pending: Assignment | None = None
    wake: trio.Event = field(default_factory=trio.Event)
    # The newest assignment (as sent) the worker is known to hold on this
    # session: it acknowledged its push or pulled it. What changes are
    # computed from; None until then (see "Pushing changes").
    held: Assignment | None = None
    # False once the worker answered ``push_changes`` unsupported.
    takes_changes: bool = True
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    # The last status this session delivered: what its status changes apply
    # to (never another session's, see procurator.core.status).
    status: WorkerStatus | None = None
    # Merges its changes in O(changes) (procurator.core.status).
    merger: StatusMerger = field(default_factory=StatusMerger)
    # The last status vetted in full or in part, with the voice it was
    # vetted against (``MasterService._vet_status``); None: none.
    vetted: tuple[WorkerStatus, _Voice | None] | None = None
    # Held by a status report from its merge until its store write ended:
    # two of the session's reports that arrive together are applied one
    # after the other (a worker's link sends one at a time, but the master
    # does not rely on it: each merge starts from what the last one left).
    reporting: trio.Lock = field(default_factory=trio.Lock)
    # The metric series this session's reports left: what its metrics
    # changes apply to (None: no report yet; procurator.core.metrics).
    metrics: dict[SeriesKey, MetricSample] | None = None
    # The VM ids of ``metrics``' series (with "" for worker-wide ones): what
    # a change that ends nothing leaves held is vetted by (made anew only
    # when the series held are not the same set any more).
    metric_vms: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _SnapshotWorker:
    """A worker connected here, as a snapshot call reaches it."""

    worker_id: str
    node: WorkerNode

    async def snapshot(self, request: SnapshotRequest) -> SnapshotInfo:
        return await self.node.snapshot(request)

    async def list_snapshots(self, vm_id: str) -> tuple[SnapshotInfo, ...]:
        return await self.node.list_snapshots(vm_id)


@dataclass(eq=False)
class _Worker:
    """A worker as cached from the store (``version`` and what it covers),
    plus its session here, if it is connected to this master."""

    worker_id: str
    version: int = 0
    registration: Registration | None = None
    status: WorkerStatus | None = None
    last_report_unix_ms: int = 0
    removals: dict[str, Removal] = field(default_factory=dict)
    session: _Session | None = None  # on this master
    # The series its last metrics report left (its session's, changed in
    # place by later reports); ``metrics`` lists them.
    metrics_held: Mapping[SeriesKey, MetricSample] = field(default_factory=dict)
    last_metrics_unix_ms: int = 0
    mode: WorkerMode | None = None  # cordoned or draining (procurator.core.drain)
    _metrics: tuple[MetricSample, ...] | None = None

    @property
    def metrics(self) -> tuple[MetricSample, ...]:
        """The held series, listed when first read after a report (on the
        trio thread: the exporter's view each second), not per report: a
        big report's slices would each pay O(series held)."""
        if self._metrics is None:
            self._metrics = tuple(self.metrics_held.values())
        return self._metrics

    def metrics_applied(self, held: Mapping[SeriesKey, MetricSample]) -> None:
        self.metrics_held = held
        self._metrics = None

    @property
    def connected(self) -> bool:
        return self.registration is not None and self.registration.connected

    @property
    def info(self) -> WorkerInfo | None:
        return self.registration.info if self.registration is not None else None


@dataclass(eq=False)
class _Voice:
    """What one worker may speak for (see the module docstring). Replaced
    whole when it changes (``_rebuild_voice``), never changed in place:
    ``_vet_status`` tells by identity that a voice is the one it vetted a
    status against."""

    assigned: frozenset[str] = frozenset()
    # VM id -> the generation that took it off this worker, not yet observed.
    pending: dict[str, int] = field(default_factory=dict)
    # VM id -> when (unix ms) the worker confirmed its removal.
    confirmed: dict[str, int] = field(default_factory=dict)

    def may_mention(self, vm_id: str, now_ms: int, grace_ms: int) -> bool:
        """May this worker's events or metrics name ``vm_id``?"""
        if vm_id in self.assigned or vm_id in self.pending:
            return True
        at = self.confirmed.get(vm_id)
        return at is not None and now_ms - at < grace_ms


class MasterService:
    """Start with ``await nursery.start(service.run)``; every other method
    raises ``UnavailableError`` before that.

    ``master_id`` names this master in the store (sessions, the leader
    lease) and must be unique among the masters of one store (default: the
    host name and a random suffix). ``worker_lease``: how long a worker's
    session outlives its master's last renewal. ``sync_interval``: the
    periodic comparison with the store. ``leader_lease``: see
    ``procurator.master.leader``."""

    def __init__(
        self,
        store: Store,
        *,
        push_timeout: float = DEFAULT_PUSH_TIMEOUT,
        events_per_vm: int = 100,
        events_total: int = 10_000,
        wall_clock: Callable[[], float] = time.time,
        max_waiters: int = 1024,
        report_grace: float = 300.0,
        master_id: str = "",
        worker_lease: float = DEFAULT_WORKER_LEASE,
        sync_interval: float = DEFAULT_SYNC_INTERVAL,
        leader_lease: float = DEFAULT_LEADER_LEASE,
        rollout_interval: float = 1.0,
    ) -> None:
        for name, value in (
            ("worker_lease", worker_lease),
            ("sync_interval", sync_interval),
            ("leader_lease", leader_lease),
            ("rollout_interval", rollout_interval),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value}")
        self._store = store
        self.master_id = master_id or default_master_id()
        self._push_timeout = push_timeout
        self._report_grace_ms = int(report_grace * 1000)
        self._worker_lease = worker_lease
        self._lease_ms = max(1, round(worker_lease * 1000))
        self._sync_interval = sync_interval
        self.leadership = Leadership(store, self.master_id, lease=leader_lease)
        self._voices: dict[str, _Voice] = {}
        self._events_per_vm = events_per_vm
        self._events_total = events_total
        self._wall_clock = wall_clock
        self._apply_lock = trio.Lock()
        self._sessions_lock = trio.Lock()
        self._events_lock = trio.Lock()
        self._generation = 0
        self._assignments: dict[str, Assignment] = {}
        # The fleet of the newest person's apply this master committed (or
        # found already applied): what a fleet patch takes its unchanged
        # parts from (a Fleet until a patch first needs it cut in parts).
        self._applied: Fleet | FleetParts | None = None
        # The stored rules of unpinned VMs, as of a generation, for the
        # fence marks of what workers receive (with_fence_marks).
        self._fence_rules: tuple[int, Mapping[str, UnpinnedRules]] = (-1, {})
        self._workers: dict[str, _Worker] = {}
        self._sessions: dict[int, _Session] = {}
        self._tokens = itertools.count(1)
        self._events: collections.deque[WorkerEvent] = collections.deque(maxlen=events_total)
        self._vm_events: dict[str, collections.deque[WorkerEvent]] = {}
        self._max_vm_event_keys = events_total
        self._event_cursor = 0
        self._events_unsure = False  # a write of events failed: read the next back
        # Catching up: what notifications (or the backstop) said is newer.
        self._dirty_generation = 0
        self._dirty_workers: set[str] = set()
        self._dirty_events = False
        self._dirty_all = False
        self._sync_wake = trio.Event()
        self._catch_ups_asked = 0
        self._catch_ups_done = 0
        # The database: reachable (the notifications flow) and caught up.
        self._watch_ok = False
        self._available = False
        self._outages = 0  # times the database went away (_set_unavailable)
        self._unavailable = f"database {store.name} has not been read yet"
        self._change_index = int(wall_clock() * 1e6)
        self._changed = trio.Event()
        self._waiters = 0
        self._max_waiters = max_waiters
        self._nursery: trio.Nursery | None = None
        # Healing (``_heal``): since when this master is up (wall ms), and
        # what the last heal could not move, with the state it saw.
        self._up_since_ms = 0
        self._unmovable: tuple[object, ...] = ()
        # Rollouts (procurator.master.rollout): the one under way as of a
        # generation (for what workers are sent), and the leader's pace.
        self._rollout_cache: tuple[int, Rollout | None] = (-1, None)
        self._rollout_interval = rollout_interval
        # Handoffs under way (procurator.core.drain), as of a generation:
        # read again when the fleet's generation moves (they start and end
        # with one).
        self._handoffs: dict[str, Handoff] = {}
        self._handoffs_at = -1
        # (trio time of the read, the database's clock then, worker id ->
        # last lease renewal): ``_read_renewals``.
        self._renewals: tuple[float, int, Mapping[str, int]] = (0.0, 0, {})
        self._drain_wake = trio.Event()
        # Moves under way (procurator.core.move), as of a generation (every
        # phase a worker sees begins with one): for what workers are sent.
        self._moves_cache: tuple[int, tuple[Move, ...]] = (-1, ())
        # The moves under way after the move duty's last pass, and the
        # leadership it ran under (fleet_view shows them while it holds).
        self._moves_driven: tuple[Fence | None, tuple[Move, ...]] = (None, ())
        # Set by a status report that speaks of a move (_drive_moves).
        self._move_news = trio.Event()

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                # Listening first: a change committed while loading is heard.
                await nursery.start(self._store.watch, self._on_change, self._on_health)
                stored = await self._store.load(events=self._events_total)
                self._absorb_all(stored)
                await self._load_handoffs()
                await self._active_moves()
                if self._store.single_master:
                    ended = await self._store.end_sessions(self.master_id, unix_ms=self._now_ms())
                    for worker_id in ended:
                        self._absorb_worker(await self._store.worker(worker_id))
                self._available = True
                self._up_since_ms = self._now_ms()
                logger.info(
                    "master %s: state loaded from %s: generation %d, %d workers, %d VMs, "
                    "%d removals unconfirmed",
                    self.master_id,
                    self._store.name,
                    self._generation,
                    len(self._assignments),
                    sum(len(a.vms) for a in self._assignments.values()),
                    sum(len(v.pending) for v in self._voices.values()),
                )
                self._nursery = nursery
                nursery.start_soon(self._sync_forever, name="catch up with the store")
                nursery.start_soon(self._renew_forever, name="renew the workers' leases")
                await nursery.start(self.leadership.run)
                interval = min(self._worker_lease, self._report_grace_ms / 1000) / 3
                nursery.start_soon(
                    self.leadership.run_duty, "expire leases", interval, self._expire_leases
                )
                nursery.start_soon(
                    self.leadership.run_duty, "forget removals", interval, self._forget_removals
                )
                nursery.start_soon(self.leadership.run_duty, "heal", interval, self._heal)
                nursery.start_soon(
                    self.leadership.run_duty, "drain", min(0.5, interval), self._drain
                )
                nursery.start_soon(
                    self.leadership.run_duty, "moves", min(0.5, interval), self._drive_moves
                )
                nursery.start_soon(
                    self.leadership.run_duty,
                    "rollouts",
                    self._rollout_interval,
                    self._drive_rollout,
                )
                task_status.started()
        finally:
            self._nursery = None
            for session in list(self._sessions.values()):
                self._end_session(session, "master stopping")

    def _require_running(self) -> trio.Nursery:
        if self._nursery is None:
            raise UnavailableError("the master is not running")
        return self._nursery

    def _require_store(self) -> trio.Nursery:
        """Running, with the database there and caught up."""
        nursery = self._require_running()
        if not self._available:
            raise UnavailableError(
                f"{self._unavailable}; until it is back, nothing can be applied or read "
                "(workers keep running their VMs)"
            )
        return nursery

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    @property
    def available(self) -> bool:
        """Whether the database is reachable and the caches caught up."""
        return self._available

    @property
    def generation(self) -> int:
        return self._generation

    @property
    def change_index(self) -> int:
        return self._change_index

    @property
    def waiting(self) -> int:
        """Blocking reads waiting for a change now."""
        return self._waiters

    def _mark_changed(self) -> None:
        self._change_index += 1
        self._changed.set()
        self._changed = trio.Event()

    # ------------------------------------------------------------ caches

    def _absorb_all(self, stored: StoredFleet) -> None:
        """Everything from ``stored``: at start (under no lock: nothing runs)."""
        self._generation = stored.generation
        self._assignments = dict(stored.assignments)
        for worker in stored.workers.values():
            self._absorb_worker(worker)
        for worker_id in stored.assignments:
            self._rebuild_voice(worker_id)
        for item in stored.events:
            self._remember_event(item)
        self._event_cursor = max(stored.event_seq, self._event_cursor)
        self._mark_changed()

    def _worker(self, worker_id: str) -> _Worker:
        worker = self._workers.get(worker_id)
        if worker is None:
            worker = self._workers[worker_id] = _Worker(worker_id)
        return worker

    def _absorb_worker(self, stored: StoredWorker) -> None:
        """A worker's state from the store, if newer than the cached one;
        a session here that the store no longer shows as its own ends."""
        worker = self._worker(stored.worker_id)
        if stored.version <= worker.version:
            return
        worker.version = stored.version
        worker.registration = stored.registration
        worker.status = stored.status
        worker.last_report_unix_ms = stored.reported_unix_ms
        worker.removals = dict(stored.removals)
        worker.mode = stored.mode
        self._rebuild_voice(stored.worker_id)
        # Another master holds the worker's session now: this one's is over.
        # (A newer session of this master's own is ``register``'s to swap
        # in; one the store ended while still alive here, the lease renewal
        # reclaims or ends.)
        session = worker.session
        registration = stored.registration
        if (
            session is not None
            and registration is not None
            and (registration.master_id != self.master_id)
        ):
            self._end_session(
                session, f"the worker registered again (with master {registration.master_id})"
            )
            self._close_soon(session)
        self._mark_changed()

    def _rebuild_voice(self, worker_id: str) -> None:
        assignment = self._assignments.get(worker_id)
        worker = self._workers.get(worker_id)
        removals = worker.removals if worker is not None else {}
        # A VM handed off to this worker is its own while the handoff lasts.
        incoming = {h.vm_id for h in self._handoffs.values() if h.target == worker_id}
        self._voices[worker_id] = _Voice(
            assigned=frozenset(vm.id for vm in assignment.vms).union(incoming)
            if assignment
            else frozenset(incoming),
            pending={vm: r.generation for vm, r in removals.items() if r.acked_unix_ms is None},
            confirmed={
                vm: r.acked_unix_ms for vm, r in removals.items() if r.acked_unix_ms is not None
            },
        )

    def _absorb_fleet(self, delta: FleetDelta) -> None:
        """Assignments other masters committed (under ``_apply_lock``):
        pushed to the affected workers connected here."""
        if delta.generation <= self._generation:
            return
        for worker_id, assignment in delta.assignments.items():
            known = self._assignments.get(worker_id)
            if known is not None and known.generation >= assignment.generation:
                continue
            self._assignments[worker_id] = assignment
            self._rebuild_voice(worker_id)
            worker = self._workers.get(worker_id)
            if worker is not None and worker.session is not None:
                with log_context(op_id=assignment.op_id, worker_id=worker_id):
                    self._queue_push(worker.session, assignment)
        logger.info(
            "caught up with generation %d (from %d): %d worker(s) changed",
            delta.generation,
            self._generation,
            len(delta.assignments),
            extra={"generation": delta.generation},
        )
        self._generation = delta.generation
        self._sync_wake.set()
        self._mark_changed()

    async def _refresh_fleet(self) -> None:
        """Under ``_apply_lock``: the fleet cache as new as the store's."""
        if self._store.single_master:
            return  # nobody else commits
        self._absorb_fleet(await self._store.fleet_since(self._generation))
        await self._load_handoffs()

    async def _catch_up(self) -> None:
        """Return once the fleet cache is as new as the store was when this
        was called; callers at once share one read."""
        if self._store.single_master:
            return
        self._catch_ups_asked += 1
        ticket = self._catch_ups_asked
        async with self._apply_lock:
            if self._catch_ups_done >= ticket:
                return
            covered = self._catch_ups_asked
            await self._refresh_fleet()
            self._catch_ups_done = covered

    def _on_change(self, change: Change) -> None:
        """A notification (any master's): note what is newer, wake the syncer."""
        if change.kind is ChangeKind.GENERATION:
            if change.value > self._generation:
                self._dirty_generation = max(self._dirty_generation, change.value)
        elif change.kind is ChangeKind.WORKER:
            worker = self._workers.get(change.worker_id)
            if worker is None or change.value > worker.version:
                self._dirty_workers.add(change.worker_id)
        elif change.kind is ChangeKind.EVENTS:
            if change.value > self._event_cursor:
                self._dirty_events = True
        else:  # RESYNC: notifications were lost
            self._dirty_all = True
        self._sync_wake.set()

    def _on_health(self, ok: bool, reason: str) -> None:
        self._watch_ok = ok
        if not ok:
            self._set_unavailable(reason)

    def _set_unavailable(self, reason: str) -> None:
        if self._available:
            logger.warning("%s; applies and reads fail until it is back", reason)
            self._mark_changed()
        self._available = False
        self._unavailable = reason
        self._outages += 1
        self._dirty_all = True
        self._sync_wake.set()

    async def _sync_forever(self) -> None:
        # The backstop runs every sync interval, however often something
        # else wakes the syncer in between (lease renewals do, every
        # worker_lease / 3).
        next_full = trio.current_time() + self._sync_interval
        while True:
            with trio.move_on_at(next_full):
                await self._sync_wake.wait()
            self._sync_wake = trio.Event()
            if trio.current_time() >= next_full:
                self._dirty_all = True
                next_full = trio.current_time() + self._sync_interval
            try:
                await self._sync()
            except UnavailableError as exc:
                self._set_unavailable(str(exc))
                await trio.sleep(min(1.0, self._sync_interval))
                self._sync_wake.set()

    async def _sync(self) -> None:
        """Bring every cache up to what the notifications (or, with
        ``_dirty_all``, a comparison of versions) say is newer."""
        outages = self._outages
        full = self._dirty_all
        if full:
            self._dirty_all = False
            try:
                versions = await self._store.versions()
            except BaseException:
                self._dirty_all = True
                raise
            if versions.generation > self._generation:
                self._dirty_generation = max(self._dirty_generation, versions.generation)
            for worker_id, version in versions.workers.items():
                worker = self._workers.get(worker_id)
                if worker is None or version > worker.version:
                    self._dirty_workers.add(worker_id)
            if versions.event_seq > self._event_cursor:
                self._dirty_events = True
        if self._dirty_generation > self._generation:
            async with self._apply_lock:
                await self._refresh_fleet()
        while self._dirty_workers:
            # Out of the set before the read: a change heard while it is on
            # its way puts the worker back, to be read again.
            worker_id = min(self._dirty_workers)
            self._dirty_workers.discard(worker_id)
            try:
                stored = await self._store.worker(worker_id)
            except BaseException:
                self._dirty_workers.add(worker_id)
                raise
            self._absorb_worker(stored)
        if self._dirty_events:
            self._dirty_events = False
            try:
                await self._pull_events()
            except BaseException:
                self._dirty_events = True
                raise
        if full and self._watch_ok and not self._available:
            # Still refusing reports: nothing else writes a status here now.
            await self._restore_statuses()
            if self._outages != outages or not self._watch_ok:
                # The database went away again while this sync ran: what it
                # read and wrote again may be lost with it (a restart from
                # an older copy). Unavailable still; the next full sync,
                # once the database is back, writes the statuses again.
                return
            self._available = True
            logger.info("database %s is back; caught up", self._store.name)
            self._mark_changed()

    async def wait_change(self, index: int, timeout: float) -> int:
        """Wait (at most ``timeout`` seconds) while the change index still
        equals ``index``; return the index then. Any other ``index`` returns
        at once. ``LimitExceededError`` when ``max_waiters`` calls wait
        already: the caller should poll instead."""
        self._require_store()
        if index != self._change_index or timeout <= 0:
            return self._change_index
        if self._waiters >= self._max_waiters:
            raise LimitExceededError(
                f"{self._waiters} calls are waiting for a change already (the limit); "
                "poll without waiting"
            )
        self._waiters += 1
        try:
            with trio.move_on_after(timeout):
                while self._change_index == index:
                    await self._changed.wait()
        finally:
            self._waiters -= 1
        return self._change_index

    # ------------------------------------------------------------ control

    async def apply(
        self,
        fleet: Fleet,
        *,
        expected_generation: int | None = None,
        dry_run: bool = False,
        op_id: str = "",
        request_id: str = "",
        supersede: bool = False,
    ) -> ApplyResult:
        """Validate, diff, store (one transaction), push to affected workers.

        ``op_id`` names the operation (minted here when not given); it is in
        every log record of the apply and of its pushes, in the assignments
        and in every error raised. Raises ``ValidationError`` (nothing
        stored) or ``StaleGenerationError`` when ``expected_generation`` is
        given and the fleet has moved on. VMs replaced in place are replaced
        by a rollout the apply starts (``procurator.master.rollout``); while
        one is under way an apply is refused (``RolloutActiveError``)
        unless it ``supersede``s it.
        """
        self._require_store()
        op_id = op_id or new_op_id()
        with log_context(op_id=op_id):
            try:
                return await self._apply(
                    fleet, expected_generation, dry_run, op_id, request_id, supersede=supersede
                )
            except UnavailableError as exc:
                self._set_unavailable_if_store(exc)
                exc.op_id = exc.op_id or op_id
                raise
            except ProcuratorError as exc:
                exc.op_id = exc.op_id or op_id
                raise

    async def apply_patch(
        self,
        patch: FleetPatch,
        *,
        expected_generation: int | None = None,
        dry_run: bool = False,
        op_id: str = "",
        request_id: str = "",
        supersede: bool = False,
    ) -> PatchAnswer:
        """``apply`` of the fleet ``patch`` stands for (see "Fleet
        patches"), or the parts this master does not hold (``missing``;
        nothing applied, nothing checked but the parts sent). Raises what
        ``apply`` raises, and ``ValidationError`` for a malformed patch."""
        self._require_store()
        op_id = op_id or new_op_id()
        with log_context(op_id=op_id):
            try:
                applied = self._applied
                assembled = await trio.to_thread.run_sync(_assemble, applied, patch)
                if assembled.parts is None:
                    logger.info(
                        "apply %s: a patch names %d part(s) this master does not hold; "
                        "asking for them",
                        op_id,
                        len(assembled.missing),
                    )
                    return PatchAnswer(None, assembled.missing)
                if self._applied is applied and isinstance(applied, Fleet):
                    self._applied = assembled.held  # cut once, kept for the next patch
                parts = assembled.parts
                logger.debug("apply %s: patch assembled", op_id)
                result = await self._apply(
                    parts.fleet(),
                    expected_generation,
                    dry_run,
                    op_id,
                    request_id,
                    supersede=supersede,
                    parts=parts,
                    base=assembled.held or (applied if isinstance(applied, FleetParts) else None),
                )
                return PatchAnswer(result)
            except UnavailableError as exc:
                self._set_unavailable_if_store(exc)
                exc.op_id = exc.op_id or op_id
                raise
            except ProcuratorError as exc:
                exc.op_id = exc.op_id or op_id
                raise

    def _set_unavailable_if_store(self, exc: UnavailableError) -> None:
        if isinstance(exc, StoreUnavailableError):
            self._set_unavailable(str(exc))

    async def _apply(
        self,
        fleet: Fleet,
        expected_generation: int | None,
        dry_run: bool,
        op_id: str,
        request_id: str,
        heal: Fence | None = None,
        *,
        supersede: bool = False,
        parts: FleetParts | None = None,
        base: FleetParts | None = None,
    ) -> ApplyResult:
        """``heal``: the leader's healing (``_heal``) under that fence, which
        places the stored fleet again (``fleet`` is not used). ``parts``:
        ``fleet`` assembled from a patch, validated already; ``base``: the
        held parts it was assembled over (the diff then skips the chunks
        both share, ``diff_patched``)."""
        if request_id and (problem := check_request_id(request_id)) is not None:
            raise ValidationError(f"request id: {problem}")

        def prepare() -> str:
            if parts is not None:
                return parts.request_digest() if request_id else ""
            if heal is None:
                validate_fleet(fleet)
            return fleet_digest(fleet) if request_id else ""

        # Pure CPU work that grows with the fleet: off the event loop.
        digest = await trio.to_thread.run_sync(prepare)
        async with self._apply_lock:
            for _ in range(_APPLY_ATTEMPTS):
                await self._refresh_fleet()
                committed = await self._try_apply(
                    fleet,
                    expected_generation,
                    dry_run,
                    op_id,
                    request_id,
                    digest,
                    heal,
                    supersede,
                    patched=(base, parts) if base is not None and parts is not None else None,
                )
                if committed is not None:
                    break
            else:
                raise UnavailableError(
                    f"the fleet changed {_APPLY_ATTEMPTS} times while this apply was being "
                    "prepared (other masters applying); nothing was applied: try again"
                )
            if heal is None and not (
                isinstance(committed, ApplyResult) and (committed.dry_run or committed.replayed)
            ):
                # Committed, or a no-op: the fleet a patch builds on next.
                self._applied = parts or fleet
        if isinstance(committed, ApplyResult):
            return committed
        generation, diffs, placed, rollout_id = committed
        await self._record_moves(op_id, placed)
        with log_context(generation=generation):
            logger.info(
                "applied %s: generation %d, %d worker(s) changed", op_id, generation, len(diffs)
            )
            self._push_diffs(diffs, generation)
        return ApplyResult(
            generation, True, tuple(diffs), op_id, False, placed=placed, rollout_id=rollout_id
        )

    async def _try_apply(
        self,
        fleet: Fleet,
        expected_generation: int | None,
        dry_run: bool,
        op_id: str,
        request_id: str,
        digest: str,
        heal: Fence | None = None,
        supersede: bool = False,
        *,
        patched: tuple[FleetParts, FleetParts] | None = None,
    ) -> ApplyResult | tuple[int, list[WorkerDiff], tuple[VmPlacement, ...], str] | None:
        """One attempt, under ``_apply_lock`` with a fresh cache: a result
        to answer, (generation, diffs, placed, rollout id) committed, or None
        when another master committed first (try again). ``patched``: the
        held parts and the parts ``fleet`` was assembled from (a patch's)."""
        # Before the generation check: a retry of a committed request
        # finds the fleet moved on by its own first attempt.
        if request_id and (replay := await self._replay(request_id, digest, op_id)):
            return replay
        current = self._generation
        if expected_generation is not None and expected_generation != current:
            raise StaleGenerationError(
                f"expected generation {expected_generation}, but the fleet is at "
                f"generation {current}; nothing was applied",
                op_id=op_id,
            )
        assignments = self._assignments
        now_ms = self._now_ms()
        known = [
            KnownWorker(w.worker_id, w.info, w.connected, self._lost(w, now_ms), w.mode)
            for w in self._workers.values()
        ]
        request = fleet  # its rollout settings and spread groups
        if heal is not None:
            # The fleet as stored, read after the cache caught up: the
            # commit's generation check covers both.
            fleet = stored_fleet(assignments, await self._store.placement())
        record = placement_record(fleet)
        # The moves under way hold room on their targets.
        moves = await self._store.moves(limit=0) if fleet.unpinned else ()

        def place_and_diff() -> tuple[Fleet, Placement | None, list[WorkerDiff]]:
            # Unpinned VMs placed from the store's workers and assignments
            # (procurator.master.scheduling); a pinned fleet is unchanged.
            # The facts are O(the fleet's VMs): only a fleet with VMs to place needs them.
            facts = worker_facts(known, assignments, moves=moves) if fleet.unpinned else ()
            resolved, placement = resolve(fleet, facts, assignments, partial=heal is not None)
            if patched is not None and heal is None:
                # Per worker, over the chunks that changed only, when its
                # assignment is the held list (diff_patched checks, by identity).
                return resolved, placement, diff_patched(assignments, resolved, *patched)
            return resolved, placement, diff_fleets(assignments, resolved)

        resolved, placement, diffs = await trio.to_thread.run_sync(place_and_diff)
        logger.debug("apply %s: placed and diffed", op_id)
        placed: tuple[VmPlacement, ...] = ()
        if placement is not None:
            _log_placement(op_id, placement)
            placed = tuple(p for p in placement.vms if p.reason is not PlacementReason.KEPT)
        fleet = resolved
        # Rules that move no VM (a constraint still met, on_worker_lost)
        # are stored all the same: healing reads them.
        rules_changed = (
            heal is None and not dry_run and not diffs and await self._store.placement() != record
        )
        if dry_run or not (diffs or rules_changed):
            logger.info(
                "apply %s: %s (generation %d)",
                op_id,
                "dry run" if dry_run else "no changes",
                current,
                extra={"generation": current},
            )
            return ApplyResult(current, bool(diffs), tuple(diffs), op_id, dry_run, placed=placed)
        desired = fleet.as_dict()
        changes = {d.worker_id: desired.get(d.worker_id, ()) for d in diffs}
        before = {w: assignments[w].vms for w in changes if w in assignments}
        rollout: Rollout | None = None
        if heal is None:
            # VMs replaced in place wait on their old entries for the
            # rollout this apply starts (procurator.master.rollout).
            rollout, changes = begin_rollout(
                request, before, changes, op_id=op_id, now_ms=self._now_ms(), generation=current
            )
        try:
            generation = await self._store.commit(
                expected_generation=current,
                changes=changes,
                before=before,
                op_id=op_id,
                unix_ms=self._now_ms(),
                request_id=request_id,
                fleet_digest=digest,
                diffs=diffs,
                placement=None if heal is not None else record,
                fence=heal,
                rollout=rollout,
                guard_rollouts=heal is None,
                supersede=supersede,
            )
        except (StaleGenerationError, RequestRecordedError) as exc:
            if self._store.single_master:
                raise
            logger.info("apply %s: %s; catching up and trying again", op_id, exc)
            return None
        # No checkpoint from here to the end: the memory follows the
        # commit even if this task is cancelled (the client went away).
        self._absorb_commit(generation, changes, diffs, op_id)
        # The rules this commit stored (a heal's are the stored ones): the
        # pushes that follow mark the VMs without reading them back.
        self._fence_rules = (generation, record.unpinned)
        if heal is None:
            # A person's commit was guarded: the rollout under way is the
            # one it started, or none (pushes need not read it back).
            self._rollout_cache = (generation, rollout)
        if rollout is not None:
            logger.info(
                "apply %s starts rollout %s: %d VM(s) to replace, %d worker(s) prepare first",
                op_id,
                rollout.id,
                len(rollout.vms),
                len(rollout.prepare),
            )
        return generation, diffs, placed, rollout.id if rollout is not None else ""

    def _absorb_commit(
        self,
        generation: int,
        changes: Mapping[str, Sequence[VmAssignment]],
        diffs: Sequence[WorkerDiff],
        op_id: str,
    ) -> None:
        """The caches follow this master's commit of ``changes`` (no
        checkpoint: call it right after the commit returned)."""
        for worker_id, vms in changes.items():
            self._assignments[worker_id] = Assignment(worker_id, generation, tuple(vms), op_id)
        for diff in diffs:
            worker = self._worker(diff.worker_id)
            for vm_id in diff.removed:
                worker.removals[vm_id] = Removal(generation)
            self._rebuild_voice(diff.worker_id)
        cached_at, moves = self._moves_cache
        if cached_at == self._generation:
            # What workers are sent of the moves changes only with a move's
            # own commits and rows (_step_move sets it then): this one left
            # them.
            self._moves_cache = (generation, moves)
        self._generation = generation
        self._sync_wake.set()
        self._mark_changed()

    def _push_diffs(self, diffs: Sequence[WorkerDiff], generation: int) -> None:
        """Push each worker of ``diffs`` connected here its assignment."""
        for diff in diffs:
            with log_context(worker_id=diff.worker_id):
                logger.info("worker %s: %s", diff.worker_id, _diff_summary(diff))
                worker = self._workers.get(diff.worker_id)
                if worker is not None and worker.session is not None:
                    self._queue_push(worker.session, self._assignments[diff.worker_id])
                else:
                    logger.info(
                        "worker %s is not connected here: it gets generation %d when it is",
                        diff.worker_id,
                        generation,
                    )

    async def _replay(self, request_id: str, digest: str, op_id: str) -> ApplyResult | None:
        """The result of the committed apply that carried ``request_id``, or
        None when there is none (see "Request ids")."""
        applied = await self._store.find_request(request_id)
        if applied is None:
            return None
        if applied.fleet_digest != digest:
            raise ValidationError(
                f"request id {request_id} was used already, for another fleet (applied as "
                f"generation {applied.generation}, op {applied.op_id}); nothing was applied: "
                "use a new request id"
            )
        logger.info(
            "apply %s: request %s was applied already as generation %d (op %s); "
            "answering with that result",
            op_id,
            request_id,
            applied.generation,
            applied.op_id,
            extra={"generation": applied.generation},
        )
        return ApplyResult(
            applied.generation, True, applied.diffs, applied.op_id, dry_run=False, replayed=True
        )

    def _listed(self, worker_id: str) -> bool:
        """Shown in status and metrics (see "Listed workers")."""
        assignment = self._assignments.get(worker_id)
        worker = self._workers.get(worker_id)
        voice = self._voices.get(worker_id)
        return bool(
            (assignment is not None and assignment.vms)
            or (worker is not None and (worker.connected or worker.mode is not None))
            or (voice is not None and voice.pending)
        )

    def _listed_ids(self) -> list[str]:
        return sorted(w for w in set(self._assignments) | set(self._workers) if self._listed(w))

    async def fleet_status(self) -> FleetStatus:
        self._require_store()
        now_ms = self._now_ms()
        # When each lease was last renewed, as read with the renewals
        # (``_read_renewals``), aged by this master's clock since.
        read_at, db_then_ms, renewals = self._renewals
        elapsed_ms = int((trio.current_time() - read_at) * 1000)
        db_now_ms = db_then_ms + elapsed_ms if db_then_ms else 0
        handoffs_from = collections.Counter(h.source for h in self._handoffs.values())
        workers = []
        for worker_id in self._listed_ids():
            assignment = self._assignments.get(worker_id)
            worker = self._workers.get(worker_id)
            registration = worker.registration if worker else None
            # A registration (on the database's clock too) is a renewal.
            renewed = max(
                renewals.get(worker_id, 0), registration.renewed_unix_ms if registration else 0
            )
            workers.append(
                WorkerConnection(
                    worker_id=worker_id,
                    connected=worker is not None and worker.connected,
                    since_unix_ms=registration.since_unix_ms if registration else 0,
                    desired_generation=assignment.generation if assignment else 0,
                    status=worker.status if worker else None,
                    last_report_unix_ms=worker.last_report_unix_ms if worker else 0,
                    vm_count=len(assignment.vms) if assignment else 0,
                    desired_vms=assignment.vms if assignment else (),
                    info=worker.info if worker else None,
                    state=worker_state(
                        worker.mode if worker else None,
                        lost=worker is not None and self._lost(worker, now_ms),
                    ),
                    renewed_unix_ms=renewed,
                    renewed_ago_ms=max(0, db_now_ms - renewed) if renewed and db_now_ms else -1,
                    mode=worker.mode if worker else None,
                    handoffs=handoffs_from.get(worker_id, 0),
                )
            )
        return FleetStatus(self._generation, tuple(workers), self._change_index)

    async def describe_vm(self, vm_id: str, event_limit: int = 20) -> VmDescription:
        """Desired and observed state of one VM with its newest events.
        Raises ``NotFoundError`` when no assignment, status or event names
        it. O(VMs of the fleet): an operator's command, not a hot path.

        Its ``change_index`` is the one before anything is read: the reads
        of the events and moves below wait for the store, and a report
        taken meanwhile must move the index past the one given, or a
        blocking reader (``wait_change``) that was shown the status before
        that report waits for the next change (the 10 s stragglers of
        issue 31's change benchmark)."""
        self._require_store()
        change_index = self._change_index
        assigned: Assignment | None = None
        desired: VmAssignment | None = None
        for assignment in self._assignments.values():
            desired = next((vm for vm in assignment.vms if vm.id == vm_id), None)
            if desired is not None:
                assigned = assignment
                break
        observed_by, observed = "", None
        # The assigned worker's report first: during a move the VM may
        # still show on its old worker too.
        candidates = sorted(
            self._workers.values(),
            key=lambda w: (assigned is None or w.worker_id != assigned.worker_id, w.worker_id),
        )
        for worker in candidates:
            found = (
                next((v for v in worker.status.vms if v.id == vm_id), None)
                if worker.status
                else None
            )
            if found is not None:
                observed_by, observed = worker.worker_id, found
                break
        events = await self.recent_events(vm_id, event_limit)
        if assigned is None and observed is None and not events:
            raise NotFoundError(f"VM {vm_id!r} is neither desired nor reported by any worker")
        # Its move under way, else its newest over (the store lists a VM's
        # moves under way first, then newest first).
        move = next(iter(await self.moves(vm_id)), None)
        shown = self._workers.get(observed_by or (assigned.worker_id if assigned else ""))
        # The generation that compares with desired_generation is the
        # assigned worker's, even while the VM still shows on its old one.
        observer = self._workers.get(assigned.worker_id if assigned else observed_by)
        return VmDescription(
            vm_id=vm_id,
            fleet_generation=self._generation,
            worker_id=assigned.worker_id if assigned else "",
            desired_generation=assigned.generation if assigned else 0,
            desired_op_id=assigned.op_id if assigned else "",
            desired=desired,
            observed_by=observed_by,
            worker_connected=shown is not None and shown.connected,
            observed_generation=(
                observer.status.observed_generation if observer and observer.status else 0
            ),
            status=observed,
            events=events,
            change_index=change_index,
            move=move,
        )

    async def recent_events(
        self, vm_id: str = "", limit: int = 100, after_seq: int = 0
    ) -> tuple[WorkerEvent, ...]:
        """Events of ``vm_id`` (or of all VMs), oldest first: the newest
        ``limit``, or with ``after_seq`` the oldest ``limit`` whose ``seq``
        is greater (for a client following the stream)."""
        self._require_store()
        ring = self._events if not vm_id else self._vm_events.get(vm_id, ())
        if limit <= 0:
            return ()
        if not after_seq:
            return tuple(ring)[-limit:]
        # Rings are in seq order: skip from the newest end to the cursor.
        newer: list[WorkerEvent] = []
        for item in reversed(ring):
            if item.seq <= after_seq:
                break
            newer.append(item)
        newer.reverse()
        return tuple(newer[:limit])

    async def snapshot(self, request: SnapshotRequest) -> SnapshotInfo:
        """Forward a snapshot operation to the worker the VM is assigned to
        (else the one reporting it) and answer with the worker's result,
        ``worker_id`` set. ``UnavailableError`` when that worker is not
        connected to this master. Snapshots live on their worker; the store
        records what the workers answered (created, deleted, listed), so a
        list shows the snapshots of workers that are away too: a record,
        which a worker's own answer corrects (docs/SNAPSHOTS.md)."""
        self._require_store()
        worker = self._snapshot_worker(request.vm_id)
        info = replace(await worker.snapshot(request), worker_id=worker.worker_id)
        if request.action is SnapshotAction.CREATE:
            await self._record_snapshots(self._store.put_snapshot(info))
        elif request.action is SnapshotAction.DELETE:
            await self._record_snapshots(
                self._store.drop_snapshot(info.worker_id, info.vm_id, info.name)
            )
        return info

    async def list_snapshots(self, vm_id: str = "") -> tuple[SnapshotInfo, ...]:
        """The snapshots of VM ``vm_id`` or, with "", of the fleet, oldest
        first: what the workers connected to this master answer now (asked
        at once; their records updated) and, for the others, what the store
        recorded of them last."""
        self._require_store()
        if vm_id:
            try:
                worker = self._snapshot_worker(vm_id)
            except UnavailableError:
                return await self._store.snapshots(vm_id)  # its worker is away
            infos = await worker.list_snapshots(vm_id)
            found = tuple(replace(i, worker_id=worker.worker_id) for i in infos)
            await self._record_snapshots(
                self._store.replace_snapshots(worker.worker_id, vm_id, found)
            )
            return found
        answers: dict[str, tuple[SnapshotInfo, ...]] = {}

        async def ask(session: _Session) -> None:
            try:
                infos = await session.node.list_snapshots("")
            except ProcuratorError as exc:
                logger.warning("worker %s: snapshots not listed: %s", session.worker_id, exc)
                return
            answers[session.worker_id] = tuple(
                replace(i, worker_id=session.worker_id) for i in infos
            )

        async with trio.open_nursery() as nursery:
            for session in list(self._sessions.values()):
                nursery.start_soon(ask, session)
        for worker_id, infos in answers.items():
            await self._record_snapshots(self._store.replace_snapshots(worker_id, None, infos))
        try:
            recorded = await self._store.snapshots(None)
        except UnavailableError as exc:
            logger.warning("snapshots: the store's record is not readable: %s", exc)
            recorded = ()
        listed = [i for infos in answers.values() for i in infos]
        listed += [i for i in recorded if i.worker_id not in answers]
        return tuple(sorted(listed, key=lambda i: (i.created_unix_ms, i.vm_id, i.name)))

    async def _record_snapshots(self, write: Awaitable[None]) -> None:
        """Record what a worker answered; the operation happened whatever
        becomes of the record (a store away: logged, corrected by the next
        list)."""
        try:
            await write
        except UnavailableError as exc:
            logger.warning("snapshots: not recorded in the store: %s", exc)

    def _snapshot_worker(self, vm_id: str) -> _SnapshotWorker:
        """The session of the worker that holds VM ``vm_id``'s snapshots:
        the one it is assigned to, else the one reporting it."""
        owner = next(
            (a.worker_id for a in self._assignments.values() if any(v.id == vm_id for v in a.vms)),
            None,
        )
        if owner is None:
            owner = next(
                (
                    w.worker_id
                    for w in self._workers.values()
                    if w.status is not None and any(v.id == vm_id for v in w.status.vms)
                ),
                None,
            )
        if owner is None:
            raise NotFoundError(f"VM {vm_id!r} is neither desired nor reported by any worker")
        worker = self._workers.get(owner)
        session = worker.session if worker is not None else None
        if session is None:
            elsewhere = worker is not None and worker.connected
            raise UnavailableError(
                f"VM {vm_id}'s worker {owner} is not connected to this master"
                + (" (it is connected to another one: ask that one)" if elsewhere else ""),
                delay=5.0,
            )
        return _SnapshotWorker(owner, session.node)

    def fleet_view(self) -> FleetView:
        """What the exporter and service discovery show, as plain values.
        Relayed samples (of the workers connected to this master) keep
        their tuple identity until a worker reports again (the exporter
        caches its checks by identity)."""
        views = []
        now_ms = self._now_ms()
        for worker_id in self._listed_ids():
            assignment = self._assignments.get(worker_id)
            worker = self._workers.get(worker_id)
            status = worker.status if worker else None
            phases = dict.fromkeys(Phase, 0)
            for vm in status.vms if status else ():
                phases[vm.phase] += 1
            last = max(worker.last_report_unix_ms, worker.last_metrics_unix_ms) if worker else 0
            info = worker.info if worker else None
            views.append(
                WorkerView(
                    worker_id=worker_id,
                    connected=worker is not None and worker.connected,
                    desired_generation=assignment.generation if assignment else 0,
                    observed_generation=status.observed_generation if status else 0,
                    last_report_unix=last / 1000 if last else None,
                    vms_by_phase=phases,
                    samples=worker.metrics if worker else (),
                    metrics_url=info.metrics_url if info else "",
                    state=worker_state(
                        worker.mode if worker else None,
                        lost=worker is not None and self._lost(worker, now_ms),
                    ).value,
                )
            )
        rollout = self._rollout_cache[1]
        # Only the leader drives moves: another master (or one that lost
        # the lead) shows none rather than the last it saw.
        fence, moves = self._moves_driven
        if fence is None or fence != self.leadership.fence:
            moves = ()
        if rollout is None:
            return FleetView(tuple(views), moves=moves)
        return FleetView(tuple(views), view(rollout, self._reported_statuses()), moves)

    def _reported_statuses(self) -> dict[str, WorkerStatus]:
        """The last status of each worker that reported one."""
        return {
            w: worker.status for w, worker in self._workers.items() if worker.status is not None
        }

    def worker_info(self) -> dict[str, WorkerInfo]:
        """What each worker said about itself when it last registered."""
        return {w.worker_id: w.info for w in self._workers.values() if w.info is not None}

    def worker_metrics(self) -> dict[str, tuple[int, tuple[MetricSample, ...]]]:
        """The latest metric samples (with their time, unix ms) of each
        worker connected to this master."""
        return {
            w.worker_id: (w.last_metrics_unix_ms, w.metrics)
            for w in self._workers.values()
            if w.metrics
        }

    # ------------------------------------------------------------ cordon, drain

    async def change_worker_mode(
        self,
        worker_id: str,
        action: ModeAction,
        max_unavailable: int = DEFAULT_MAX_UNAVAILABLE,
    ) -> ModeChange:
        """Cordon, uncordon or drain ``worker_id`` (``procurator.core.drain``):
        stored (the store decides against the stored mode, idempotently),
        then cached; the leader's drain duty does the moving. A new drain's
        op id names its moves; ``NotFoundError`` for a worker the store
        never heard of."""
        self._require_store()
        op_id = new_op_id()
        with log_context(op_id=op_id, worker_id=worker_id):
            try:
                change = await self._store.change_mode(
                    worker_id,
                    action,
                    op_id=op_id,
                    unix_ms=self._now_ms(),
                    max_unavailable=max_unavailable,
                )
                self._absorb_worker(await self._store.worker(worker_id))
            except UnavailableError as exc:
                self._set_unavailable_if_store(exc)
                raise
            logger.info("%s", change.message)
        self._drain_wake.set()
        return change

    # ------------------------------------------------------------ workers

    async def register(self, info: WorkerInfo, node: WorkerNode) -> int:
        """Start a session for ``info.worker_id``; returns its token. An
        older session of the same worker, here or on another master, is
        ended and its connection closed."""
        self._require_store()
        try:
            await self._catch_up()
            async with self._sessions_lock:
                stored = await self._store.register(
                    info.worker_id,
                    self.master_id,
                    info,
                    unix_ms=self._now_ms(),
                    lease_ms=self._lease_ms,
                )
                return self._start_session(info, node, stored)
        except UnavailableError as exc:
            self._set_unavailable_if_store(exc)
            raise

    def _start_session(self, info: WorkerInfo, node: WorkerNode, stored: StoredWorker) -> int:
        """The session ``register`` stored, started here; no checkpoint."""
        nursery = self._require_running()
        assert stored.registration is not None
        worker = self._worker(info.worker_id)
        old = worker.session
        session = _Session(
            next(self._tokens), info.worker_id, stored.registration.session, info, node
        )
        self._sessions[session.token] = session
        worker.session = session
        self._absorb_worker(stored)
        self._mark_changed()
        if old is not None:
            logger.info("worker %s registered again; replacing its old session", info.worker_id)
            self._end_session(old, "replaced by a new registration")
            if old.node.connection_id != node.connection_id:
                nursery.start_soon(self._close_node, old.node, info.worker_id)
        else:
            cap = info.capacity
            logger.info(
                "worker %s connected (version %r, driver %s, %d vCPUs, %d MiB)",
                info.worker_id,
                info.version,
                info.driver or "?",
                cap.vcpus,
                cap.memory_mib,
            )
        nursery.start_soon(self._pusher, session, name=f"push to {info.worker_id}")
        return session.token

    async def unregister(self, token: int) -> None:
        """The session's connection is gone."""
        session = self._sessions.get(token)
        if session is None:
            return
        self._end_session(session, "disconnected")
        await self._record_disconnect(session)

    async def _record_disconnect(self, session: _Session) -> None:
        """Tell the store that ``session`` (ended here) is over, unless the
        worker has a newer one here."""
        worker = self._workers.get(session.worker_id)
        if worker is None or worker.session is not None:
            return  # replaced here already
        logger.info("worker %s disconnected", session.worker_id)
        now = self._now_ms()
        try:
            written = await self._store.unregister(
                session.worker_id, self.master_id, session.epoch, unix_ms=now
            )
        except UnavailableError as exc:
            # Its lease runs out instead; the leader marks it lost then.
            logger.info("worker %s: could not record its disconnection: %s", worker.worker_id, exc)
            return
        if written is None or written.version <= worker.version:
            return
        registration = worker.registration
        if written.previous != worker.version or registration is None:
            # Other writes came between the cached version and this one
            # (see report_status): read the worker whole, now, so that the
            # disconnection shows at once (else: the syncer, later).
            try:
                self._absorb_worker(await self._store.worker(worker.worker_id))
            except UnavailableError:
                self._dirty_workers.add(worker.worker_id)
                self._sync_wake.set()
            return
        worker.version = written.version
        worker.registration = replace(registration, connected=False, since_unix_ms=now)
        self._mark_changed()

    def _session(self, token: int) -> _Session:
        session = self._sessions.get(token)
        if session is None:
            raise UnavailableError("this worker session has ended; register again")
        return session

    async def get_assignment(self, token: int, known_generation: int) -> tuple[Assignment, bool]:
        """The worker's assignment and whether it differs from
        ``known_generation`` (when it does not, ``vms`` is empty)."""
        self._require_running()
        session = self._session(token)
        worker_id = session.worker_id
        assignment = self._assignments.get(worker_id) or Assignment(worker_id, 0)
        if assignment.generation == known_generation:
            if session.held is None or session.held.generation < known_generation:
                # The worker holds this generation (from an earlier session,
                # or another master): later pushes may be its changes.
                _hold(session, await self._as_sent(assignment))
            return Assignment(worker_id, assignment.generation, (), assignment.op_id), False
        sent = await self._as_sent(assignment)
        _hold(session, sent)
        return sent, True

    async def _as_sent(self, assignment: Assignment) -> Assignment:
        """``assignment`` with its fence marks (``with_fence_marks``), from
        the rules stored as of this master's generation: those of its own
        last commit, or read once per generation caught up with (rules at
        least that new: they commit with it). When the store cannot be
        read, the rules read last."""
        assignment = await self._with_handoffs(assignment)
        generation = self._generation
        cached_at, rules = self._fence_rules
        if cached_at != generation:
            try:
                rules = (await self._store.placement()).unpinned
            except UnavailableError as exc:
                logger.warning("fence marks from the rules of generation %d: %s", cached_at, exc)
            else:
                self._fence_rules = (generation, rules)
        assignment = with_rollout(
            with_fence_marks(assignment, rules), await self._current_rollout()
        )
        return with_moves(
            assignment,
            await self._active_moves(),
            self._assignments,
            self._transfer_addresses(),
            {w.worker_id: w.status for w in self._workers.values()},
            tls_targets={
                w.worker_id
                for w in self._workers.values()
                if w.info is not None and w.info.transfer_tls
            },
        )

    def _transfer_addresses(self) -> dict[str, str]:
        """Each worker's transfer address, as it registered last."""
        return {
            w.worker_id: w.info.transfer_address
            for w in self._workers.values()
            if w.info is not None and w.info.transfer_address
        }

    async def _active_moves(self) -> tuple[Move, ...]:
        """The moves under way as of this master's generation (a move's
        phases that workers see begin with generations), read once per
        generation; when the store cannot be read, those read last."""
        generation = self._generation
        cached_at, moves = self._moves_cache
        if cached_at != generation:
            try:
                moves = tuple(m for m in await self._store.moves(limit=0) if not m.over)
            except UnavailableError as exc:
                logger.warning("the moves as of generation %d: %s", cached_at, exc)
            else:
                self._moves_cache = (generation, moves)
        return moves

    async def _current_rollout(self) -> Rollout | None:
        """The rollout under way as of this master's generation (every
        change of a rollout that workers see comes with a generation), read
        once per generation; when the store cannot be read, the one read
        last."""
        generation = self._generation
        cached_at, rollout = self._rollout_cache
        if cached_at != generation:
            try:
                rollout = await self._store.rollout()
            except UnavailableError as exc:
                logger.warning("the rollout as of generation %d: %s", cached_at, exc)
            else:
                self._rollout_cache = (generation, rollout)
        return rollout

    async def report_status(self, token: int, status: WorkerStatus) -> None:
        self._require_store()
        session = self._session(token)
        self._check_own(session, status.worker_id, "status")
        async with session.reporting:
            await self._vet_status(session, status)
            await self._store_status(session, status, None)

    async def report_status_changes(self, token: int, changes: StatusChanges) -> None:
        """Merge what changed into the status this session delivered last.
        Refused (``ValidationError``, or ``LimitExceededError`` when the
        merge would pass the per-worker VM limit) without touching the
        stored status; the worker then sends a full one."""
        self._require_store()
        logger.debug(
            "status changes from worker %s: generation %d, %d VM(s) changed",
            changes.worker_id,
            changes.observed_generation,
            len(changes.changed),
        )
        session = self._session(token)
        self._check_own(session, changes.worker_id, "status")
        async with session.reporting:
            if session.status is None:
                raise ValidationError(
                    "status changes before a full status on this session; send the full status"
                )
            base = session.status
            merged = session.merger.merge(base, changes)
            if len(merged.vms) > LIMITS.max_vms_per_worker:
                raise LimitExceededError(
                    f"status changes would make {len(merged.vms)} VMs, over the limit of "
                    f"{LIMITS.max_vms_per_worker} per worker"
                )
            await self._vet_status(session, merged, base, changes.changed)
            await self._store_status(session, merged, changes)

    async def _vet_status(
        self,
        session: _Session,
        status: WorkerStatus,
        base: WorkerStatus | None = None,
        changed: Sequence[VmStatus] = (),
    ) -> None:
        """Refuse ``status`` (whole, or merged from changes into ``base``)
        when the session's worker may not report it (``_status_problem``).

        A VM's verdict depends only on the worker's voice (replaced, never
        changed in place) and the observed generation. So when ``base`` is
        the status this session last vetted, against the voice the worker
        has now, and the changes keep its observed generation, only the
        ``changed`` entries are looked at: a burst's reports cost what they
        carry, not the worker's VMs."""
        worker_id = session.worker_id
        voice = self._voices.get(worker_id)
        observed = status.observed_generation
        vetted = session.vetted
        incremental = (
            base is not None
            and vetted is not None
            and vetted[0] is base
            and vetted[1] is voice
            and observed == base.observed_generation
        )

        def problem() -> ProcuratorError | None:
            # Looked at again after a catch-up, which may replace the voice.
            same = incremental and self._voices.get(worker_id) is voice
            return self._status_problem(worker_id, observed, changed if same else status.vms)

        session.vetted = None
        await self._vet(worker_id, "status", problem)
        if self._voices.get(worker_id) is voice:
            session.vetted = (status, voice)

    async def _vet(
        self, worker_id: str, what: str, problem_of: Callable[[], ProcuratorError | None]
    ) -> None:
        """Refuse a report whose ``problem_of()`` is not None (see "Who may
        report what"): logged and raised. A cache that is behind the store
        (an apply or a confirmation heard of only in part) is caught up
        first, so a report is refused only against what the store holds."""
        problem = problem_of()
        if problem is None:
            return
        if not self._store.single_master:
            await self._catch_up()
            self._absorb_worker(await self._store.worker(worker_id))
            problem = problem_of()
            if problem is None:
                return
        self._refused(worker_id, what, problem)

    def _status_problem(
        self, worker_id: str, observed: int, vms: Sequence[VmStatus]
    ) -> ProcuratorError | None:
        """Why ``worker_id`` may not report this status, or None."""
        assignment = self._assignments.get(worker_id)
        issued = assignment.generation if assignment is not None else 0
        voice = self._voices.get(worker_id) or _Voice()
        if observed > issued:
            return ValidationError(
                f"worker {worker_id} reports observed generation {observed}, which was never "
                f"issued to it (its assignment is at generation {issued})"
            )
        for vm in vms:
            if vm.id in voice.assigned:
                continue
            removed_by = voice.pending.get(vm.id)
            if removed_by is None:
                return UnauthorizedError(
                    f"worker {worker_id} reports VM {vm.id!r}, which is neither assigned to "
                    "it nor being removed from it"
                )
            if removed_by <= observed:
                return ValidationError(
                    f"worker {worker_id} reports VM {vm.id!r} with observed generation "
                    f"{observed}, but generation {removed_by} removed that VM from it"
                )
        return None

    def _unmentionable(self, worker_id: str, vm_ids: Sequence[str]) -> str | None:
        """The first of ``vm_ids`` that ``worker_id``'s events and metrics
        may not name, or None."""
        voice = self._voices.get(worker_id) or _Voice()
        now, grace, checked = self._now_ms(), self._report_grace_ms, ""
        for vm_id in vm_ids:
            # Samples come grouped by VM: each VM is checked once.
            if not vm_id or vm_id == checked:
                continue
            if not voice.may_mention(vm_id, now, grace):
                return vm_id
            checked = vm_id
        return None

    def _refused(self, worker_id: str, what: str, problem: ProcuratorError) -> NoReturn:
        logger.warning(
            "worker %s: refused its %s report: %s",
            worker_id,
            what,
            problem,
            extra={"worker_id": worker_id},
        )
        raise problem

    async def _restore_statuses(self) -> None:
        """The database is back: write again, whole, the status each session
        here delivered last (see "The database away"). The database may
        have come back without its last commits (status reports commit with
        ``synchronous_commit = off``; a failover may promote a replica that
        was behind), and a worker that sees its report acknowledged never
        sends it again. A write the store still holds changes nothing but
        the version; a session whose registration was lost ends (the worker
        registers again)."""
        for session in list(self._sessions.values()):
            try:
                async with session.reporting:  # not over a report's merge
                    if session.status is None or self._sessions.get(session.token) is not session:
                        continue
                    await self._store_status(session, session.status, None, restore=True)
            except UnavailableError as exc:
                if isinstance(exc, StoreUnavailableError):
                    raise
                # SessionEndedError (ended here by _store_status), or the
                # session ended meanwhile: the worker registers again.
        if self._sessions:
            logger.info("wrote again the status of %d worker(s) held here", len(self._sessions))

    async def _store_status(
        self,
        session: _Session,
        status: WorkerStatus,
        changes: StatusChanges | None,
        *,
        restore: bool = False,
    ) -> None:
        """Store the status (only what changed; the removals it confirms in
        the same transaction), then cache it. ``restore``: a status the
        store may have lost, written again; the removals it confirms are
        confirmed again (the confirmation may be what was lost)."""
        worker = self._worker(session.worker_id)
        observed = status.observed_generation
        now = self._now_ms()
        reported = worker.last_report_unix_ms if restore and worker.last_report_unix_ms else now
        voice = self._voices.get(session.worker_id)
        confirms = restore or (
            voice is not None and any(g <= observed for g in voice.pending.values())
        )
        write = StatusWrite(
            worker_id=session.worker_id,
            master_id=self.master_id,
            session=session.epoch,
            observed_generation=observed,
            reported_unix_ms=reported,
            upserts=status.vms if changes is None else changes.changed,
            deletes=() if changes is None else changes.removed,
            whole=changes is None,
            ack=RemovalAck(observed, now) if confirms else None,
            # Stored so that a leader on another master sees the prepare
            # phase's progress (its cache is built from the store), and a
            # move's transfers.
            prepared=status.prepared,
            transfers=status.transfers,
        )
        try:
            written = await self._store.write_status(write)
        except SessionEndedError:
            if self._sessions.get(session.token) is session:
                self._end_session(session, "the worker registered again elsewhere")
                self._close_soon(session)
            raise
        except UnavailableError as exc:
            self._set_unavailable_if_store(exc)
            raise
        if self._sessions.get(session.token) is not session:
            raise UnavailableError("this worker session has ended; register again")
        session.status = status
        before = worker.status.observed_generation if worker.status else 0
        if written.version > worker.version:
            if written.previous == worker.version:
                worker.version = written.version
            else:
                # Other writes came between the cached version and this
                # one (a lease expired, this session reclaimed, an apply's
                # removals): taking this version would hide them for good.
                # Read the worker whole instead.
                self._dirty_workers.add(worker.worker_id)
                self._sync_wake.set()
            worker.status = status
            worker.last_report_unix_ms = reported
            if status.transfers:
                # A move's side reported: the move duty may step at once
                # (a live move's guest is down until its switch).
                self._move_news.set()
            if confirms:
                # Recomputed after the await: an apply may have taken a VM
                # off again (its removal is pending at the new generation).
                confirmed = sorted(
                    vm_id
                    for vm_id, r in worker.removals.items()
                    if r.acked_unix_ms is None and r.generation <= observed
                )
                for vm_id in confirmed:
                    worker.removals[vm_id] = Removal(worker.removals[vm_id].generation, now)
                self._rebuild_voice(worker.worker_id)
                if confirmed:
                    with log_context(worker_id=worker.worker_id, generation=observed):
                        logger.info(
                            "worker %s confirmed the removal of %d VM(s): %s",
                            worker.worker_id,
                            len(confirmed),
                            some(confirmed),
                        )
            self._mark_changed()
        # Convergence is a worker reaching a newer generation. One that
        # comes back with nothing settled (restarted, or reconnecting before
        # it holds an assignment) reports 0, or less than before: that is
        # no convergence, and said as one it was noise in the log.
        if observed > before:
            assignment = self._assignments.get(worker.worker_id)
            op_id = assignment.op_id if assignment and assignment.generation == observed else ""
            with log_context(op_id=op_id, worker_id=worker.worker_id, generation=observed):
                logger.info("worker %s converged to generation %d", worker.worker_id, observed)

    async def report_metrics(self, token: int, report: MetricsReport) -> None:
        """Take a worker's metrics report, whole or a change against what
        this session's reports left (``apply_metrics_report``). A change
        this master cannot apply (no report of the session yet: the
        session's first, or this master restarted; series that do not fit)
        is refused with ``ValidationError`` and what it holds is kept: the
        worker then reports whole. A report whose vet waited on the store
        while its session ended is dropped (``UnavailableError``)."""
        self._require_running()
        session = self._session(token)
        worker_id = report.worker_id
        self._check_own(session, worker_id, "metrics")

        def problem() -> ProcuratorError | None:
            # What the report leaves held is vetted, as a whole report is: a
            # change's new or moved series, and the held series it neither
            # moves nor ends (the master relays them as the worker's now; a
            # VM moved away or removed past the grace is not). Ended series
            # need no voice: a VM just removed may end its series. A change
            # that ends nothing costs a set difference (C speed) with the
            # VMs assigned; one that ends some, O(series held).
            vm_ids = [sample.vm_id for sample in report.samples]
            held = session.metrics
            if not report.whole and held is not None:
                if report.ended:
                    ended = frozenset(report.ended)
                    vm_ids.extend({key[1] for key in held if key not in ended})
                else:
                    voice = self._voices.get(worker_id) or _Voice()
                    vm_ids.extend(session.metric_vms - voice.assigned)
            vm_id = self._unmentionable(worker_id, vm_ids)
            if vm_id is None:
                return None
            return UnauthorizedError(
                f"worker {worker_id} reports metrics of VM {vm_id!r}, which is neither "
                "assigned to it nor was lately removed from it"
            )

        await self._vet(worker_id, "metrics", problem)
        if self._sessions.get(token) is not session:
            # The vet waited on the store and the worker registered again
            # meanwhile: this report is of an ended session, and what it
            # would leave must not go over the new session's.
            raise UnavailableError("this worker session has ended; register again")
        started = time.perf_counter()
        count = -1 if session.metrics is None else len(session.metrics)
        held = apply_metrics_report(session.metrics, report)
        session.metrics = held
        if report.whole or report.ended:
            # Series ended or were replaced: their VMs anew, O(series).
            session.metric_vms = frozenset(key[1] for key in held)
        elif len(held) != count:
            # A change that ends none and added series (a big report's later
            # slices): their VMs join, O(VMs + the change), not O(series).
            session.metric_vms = session.metric_vms.union(s.vm_id for s in report.samples)
        worker = self._worker(session.worker_id)
        worker.metrics_applied(held)
        worker.last_metrics_unix_ms = self._now_ms()
        logger.debug(
            "metrics report of worker %s applied (%s): %d series carried, %d ended, "
            "%d held, %.1f ms",
            worker_id,
            "whole" if report.whole else "change",
            len(report.samples),
            len(report.ended),
            len(held),
            (time.perf_counter() - started) * 1000,
        )

    async def report_events(self, token: int, events: Sequence[VmEvent]) -> None:
        self._require_store()
        worker_id = self._session(token).worker_id

        def problem() -> ProcuratorError | None:
            vm_id = self._unmentionable(worker_id, [event.vm_id for event in events])
            if vm_id is None:
                return None
            return UnauthorizedError(
                f"worker {worker_id} reports an event of VM {vm_id!r}, which is neither "
                f"assigned to it nor was lately removed from it; none of the {len(events)} "
                "event(s) was stored"
            )

        await self._vet(worker_id, "events", problem)
        if not events:
            return
        try:
            await self._add_events([(worker_id, events)])
        except UnavailableError as exc:
            self._set_unavailable_if_store(exc)
            raise
        for event in events:
            with log_context(op_id=event.op_id, worker_id=worker_id, vm_id=event.vm_id):
                logger.info("VM %s %s: %s", event.vm_id, event.kind.value, event.message)

    async def report_status_and_events(
        self, token: int, changes: StatusChanges, events: Sequence[VmEvent]
    ) -> ProcuratorError | None:
        """``report_status_changes`` then ``report_events``, as one call
        (``WorkerSession.reportStatusAndEvents``): raises what the first
        raises (the events are then not looked at); answers what the second
        raises (the events' own answer; a bug in it as ``internal``, logged
        here with its op id), or None."""
        await self.report_status_changes(token, changes)
        try:
            await self.report_events(token, events)
        except ProcuratorError as exc:
            return exc
        except Exception:  # a bug: the status part stands, so it is the events' answer
            error = ProcuratorError(
                "reportStatusAndEvents: events: internal error; see the master's log"
            )
            error.op_id = new_op_id()
            with log_context(op_id=error.op_id, worker_id=changes.worker_id):
                logger.exception("the events of a combined report failed unexpectedly")
            return error
        return None

    async def _record_moves(self, op_id: str, placed: Sequence[VmPlacement]) -> None:
        """A ``rescheduled`` event per VM an apply (or a heal) moved, under
        its new worker. The move is committed whatever becomes of these: a
        store away loses them (logged), as it would a worker's report."""
        by_worker: dict[str, list[VmEvent]] = {}
        now = self._now_ms()
        for vm in placed:
            if vm.moved:
                why = f"{vm.reason.value}: {vm.detail}" if vm.detail else vm.reason.value
                by_worker.setdefault(vm.worker_id, []).append(
                    VmEvent(
                        vm.vm_id,
                        EventKind.RESCHEDULED,
                        f"moved from {vm.previous_worker} to {vm.worker_id} ({why})",
                        op_id,
                        now,
                    )
                )
        try:
            await self._add_events(sorted(by_worker.items()))
        except UnavailableError as exc:
            logger.warning("apply %s: the moves' events were not stored: %s", op_id, exc)

    async def _add_events(self, batches: Iterable[tuple[str, Sequence[VmEvent]]]) -> None:
        """Store each batch of events (worker id, its events), and have the
        rings up to them.

        On a store only this master writes (``single_master``: SQLite) the
        events just stored are the only ones after the cursor, with the seqs
        the store minted for them (``Store.add_events``), so they go into
        the rings as written, not read back: that read was a second store
        call per events report (issue 31, docs/BENCHMARKS.md). The rings
        stay bounded as the store is, not a copy of it: a report with more
        events of one VM than the store keeps of it shows them all in the
        fleet-wide ring, as the same events sent in several reports always
        did. The event lock, held over the writes, keeps the rings in the
        store's order. A write that failed may still have committed (an
        error after the commit): the next write, under the same lock, reads
        back what came after the cursor, so those events are not skipped.
        Elsewhere other masters may have stored events meanwhile: they are
        read with ours, once after all the batches."""
        batches = [(worker_id, events) for worker_id, events in batches if events]
        if not batches:
            return
        if not self._store.single_master:
            for worker_id, events in batches:
                await self._store.add_events(
                    worker_id, events, per_vm=self._events_per_vm, total=self._events_total
                )
            await self._pull_events()
            return
        async with self._events_lock:
            for worker_id, events in batches:
                await self._add_own_events_locked(worker_id, events)

    async def _add_own_events_locked(self, worker_id: str, events: Sequence[VmEvent]) -> None:
        """``_add_events`` of one batch on a store only this master writes,
        the event lock held."""
        unsure = self._events_unsure
        try:
            last = await self._store.add_events(
                worker_id, events, per_vm=self._events_per_vm, total=self._events_total
            )
        except BaseException:
            self._events_unsure = True
            raise
        if unsure:
            await self._pull_locked()
            self._events_unsure = False
            return
        first = last - len(events) + 1
        if first <= self._event_cursor:
            # Seqs grow with the database's clock and each write's count:
            # only a store replaced under this master (an older copy) gives
            # seqs at or below one already seen.
            logger.warning(
                "events stored at seqs %d-%d, at or below the newest this master has seen "
                "(%d): the store's seqs went back; they show after the master restarts",
                first,
                last,
                self._event_cursor,
            )
            return
        for offset, event in enumerate(events):
            self._remember_event(WorkerEvent(worker_id, event, first + offset))
        self._event_cursor = last
        self._mark_changed()

    async def _pull_events(self) -> None:
        """Every event stored after the cursor, in seq order, into the rings."""
        async with self._events_lock:
            await self._pull_locked()

    async def _pull_locked(self) -> None:
        """``_pull_events`` with the event lock held."""
        while True:
            page = await self._store.events_since(self._event_cursor, _EVENTS_PAGE)
            for item in page:
                self._remember_event(item)
                self._event_cursor = item.seq
            if page:
                self._mark_changed()
            if len(page) < _EVENTS_PAGE:
                return

    def _remember_event(self, item: WorkerEvent) -> None:
        if len(self._events) == self._events.maxlen:
            # The fleet-wide bound holds for the per-VM rings too: the
            # oldest event leaves its VM's ring with the fleet's (it is
            # that ring's oldest: both are in seq order).
            oldest = self._events[0]
            old_ring = self._vm_events.get(oldest.event.vm_id)
            if old_ring and old_ring[0] is oldest:
                old_ring.popleft()
                if not old_ring:
                    del self._vm_events[oldest.event.vm_id]
        self._events.append(item)
        vm_id = item.event.vm_id
        ring = self._vm_events.pop(vm_id, None)
        if ring is None:
            ring = collections.deque(maxlen=self._events_per_vm)
            if len(self._vm_events) >= self._max_vm_event_keys:
                # Forget the VM whose events are the stalest.
                del self._vm_events[next(iter(self._vm_events))]
        ring.append(item)
        self._vm_events[vm_id] = ring  # re-inserted: newest last

    @staticmethod
    def _check_own(session: _Session, worker_id: str, what: str) -> None:
        if worker_id != session.worker_id:
            raise UnauthorizedError(
                f"the session of worker {session.worker_id!r} cannot report {what} for "
                f"worker {worker_id!r}"
            )

    # ------------------------------------------------------------ leases

    async def _renew_forever(self) -> None:
        while True:
            await self._read_renewals()
            await trio.sleep(self._worker_lease / 3)
            try:
                await self._renew()
            except UnavailableError as exc:
                logger.info("could not renew the workers' leases: %s", exc)

    async def _read_renewals(self) -> None:
        """When every worker's lease was last renewed (any master's
        renewals: they do not move a worker's version, so no cache has
        them), for ``status``; read with the database's clock, so "how
        long ago" knows no skew between clocks. Once per renewal period:
        a status read stays free of I/O."""
        try:
            db_now_ms, renewals = await self._store.lease_renewals()
        except UnavailableError as exc:
            logger.debug("the leases' renewals were not read: %s", exc)
            return
        self._renewals = (trio.current_time(), db_now_ms, renewals)

    async def _renew(self) -> None:
        """Renew the leases of the sessions held here; end here the ones
        another master took over; end in the store the ones that ended here
        without the store hearing of it."""
        async with self._sessions_lock:
            held = await self._store.renew_sessions(self.master_id, lease_ms=self._lease_ms)
            local = {s.worker_id: s for s in self._sessions.values()}
            for worker_id, session in local.items():
                if held.get(worker_id) == session.epoch:
                    continue
                version = await self._store.reclaim_session(
                    worker_id,
                    self.master_id,
                    session.epoch,
                    unix_ms=self._now_ms(),
                    lease_ms=self._lease_ms,
                )
                if version is not None:
                    logger.info("worker %s: its session here is live again", worker_id)
                elif self._sessions.get(session.token) is session:
                    # Taken over (or ended) while this master was not told.
                    self._end_session(session, "the store no longer holds this session")
                    self._close_soon(session)
                self._dirty_workers.add(worker_id)
            for worker_id, epoch in held.items():
                mine = local.get(worker_id)
                if mine is None or mine.epoch != epoch:
                    await self._store.unregister(
                        worker_id, self.master_id, epoch, unix_ms=self._now_ms()
                    )
                    self._dirty_workers.add(worker_id)
        self._sync_wake.set()

    def _lost(self, worker: _Worker, now_ms: int) -> bool:
        """Is ``worker`` lost (``procurator.master.scheduling.is_lost``)?"""
        return is_lost(
            worker.registration, now_ms, lease_ms=self._lease_ms, up_since_ms=self._up_since_ms
        )

    async def _heal(self, fence: Fence) -> None:
        """Singleton duty: a lost worker's ``reschedule`` VMs are placed on
        other workers, as a new generation committed under ``fence``."""
        now_ms = self._now_ms()
        lost = [
            w.worker_id
            for w in self._workers.values()
            if self._lost(w, now_ms) and self._assignments.get(w.worker_id, _NO_ASSIGNMENT).vms
        ]
        if not lost:
            return
        # What the last heal that moved nothing saw: look again only when
        # something changed (the fleet, or the workers lost or connected).
        seen = (
            tuple(sorted(lost)),
            self._generation,
            tuple(sorted(w.worker_id for w in self._workers.values() if w.connected)),
        )
        if seen == self._unmovable:
            return
        rules = (await self._store.placement()).unpinned
        movable = [
            vm.id
            for worker_id in lost
            for vm in self._assignments[worker_id].vms
            if vm.id in rules and rules[vm.id].on_worker_lost is OnWorkerLost.RESCHEDULE
        ]
        if not movable:
            self._unmovable = seen
            return
        op_id = new_op_id()
        with log_context(op_id=op_id):
            logger.warning(
                "healing: %d VM(s) of lost worker(s) %s to place elsewhere: %s",
                len(movable),
                ", ".join(sorted(lost)),
                some(movable),
            )
            result = await self._apply(Fleet(), None, False, op_id, "", heal=fence)
        self._unmovable = () if result.changed else seen

    async def _drive_rollout(self, fence: Fence) -> None:
        """Singleton duty: the next step of the rollout under way
        (``procurator.master.rollout``), committed under ``fence``."""
        rollout = await self._store.rollout()
        if rollout is None:
            return
        workers = {vm.worker_id for vm in rollout.vms} | {w for w, _ in rollout.prepare}
        assigned: dict[str, VmAssignment] = {}
        statuses: dict[str, WorkerStatus] = {}
        for worker_id in workers:
            assignment = self._assignments.get(worker_id)
            if assignment is not None:
                assigned.update((vm.id, vm) for vm in assignment.vms)
            worker = self._workers.get(worker_id)
            if worker is not None and worker.status is not None:
                statuses[worker_id] = worker.status
        answer = rollout_step(rollout, assigned, statuses, self._now_ms())
        after = answer.rollout
        wanted = {vm_id: e for vm_id, e in answer.want.items() if assigned.get(vm_id) != e}
        with log_context(op_id=rollout.op_id):
            for note in answer.notes:
                logger.info("%s", note)
        try:
            if wanted or (after.over and not rollout.over and rollout.prepare):
                # The last generation of a rollout drops its images to prepare.
                touch = workers if after.over else set()
                await self._commit_rollout(fence, rollout, after, wanted, touch)
            elif after != rollout:
                await self._store.put_rollout(after, fence=fence, before=rollout)
                self._rollout_cache = (self._generation, after)
        except RolloutChangedError as exc:
            logger.info("rollout %s: %s; the next step reads it again", rollout.id, exc)

    async def _commit_rollout(
        self,
        fence: Fence,
        before_step: Rollout,
        rollout: Rollout,
        wanted: Mapping[str, VmAssignment],
        touch: set[str],
    ) -> None:
        """Commit ``wanted`` (VM id -> entry) with ``rollout``'s new state,
        one generation fenced by ``fence``, and push the workers concerned
        (those of ``touch`` too). A revert's op id is in an event of each VM
        it restores, with its cause."""
        op_id = new_op_id()
        reverting = rollout.phase in (RolloutPhase.REVERTING, RolloutPhase.REVERTED)
        on = {vm.vm_id: vm.worker_id for vm in rollout.vms}
        with log_context(op_id=op_id):
            async with self._apply_lock:
                await self._refresh_fleet()
                names = sorted({on[vm_id] for vm_id in wanted} | touch)
                before = {w: self._assignments[w].vms for w in names if w in self._assignments}
                changes = {
                    w: tuple(wanted.get(vm.id, vm) for vm in before.get(w, ())) for w in names
                }
                diffs = [diff_assignments(w, before.get(w, ()), changes[w]) for w in names]
                try:
                    generation = await self._store.commit(
                        expected_generation=self._generation,
                        changes=changes,
                        before=before,
                        op_id=op_id,
                        unix_ms=self._now_ms(),
                        fence=fence,
                        rollout=rollout,
                        rollout_before=before_step,
                    )
                except StaleGenerationError as exc:
                    logger.info("rollout %s: %s; the next step tries again", rollout.id, exc)
                    return
                self._absorb_commit(generation, changes, diffs, op_id)
                self._rollout_cache = (generation, rollout)
            what = (
                f"reverts {len(wanted)} VM(s) of rollout {rollout.id} (apply {rollout.op_id}) "
                f"to their previous images: {rollout.reason}"
                if reverting
                else f"rollout {rollout.id} (apply {rollout.op_id}): batch {rollout.batches}, "
                f"{len(wanted)} VM(s) switch"
            )
            logger.log(logging.WARNING if reverting else logging.INFO, "%s", what)
            with log_context(generation=generation):
                self._push_diffs(diffs, generation)
            if reverting and before_step.phase is not rollout.phase:
                await self._record_rollout_events(op_id, what, on, sorted(wanted))

    async def _record_rollout_events(
        self, op_id: str, message: str, on: Mapping[str, str], vm_ids: Sequence[str]
    ) -> None:
        """A warning event per VM, under its worker, with ``op_id``."""
        now = self._now_ms()
        by_worker: dict[str, list[VmEvent]] = {}
        for vm_id in sorted(vm_ids):
            by_worker.setdefault(on[vm_id], []).append(
                VmEvent(vm_id, EventKind.WARNING, message, op_id, now)
            )
        try:
            await self._add_events(sorted(by_worker.items()))
        except UnavailableError as exc:
            logger.warning("%s: the events were not stored: %s", op_id, exc)

    async def rollout(self, rollout_id: str, action: RolloutAction) -> RolloutView:
        """``procurator rollout``: show or act on ``rollout_id`` ("": the
        one under way, else the newest). The action is written over the
        state it was decided on (``put_rollout(before=...)``), so it never
        undoes the leader's step, nor the leader it; the leader's next step
        carries it out. ``NotFoundError`` when there is no such rollout."""
        self._require_store()
        for _ in range(_APPLY_ATTEMPTS):
            try:
                current = await self._store.rollout(rollout_id)
                if current is None and not rollout_id:
                    newest = await self._store.rollouts(1)
                    current = newest[0] if newest else None
                if current is None:
                    raise NotFoundError(
                        f"no rollout {rollout_id}" if rollout_id else "no rollout yet"
                    )
                after, message = act(current, action)
                if after != current:
                    await self._store.put_rollout(after, before=current)
            except RolloutChangedError:
                continue
            except UnavailableError as exc:
                self._set_unavailable_if_store(exc)
                raise
            if message:
                logger.info("%s", message, extra={"op_id": current.op_id})
            return view(after, self._reported_statuses(), message)
        raise UnavailableError(
            f"rollout {rollout_id or '(current)'} kept changing while this {action.value} was "
            "written; try again"
        )

    # ------------------------------------------------------------ moves

    async def move(
        self,
        vm_id: str,
        target: str,
        *,
        kind: MoveKind = MoveKind.COLD,
        timeout_s: int = DEFAULT_MOVE_TIMEOUT_S,
    ) -> Move:
        """``procurator move``: record a move of ``vm_id`` to worker
        ``target`` (``pending``); the leader's move duty drives it
        (``procurator.core.move``). Refused with ``ValidationError`` naming
        why (``check_move``), ``NotFoundError`` for a VM not in the fleet."""
        self._require_store()
        op_id = new_op_id()
        with log_context(op_id=op_id, vm_id=vm_id):
            try:
                async with self._apply_lock:
                    await self._refresh_fleet()
                    await self._load_handoffs()
                    now_ms = self._now_ms()
                    worker = self._workers.get(target)
                    known = [
                        KnownWorker(w.worker_id, w.info, w.connected, self._lost(w, now_ms), w.mode)
                        for w in self._workers.values()
                    ]
                    under_way = await self._store.moves(limit=0)
                    facts = {
                        f.worker_id: f
                        for f in worker_facts(known, self._assignments, moves=under_way)
                    }
                    if worker is not None and self._lost(worker, now_ms):
                        state: WorkerState | None = WorkerState.LOST
                    elif worker is not None and worker.mode is not None:
                        state = worker.mode.state
                    elif worker is not None or target in self._assignments:
                        state = WorkerState.READY
                    else:
                        state = None
                    rollout = await self._current_rollout()
                    moving = {m.vm_id: m.op_id for m in under_way if not m.over}
                    on_target = self._assignments.get(target, _NO_ASSIGNMENT).vms
                    source_vm = next(
                        (v for a in self._assignments.values() for v in a.vms if v.id == vm_id),
                        None,
                    )
                    answer = check_move(
                        vm_id,
                        target,
                        kind=kind,
                        assignments=self._assignments,
                        target_state=state,
                        target_connected=worker is not None and worker.connected,
                        target_transfers=bool(
                            worker is not None
                            and worker.info is not None
                            and worker.info.transfer_address
                        ),
                        moving=moving,
                        handed_off=self._handoffs,
                        in_rollout=(
                            [v.vm_id for v in rollout.vms]
                            if rollout is not None and not rollout.over
                            else []
                        ),
                        target_shortfall=(
                            shortfall(source_vm, facts[target], on_target)
                            if source_vm is not None and target in facts
                            else None
                        ),
                        constraints=(
                            rules.constraints
                            if (rules := (await self._store.placement()).unpinned.get(vm_id))
                            else ()
                        ),
                        target_labels=facts[target].labels if target in facts else (),
                        vmms={
                            w.worker_id: (w.info.driver, w.info.live_moves)
                            for w in self._workers.values()
                            if w.info is not None
                        },
                    )
                    if isinstance(answer, str):
                        if source_vm is None:
                            raise NotFoundError(f"{answer}; nothing was changed", op_id=op_id)
                        raise ValidationError(f"{answer}; nothing was changed", op_id=op_id)
                    source, vm = answer
                    move = Move(
                        vm_id,
                        source,
                        target,
                        kind,
                        MovePhase.PENDING,
                        op_id,
                        now_ms,
                        now_ms + timeout_s * 1000,
                        vm.power,
                        updated_unix_ms=now_ms,
                        image=vm.nix_store_path,
                    )
                    await self._store.start_move(move)
            except UnavailableError as exc:
                self._set_unavailable_if_store(exc)
                raise
            logger.info(
                "move %s of VM %s from %s to %s (%s) recorded",
                op_id,
                vm_id,
                source,
                target,
                kind.value,
            )
        return move

    async def moves(self, vm_id: str = "") -> tuple[Move, ...]:
        """``procurator moves``: the moves under way and the newest over
        (of one VM when ``vm_id`` is given), newest first."""
        self._require_store()
        try:
            moves = await self._store.moves(vm_id or None)
        except UnavailableError as exc:
            self._set_unavailable_if_store(exc)
            raise
        statuses = {w.worker_id: w.status for w in self._workers.values()}
        return tuple(
            replace(m, progress=transfer_progress(m, statuses))
            if m.phase in (MovePhase.TRANSFERRING, MovePhase.MIGRATING, MovePhase.CANCELLING)
            else m
            for m in moves
        )

    async def _drive_moves(self, fence: Fence) -> None:
        """Singleton duty: the next step of every move under way
        (``procurator.core.move.step``, ``procurator.master.move``), each
        a generation (or a row) fenced by ``fence``. While a live move
        migrates, each report of a move's side (``_move_news``) steps them
        again at once, for up to the duty's interval: the guest is down
        from the source's last pause until the switch."""
        with trio.move_on_after(0.5):
            while True:
                self._move_news = trio.Event()
                driven = await self._drive_moves_once(fence)
                if not any(
                    m.kind is MoveKind.LIVE
                    and m.phase in (MovePhase.MIGRATING, MovePhase.CANCELLING)
                    for m in driven
                ):
                    return
                await self._move_news.wait()

    async def _drive_moves_once(self, fence: Fence) -> list[Move]:
        under_way = [m for m in await self._store.moves(limit=0) if not m.over]
        driven = []
        for move in under_way:
            after = move
            with log_context(op_id=move.op_id, vm_id=move.vm_id):
                try:
                    after = await self._step_move(fence, move)
                except StaleGenerationError as exc:
                    logger.info("move %s: %s; the next pass tries again", move.op_id, exc)
            if not after.over:
                driven.append(after)
        # What the exporter shows (fleet_view), while this master leads.
        self._moves_driven = (fence, tuple(driven))
        return driven

    async def _target_shortfall(self, move: Move, now_ms: int) -> str | None:
        """Why the pending ``move``'s VM does not fit on its target now,
        beside the target's VMs and the moves ahead of it
        (``procurator.core.move.ahead_of``): its refusal may have raced
        another master's move or apply. None: it fits, or the VM left its
        source (``step`` says so). Under ``_apply_lock``."""
        source = self._assignments.get(move.source, _NO_ASSIGNMENT)
        vm = next((v for v in source.vms if v.id == move.vm_id), None)
        if vm is None:
            return None
        known = [
            KnownWorker(w.worker_id, w.info, w.connected, self._lost(w, now_ms), w.mode)
            for w in self._workers.values()
        ]
        ahead = ahead_of(move, await self._store.moves(limit=0))
        facts = {f.worker_id: f for f in worker_facts(known, self._assignments, moves=ahead)}
        if move.target not in facts:
            return None
        on_target = self._assignments.get(move.target, _NO_ASSIGNMENT).vms
        return shortfall(vm, facts[move.target], on_target)

    async def _step_move(self, fence: Fence, move: Move) -> Move:
        """One step of ``move``; the move as it is after it."""
        async with self._apply_lock:
            await self._refresh_fleet()
            now_ms = self._now_ms()
            lost = [w.worker_id for w in self._workers.values() if self._lost(w, now_ms)]
            statuses = {w.worker_id: w.status for w in self._workers.values()}
            target = self._workers.get(move.target)
            target_info = target.info if target is not None else None
            step = move_step(
                move,
                assignments=self._assignments,
                statuses=statuses,
                lost=lost,
                now_ms=now_ms,
                # Whether its "received" completes a live move is the driver's.
                target_driver=target_info.driver if target_info is not None else "",
                target_shortfall=(
                    await self._target_shortfall(move, now_ms)
                    if move.phase is MovePhase.PENDING
                    else None
                ),
            )
            # A cold move's token begins with its transfer, a live one's
            # with its prepare (the target's incoming VMM checks it).
            begins = (MoveAction.TRANSFER, MoveAction.PREPARE)
            token = secrets.token_hex(16) if step.action in begins else ""
            plan = plan_move(move, step, self._assignments, now_ms=now_ms, token=token)
            if plan is None:
                return move
            if not plan.changes:
                # A move off a draining worker counts in the drain's
                # progress in the transaction that ends it done: a drain
                # pass in between would see no move under way, the worker
                # empty, and end the drain without it.
                drained = self._workers.get(move.source)
                mode = drained.mode if drained is not None else None
                drain = (
                    mode.op_id
                    if step.action is MoveAction.DONE
                    and mode is not None
                    and mode.state is WorkerState.DRAINING
                    and move.started_unix_ms >= mode.since_unix_ms
                    else ""
                )
                await self._store.put_move(fence, plan.move, move, drain=drain)
                if drain:
                    self._dirty_workers.add(move.source)
                    self._sync_wake.set()
                generation = self._generation
                diffs: list[WorkerDiff] = []
                after = plan.move
            else:
                names = sorted(plan.changes)
                before = {w: self._assignments[w].vms for w in names if w in self._assignments}
                generation = await self._store.commit_move(
                    fence=fence,
                    expected_generation=self._generation,
                    changes=plan.changes,
                    before=before,
                    unix_ms=now_ms,
                    move=plan.move,
                    move_before=move,
                )
                diffs = [diff_assignments(w, before.get(w, ()), plan.changes[w]) for w in names]
                self._absorb_commit(generation, plan.changes, diffs, move.op_id)
                after = replace(plan.move, generation=generation)
            cached_at, moves = self._moves_cache
            if cached_at == generation:
                # Carried over by _absorb_commit: this move's new phase, also
                # one that writes the row only (a move over after its switch
                # no longer sends the target its transfer).
                others = tuple(m for m in moves if m.op_id != move.op_id)
                self._moves_cache = (generation, others if after.over else (*others, after))
        failed = step.action is MoveAction.FAIL
        logger.log(logging.WARNING if failed else logging.INFO, "%s", plan.message)
        if diffs:
            with log_context(generation=generation):
                self._push_diffs(diffs, generation)
        # One event per phase, under the worker that holds the VM now.
        holder = move.target if plan.move.switched else move.source
        event = VmEvent(move.vm_id, EventKind.MOVING, plan.message, move.op_id, now_ms)
        try:
            await self._add_events([(holder, [event])])
        except UnavailableError as exc:
            logger.warning("move %s: the event was not stored: %s", move.op_id, exc)
        return replace(plan.move, generation=generation) if diffs else plan.move

    # ------------------------------------------------------------ drains, handoffs

    async def _load_handoffs(self) -> None:
        """The handoffs as of this master's generation (they start and end
        with a generation: read once per generation). With a store of one
        master, only this master writes them: read once, at start."""
        at = self._generation
        if self._handoffs_at == at or (self._store.single_master and self._handoffs_at >= 0):
            return
        found = await self._store.handoffs()
        touched = {h.target for h in (*self._handoffs.values(), *found.values())}
        self._handoffs, self._handoffs_at = found, at
        for worker_id in touched:
            self._rebuild_voice(worker_id)

    async def _with_handoffs(self, assignment: Assignment) -> Assignment:
        """``assignment`` as its worker is sent it: with the VMs handed off
        to it (as their source's assignment has them), so it runs them
        beside their source until the handoff completes."""
        try:
            await self._load_handoffs()
        except UnavailableError as exc:
            logger.warning("handoffs as of generation %d: %s", self._handoffs_at, exc)
        worker_id = assignment.worker_id
        own = {vm.id for vm in assignment.vms}
        extra = []
        for h in self._handoffs.values():
            if h.target != worker_id or h.vm_id in own:
                continue
            source = self._assignments.get(h.source, _NO_ASSIGNMENT)
            vm = next((v for v in source.vms if v.id == h.vm_id), None)
            if vm is not None:
                extra.append(vm)
        if not extra:
            return assignment
        vms = tuple(sorted((*assignment.vms, *extra), key=lambda v: v.id))
        return replace(assignment, vms=vms)

    async def _drain(self, fence: Fence) -> None:
        """Singleton duty: drive every drain (``procurator.master.drain``):
        complete, call off and start handoffs, one generation per drain op
        id, fenced by ``fence``; record blocked and finished drains."""
        if not self._handoffs and not any(
            w.mode is not None and w.mode.state is WorkerState.DRAINING
            for w in self._workers.values()
        ):
            return
        moved: list[tuple[str, list[VmPlacement]]] = []
        async with self._apply_lock:
            await self._refresh_fleet()
            await self._load_handoffs()
            now_ms = self._now_ms()
            known = [
                KnownWorker(w.worker_id, w.info, w.connected, self._lost(w, now_ms), w.mode)
                for w in self._workers.values()
            ]
            record = await self._store.placement()
            kept_moves = await self._store.moves(limit=MOVES_KEPT)
            under_way = [m for m in kept_moves if not m.over]
            # In flight for a drain: beside its handoffs and the VMs not
            # yet confirmed stopped, the moves under way off its worker.
            stopping = {w: len(v.pending) for w, v in self._voices.items() if v.pending}
            for m in under_way:
                stopping[m.source] = stopping.get(m.source, 0) + 1
            modes = {w.worker_id: w.mode for w in self._workers.values() if w.mode}
            plan = plan_drains(
                assignments=self._assignments,
                modes=modes,
                statuses={w.worker_id: w.status for w in self._workers.values()},
                handoffs=self._handoffs.values(),
                facts=worker_facts(known, self._assignments, moves=under_way, drain=True),
                record=record,
                now_ms=now_ms,
                stopping=stopping,
            )
            # A moving VM is the move's: no handoff starts for it (it would
            # run on the handoff's target beside the move's); the drain
            # goes on once the move has taken it off the drained worker.
            moving = {m.vm_id for m in under_way}
            plan.start = [h for h in plan.start if h.vm_id not in moving]
            # A drain is not over while a move off its worker is (its VM
            # left the worker's assignment at the switch; the move counts
            # in the drain's progress once done).
            plan.finished = [w for w in plan.finished if w not in {m.source for m in under_way}]
            # Live moves where both ends can (they never run the VM twice),
            # handoffs for the rest.
            live, plan.start = live_or_handoff(
                plan.start,
                modes=modes,
                moves=kept_moves,
                vmms={
                    w.worker_id: (w.info.driver, w.info.live_moves)
                    for w in self._workers.values()
                    if w.info is not None
                },
                transfers=self._transfer_addresses(),
            )
            # A target away for now (restarting, say) is waited for: moved
            # live once it is back, rather than handed off meanwhile.
            live = [h for h in live if (t := self._workers.get(h.target)) and t.connected]
            by_op: dict[str, tuple[list[Handoff], list[Handoff], list[Handoff]]] = {}
            for bucket, handoffs in enumerate((plan.complete, plan.cancel, plan.start)):
                for h in handoffs:
                    by_op.setdefault(h.op_id, ([], [], []))[bucket].append(h)
            for op_id, (complete, cancel, start) in sorted(by_op.items()):
                with log_context(op_id=op_id):
                    await self._commit_handoffs(fence, op_id, complete, cancel, start)
                moved.append(
                    (
                        op_id,
                        [
                            VmPlacement(
                                h.vm_id, h.target, PlacementReason.WORKER_DRAINING, h.source
                            )
                            for h in complete
                        ],
                    )
                )
        for op_id, placed in moved:
            await self._record_moves(op_id, placed)
        for h in live:
            await self._drain_by_move(h)
        for worker_id, why in sorted(plan.blocked.items()):
            await self._update_drain(fence, worker_id, blocked=why)
        for worker_id in plan.finished:
            await self._update_drain(fence, worker_id, finished=True)

    async def _drain_by_move(self, h: Handoff) -> None:
        """Start a live move of ``h``'s VM for its drain (as ``procurator
        move --live``; its refusals apply). Refused, the VM goes by a
        handoff from the next pass on (a failed live move of it in this
        drain says so)."""
        with log_context(op_id=h.op_id, vm_id=h.vm_id):
            try:
                move = await self.move(h.vm_id, h.target, kind=MoveKind.LIVE)
            except (ValidationError, NotFoundError) as exc:
                logger.warning("drain %s: VM %s not moved live: %s", h.op_id, h.vm_id, exc)
                now_ms = self._now_ms()
                refused = Move(
                    h.vm_id,
                    h.source,
                    h.target,
                    MoveKind.LIVE,
                    MovePhase.FAILED,
                    new_op_id(),
                    now_ms,
                    now_ms,
                    updated_unix_ms=now_ms,
                    reason=f"drain {h.op_id}: {exc.message}",
                )
                with contextlib.suppress(ProcuratorError):
                    await self._store.start_move(refused)
                return
            logger.info(
                "drain %s: VM %s moves live %s -> %s (move %s)",
                h.op_id,
                h.vm_id,
                h.source,
                h.target,
                move.op_id,
            )

    async def _update_drain(
        self, fence: Fence, worker_id: str, *, blocked: str = "", finished: bool = False
    ) -> None:
        worker = self._workers.get(worker_id)
        if worker is None or worker.mode is None:
            return
        op_id = worker.mode.op_id
        if await self._store.update_drain(
            fence, worker_id, op_id, blocked=blocked, finished=finished
        ):
            with log_context(op_id=op_id, worker_id=worker_id):
                if finished:
                    logger.warning(
                        "drain %s of worker %s is done: %d VM(s) moved; it stays cordoned",
                        op_id,
                        worker_id,
                        worker.mode.moved,
                    )
                elif blocked:
                    logger.warning(
                        "drain %s of worker %s cannot go on: %s", op_id, worker_id, blocked
                    )
                else:
                    logger.info("drain %s of worker %s goes on", op_id, worker_id)
        self._dirty_workers.add(worker_id)
        self._sync_wake.set()

    async def _commit_handoffs(
        self,
        fence: Fence,
        op_id: str,
        complete: Sequence[Handoff],
        cancel: Sequence[Handoff],
        start: Sequence[Handoff],
    ) -> None:
        """One generation (under ``_apply_lock``, fenced): the handoffs of
        drain ``op_id`` that complete (their VM moves to its target),
        are called off and start; then the caches and pushes follow."""
        current = {w: list(a.vms) for w, a in self._assignments.items()}
        changes: dict[str, list[VmAssignment]] = {}
        for h in complete:
            source = changes.setdefault(h.source, list(current.get(h.source, ())))
            vm = next(v for v in source if v.id == h.vm_id)
            source.remove(vm)
            target = changes.setdefault(h.target, list(current.get(h.target, ())))
            target.append(vm)
        for h in (*cancel, *start):
            # The target hears of it with a new generation of its own.
            changes.setdefault(h.target, list(current.get(h.target, ())))
        for vms in changes.values():
            vms.sort(key=lambda v: v.id)
        before = {w: current[w] for w in changes if w in current}
        generation = await self._store.commit_handoffs(
            fence=fence,
            expected_generation=self._generation,
            changes=changes,
            before=before,
            op_id=op_id,
            unix_ms=self._now_ms(),
            start=start,
            end=complete,
            cancel=cancel,
        )
        # No checkpoint from here on: the memory follows the commit. A
        # completed handoff's VM is its source's pending removal (its diff).
        diffs = [diff_assignments(w, before.get(w, ()), changes[w]) for w in sorted(changes)]
        self._absorb_commit(generation, changes, diffs, op_id)
        for h in cancel:
            holder = self._assignments.get(h.target, _NO_ASSIGNMENT)
            if not any(v.id == h.vm_id for v in holder.vms):  # else its own now
                self._worker(h.target).removals[h.vm_id] = Removal(generation)
            self._dirty_workers.add(h.target)
        for h in (*complete, *cancel):
            self._handoffs.pop(h.vm_id, None)
        for h in start:
            self._handoffs[h.vm_id] = replace(h, generation=generation)
        self._handoffs_at = generation
        for h in complete:
            # The drain's progress, as the commit counted it; the store's
            # version of the worker is read again (the syncer).
            drained = self._worker(h.source)
            if drained.mode is not None and drained.mode.op_id == h.op_id:
                drained.mode = replace(drained.mode, moved=drained.mode.moved + 1)
            self._dirty_workers.add(h.source)
        for worker_id in {*changes, *(h.source for h in (*complete, *cancel, *start))}:
            self._rebuild_voice(worker_id)
        for h in complete:
            logger.info("drain %s: VM %s moved %s -> %s", op_id, h.vm_id, h.source, h.target)
        for h in cancel:
            logger.info("drain %s: handoff of VM %s to %s called off", op_id, h.vm_id, h.target)
        for h in start:
            logger.info("drain %s: VM %s handed off %s -> %s", op_id, h.vm_id, h.source, h.target)
        # Every worker whose assignment (as sent) changed: the targets of
        # handoffs started or called off have the same VMs stored.
        with log_context(generation=generation):
            self._push_diffs(diffs, generation)

    async def _expire_leases(self, fence: Fence) -> None:
        """Singleton duty: workers whose lease expired are lost."""
        for worker_id, renewed in await self._store.expire_sessions(fence):
            logger.warning(
                "worker %s is lost: its lease expired (last renewed %.1f s ago)",
                worker_id,
                max(0, self._now_ms() - renewed) / 1000,
                extra={"worker_id": worker_id},
            )
            self._dirty_workers.add(worker_id)
            self._sync_wake.set()

    async def _forget_removals(self, fence: Fence) -> None:
        """Singleton duty: removals confirmed longer than the grace ago."""
        horizon = self._now_ms() - self._report_grace_ms
        for worker_id in await self._store.forget_removals(fence, confirmed_before_unix_ms=horizon):
            self._dirty_workers.add(worker_id)
            self._sync_wake.set()

    # ------------------------------------------------------------ pushing

    def _queue_push(self, session: _Session, assignment: Assignment) -> None:
        session.pending = assignment
        session.wake.set()

    def _end_session(self, session: _Session, reason: str) -> None:
        """End ``session`` here (the store hears of it from ``unregister``,
        or from the worker's next registration)."""
        if self._sessions.pop(session.token, None) is None:
            return
        session.scope.cancel()
        worker = self._workers.get(session.worker_id)
        if worker is not None and worker.session is session:
            worker.session = None
            self._mark_changed()
        logger.debug("session %d of worker %s ended: %s", session.token, session.worker_id, reason)

    def _close_soon(self, session: _Session) -> None:
        """Close the connection of an ended session, in the background."""
        if self._nursery is not None:
            self._nursery.start_soon(self._close_node, session.node, session.worker_id)

    async def _pusher(self, session: _Session) -> None:
        problem: str | None = None
        with session.scope:
            problem = await self._push_until_failure(session)
        if problem is None:  # the session ended otherwise
            return
        # The worker pulls when it reconnects, so nothing is lost.
        logger.warning("worker %s: %s; closing its session", session.worker_id, problem)
        self._end_session(session, problem)
        await self._record_disconnect(session)
        await self._close_node(session.node, session.worker_id)

    async def _push_until_failure(self, session: _Session) -> str:
        while True:
            await session.wake.wait()
            session.wake = trio.Event()
            assignment, session.pending = session.pending, None
            if assignment is None:
                continue
            op = assignment.op_id or "-"
            with log_context(
                op_id=assignment.op_id,
                worker_id=session.worker_id,
                generation=assignment.generation,
            ):
                assignment = await self._as_sent(assignment)
                try:
                    with trio.fail_after(self._push_timeout):
                        sent = await self._push_one(session, assignment)
                except trio.TooSlowError:
                    return f"push of generation {assignment.generation} (op {op}) timed out"
                except ProcuratorError as exc:
                    return f"push of generation {assignment.generation} (op {op}) failed: {exc}"
                if sent:
                    logger.info(
                        "pushed generation %d to worker %s (%s)",
                        assignment.generation,
                        session.worker_id,
                        sent,
                    )

    async def _push_one(self, session: _Session, assignment: Assignment) -> str:
        """Deliver ``assignment`` (as sent) to the session's worker: only its
        changes since what the worker holds when that is known and smaller,
        else whole; nothing when the worker holds it already. Says what was
        sent ("" for nothing)."""
        held = session.held
        if held is not None and held.generation >= assignment.generation:
            return ""  # a pull brought it (or a newer one) first
        changes = _changes_to_send(session, assignment)
        if changes is not None:
            try:
                await session.node.push_changes(changes)
            except UnsupportedError as exc:
                session.takes_changes = False
                logger.info(
                    "worker %s does not take assignment changes (%s): whole assignments "
                    "for the rest of its session",
                    session.worker_id,
                    exc,
                )
            else:
                # A worker that did not hold the base pulls the whole
                # assignment (that pull is what it holds then).
                _hold(session, assignment)
                return (
                    f"changes from generation {changes.base_generation}: "
                    f"{len(changes.upserted)} VM(s) changed, {len(changes.removed)} removed"
                )
        await session.node.push(assignment)
        _hold(session, assignment)
        return f"whole: {len(assignment.vms)} VM(s)"

    async def _close_node(self, node: WorkerNode, worker_id: str) -> None:
        try:
            with trio.move_on_after(self._push_timeout):
                await node.aclose()
        except ProcuratorError as exc:
            logger.debug("closing the connection of worker %s: %s", worker_id, exc)


def _hold(session: _Session, assignment: Assignment) -> None:
    """The session's worker holds ``assignment`` (as sent): it acknowledged
    its push or pulled it. Only forward: a worker ignores older ones."""
    held = session.held
    if held is None or assignment.generation > held.generation:
        session.held = assignment


def _changes_to_send(session: _Session, assignment: Assignment) -> AssignmentChanges | None:
    """The changes that turn what the session's worker holds into
    ``assignment`` (O(its VMs), from the two cached assignments), or None
    when the whole assignment is to go: nothing known held, a worker that
    does not take changes, or changes no smaller than the whole."""
    held = session.held
    if held is None or not session.takes_changes:
        return None
    changes = assignment_changes(held, assignment)
    if changes.size >= max(1, len(assignment.vms)):
        return None
    return changes


@dataclass(frozen=True, slots=True)
class _Assembled:
    parts: FleetParts | None
    missing: tuple[str, ...]
    held: FleetParts | None  # the held fleet, cut in parts here (None: it was)


def _assemble(applied: Fleet | FleetParts | None, patch: FleetPatch) -> _Assembled:
    """``assemble`` against the held fleet (cut in parts first if it came
    from a whole apply: O(that fleet), once). Runs in a thread."""
    held = FleetParts.of(applied) if isinstance(applied, Fleet) else None
    answer = assemble(held or (applied if isinstance(applied, FleetParts) else None), patch)
    return _Assembled(answer.parts, answer.missing, held)


def _log_placement(op_id: str, placement: Placement) -> None:
    """Where the apply puts each unpinned VM it places or moves."""
    for vm in placement.vms:
        if vm.reason is PlacementReason.KEPT:
            continue
        if vm.moved:
            logger.info(
                "apply %s: VM %s moves %s -> %s (%s%s)",
                op_id,
                vm.vm_id,
                vm.previous_worker,
                vm.worker_id,
                vm.reason.value,
                f": {vm.detail}" if vm.detail else "",
            )
        else:
            logger.info("apply %s: VM %s placed on %s", op_id, vm.vm_id, vm.worker_id)
    for warning in placement.warnings:
        logger.warning("apply %s: %s", op_id, warning)


def _diff_summary(diff: WorkerDiff) -> str:
    parts = [
        f"{label} {', '.join(ids)}"
        for label, ids in (
            ("added", diff.added),
            ("replaced", diff.replaced),
            ("removed", diff.removed),
            ("updated", diff.updated),
        )
        if ids
    ]
    parts += [f"power {c.vm_id} {c.before.value} -> {c.after.value}" for c in diff.power_changed]
    return "; ".join(parts) or "its VMs as stored are unchanged"
