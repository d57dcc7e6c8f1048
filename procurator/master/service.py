"""The master: desired fleet, generations, connected workers, their status.

Trio only. The Cap'n Proto server (``procurator.rpc.master_server``) calls
these methods through the bridge; a worker's ``Node`` capability stays on
the capnp thread and reaches this module as a :class:`WorkerNode` (an opaque
handle whose methods cross the bridge).

Invariants:

- The in-memory fleet (``_assignments``, ``_generation``) always equals what
  the store holds: it is loaded once at start and changed only after a
  successful commit, under ``_apply_lock``.
- An apply is validated and diffed before anything is stored; a rejected
  apply changes nothing. A no-op apply stores nothing and returns the current
  generation with ``changed=False``.
- After a commit, each *affected* connected worker gets the new assignment
  pushed at once; unaffected workers are not contacted. Every session has
  one pusher task and a latest-wins slot: at most one push per worker is in
  flight, a newer assignment overwrites one not yet sent, and a push that
  times out ends the session (the worker reconnects and pulls). So a slow or
  dead worker never delays an apply or another worker.
- A worker id has at most one live session; registering again replaces the
  old one, whose connection is closed. Calls on a replaced session fail with
  ``UnavailableError``; reports on a session are accepted only for its own
  worker id (else ``UnauthorizedError``), and only about what that worker
  may speak for (below).
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
  ``UnauthorizedError``. A refused report is refused whole, logged with the
  worker id at WARNING, and nothing of it is stored.

  Removals are store rows written in the apply's transaction; a report that
  confirms some is stored only after the store marked them confirmed, so a
  restarted master rebuilds exactly this state (confirmations older than
  ``report_grace`` are forgotten). A VM put back on the worker is its
  assignment again; taken off again, its removal is pending with the new
  generation.
- **Listed workers.** ``fleet_status`` and ``fleet_view`` list a worker while
  it has VMs assigned, is connected, or has pending removals (it may still
  run VMs the fleet no longer wants; the master cannot know until it says
  so). A worker removed from the fleet is listed until it confirmed the
  removal and is disconnected.
- **Request ids.** An apply may carry a client-chosen request id (1 to 64
  of ``[A-Za-z0-9._-]``; "" for none). A committed apply records it in the
  store, in the transaction of its generation, with a digest of the fleet
  and its diffs. An apply (or dry run) whose request id is recorded applies
  nothing: it answers that apply's result with ``replayed=True`` (same
  generation, op id and diffs), whatever the fleet is at now, also after a
  restart; with a different fleet it is refused (``ValidationError``). Dry
  runs and no-op applies record nothing. The store keeps the newest 1,000
  request ids (``procurator.master.store.REQUESTS_KEPT``): a retry within
  that many applies is recognised.
- Events are kept in bounded rings: at most ``events_total`` overall (the
  per-VM rings included: an event leaving the fleet's ring leaves its VM's
  too), at most ``events_per_vm`` per VM, and rings of at most
  ``events_total`` VMs, so a worker flooding events, or a fleet churning
  through VM ids, cannot grow the master.
- Every log record of an apply and of the pushes, status transitions and
  events it causes carries its ``op_id`` (``procurator.logs``).
- The change index (``change_index``) moves on every change a control
  client can see in a status or description: an apply that changes the
  fleet, a status or event report, a session starting or ending. It starts
  from the wall clock in microseconds, so an index from before a restart
  does not come back; blocking reads (``wait_change``) wait while the index
  still equals the caller's, at most ``max_waiters`` of them at once.

Lock order: ``_apply_lock`` is the only lock; nothing else is awaited under
it but the store (request lookup, commit) and the (pure) diff in a thread.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, Protocol

import trio

from procurator.core.errors import (
    LimitExceededError,
    NotFoundError,
    ProcuratorError,
    StaleGenerationError,
    UnauthorizedError,
    UnavailableError,
    ValidationError,
)
from procurator.core.fleet import diff_fleets, validate_fleet
from procurator.core.metrics import FleetView, WorkerView
from procurator.core.models import (
    Assignment,
    Fleet,
    Phase,
    VmAssignment,
    VmEvent,
    VmStatus,
    WorkerDiff,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.status import StatusChanges, apply_status_changes
from procurator.core.validation import LIMITS
from procurator.logs import log_context, new_op_id, some
from procurator.rpc.messages import (
    ApplyResult,
    FleetStatus,
    MetricSample,
    VmDescription,
    WorkerConnection,
    WorkerEvent,
    check_request_id,
)

__all__ = ["DesiredStateStore", "MasterService", "WorkerNode", "fleet_digest", "new_op_id"]

logger = logging.getLogger(__name__)


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
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()


class WorkerNode(Protocol):
    """The master's handle on one connected worker's ``Node`` capability."""

    @property
    def connection_id(self) -> int:
        """Identifies the network connection the node came over."""
        ...

    async def push(self, assignment: Assignment) -> None:
        """Deliver ``assignment``; returns once the worker took note of it."""
        ...

    async def aclose(self) -> None:
        """Close the worker's connection (idempotent)."""
        ...


class DesiredStateStore(Protocol):
    """The durable store (``procurator.master.store.FleetStore``)."""

    async def load(self) -> _Stored: ...

    async def commit(
        self,
        *,
        expected_generation: int,
        changes: Mapping[str, Sequence[VmAssignment]],
        before: Mapping[str, Sequence[VmAssignment]],
        op_id: str,
        unix_ms: int,
        request_id: str = "",
        fleet_digest: str = "",
        diffs: Sequence[WorkerDiff] = (),
    ) -> int: ...

    async def find_request(self, request_id: str) -> _AppliedRequest | None: ...

    async def acknowledge_removals(
        self, worker_id: str, observed_generation: int, unix_ms: int, forget_before_unix_ms: int
    ) -> None: ...


class _Removal(Protocol):
    @property
    def generation(self) -> int: ...

    @property
    def acked_unix_ms(self) -> int | None: ...


class _Stored(Protocol):
    @property
    def generation(self) -> int: ...

    @property
    def assignments(self) -> Mapping[str, Assignment]: ...

    @property
    def removals(self) -> Mapping[str, Mapping[str, _Removal]]: ...


class _AppliedRequest(Protocol):
    @property
    def generation(self) -> int: ...

    @property
    def op_id(self) -> str: ...

    @property
    def fleet_digest(self) -> str: ...

    @property
    def diffs(self) -> tuple[WorkerDiff, ...]: ...


@dataclass(eq=False)
class _Session:
    token: int
    worker_id: str
    info: WorkerInfo
    node: WorkerNode
    pending: Assignment | None = None
    wake: trio.Event = field(default_factory=trio.Event)
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    # The last status this session delivered: what its status changes apply
    # to (never another session's, see procurator.core.status).
    status: WorkerStatus | None = None


@dataclass(eq=False)
class _Worker:
    worker_id: str
    info: WorkerInfo | None = None
    session: _Session | None = None
    since_unix_ms: int = 0
    status: WorkerStatus | None = None
    last_report_unix_ms: int = 0
    metrics: tuple[MetricSample, ...] = ()
    last_metrics_unix_ms: int = 0


@dataclass(eq=False)
class _Voice:
    """What one worker may speak for (see the module docstring)."""

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
    raises ``UnavailableError`` before that."""

    def __init__(
        self,
        store: DesiredStateStore,
        *,
        push_timeout: float = 10.0,
        events_per_vm: int = 100,
        events_total: int = 10_000,
        wall_clock: Callable[[], float] = time.time,
        max_waiters: int = 1024,
        report_grace: float = 300.0,
    ) -> None:
        self._store = store
        self._push_timeout = push_timeout
        self._report_grace_ms = int(report_grace * 1000)
        self._voices: dict[str, _Voice] = {}
        self._events_per_vm = events_per_vm
        self._wall_clock = wall_clock
        self._apply_lock = trio.Lock()
        self._generation = 0
        self._assignments: dict[str, Assignment] = {}
        self._workers: dict[str, _Worker] = {}
        self._sessions: dict[int, _Session] = {}
        self._tokens = itertools.count(1)
        self._events: collections.deque[WorkerEvent] = collections.deque(maxlen=events_total)
        self._vm_events: dict[str, collections.deque[WorkerEvent]] = {}
        self._max_vm_event_keys = events_total
        # Event seqs follow the wall clock (microseconds) so they keep
        # increasing across master restarts; +1 when events come faster.
        self._last_event_seq = 0
        self._change_index = int(wall_clock() * 1e6)
        self._changed = trio.Event()
        self._waiters = 0
        self._max_waiters = max_waiters
        self._nursery: trio.Nursery | None = None

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        stored = await self._store.load()
        self._generation = stored.generation
        self._assignments = dict(stored.assignments)
        self._voices = {}
        for worker_id, assignment in self._assignments.items():
            self._voice(worker_id).assigned = frozenset(vm.id for vm in assignment.vms)
        forget_before = self._now_ms() - self._report_grace_ms
        for worker_id, removals in stored.removals.items():
            voice = self._voice(worker_id)
            for vm_id, removal in removals.items():
                if removal.acked_unix_ms is None:
                    voice.pending[vm_id] = removal.generation
                elif removal.acked_unix_ms >= forget_before:
                    voice.confirmed[vm_id] = removal.acked_unix_ms
        logger.info(
            "master state loaded: generation %d, %d workers, %d VMs, %d removals unconfirmed",
            self._generation,
            len(self._assignments),
            sum(len(a.vms) for a in self._assignments.values()),
            sum(len(v.pending) for v in self._voices.values()),
        )
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for session in list(self._sessions.values()):
                self._end_session(session, "master stopping")

    def _require_running(self) -> trio.Nursery:
        if self._nursery is None:
            raise UnavailableError("the master is not running")
        return self._nursery

    def _now_ms(self) -> int:
        return int(self._wall_clock() * 1000)

    def _voice(self, worker_id: str) -> _Voice:
        voice = self._voices.get(worker_id)
        if voice is None:
            voice = self._voices[worker_id] = _Voice()
        return voice

    def _listed(self, worker_id: str) -> bool:
        """Shown in status and metrics (see "Listed workers")."""
        assignment = self._assignments.get(worker_id)
        worker = self._workers.get(worker_id)
        voice = self._voices.get(worker_id)
        return bool(
            (assignment is not None and assignment.vms)
            or (worker is not None and worker.session is not None)
            or (voice is not None and voice.pending)
        )

    def _listed_ids(self) -> list[str]:
        return sorted(w for w in set(self._assignments) | set(self._workers) if self._listed(w))

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

    async def wait_change(self, index: int, timeout: float) -> int:
        """Wait (at most ``timeout`` seconds) while the change index still
        equals ``index``; return the index then. Any other ``index`` returns
        at once. ``LimitExceededError`` when ``max_waiters`` calls wait
        already: the caller should poll instead."""
        self._require_running()
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
    ) -> ApplyResult:
        """Validate, diff, store (one transaction), push to affected workers.

        ``op_id`` names the operation (minted here when not given); it is in
        every log record of the apply and of its pushes, in the assignments
        and in every error raised. Raises ``ValidationError`` (nothing
        stored) or ``StaleGenerationError`` when ``expected_generation`` is
        given and the fleet has moved on.
        """
        self._require_running()
        op_id = op_id or new_op_id()
        with log_context(op_id=op_id):
            try:
                return await self._apply(fleet, expected_generation, dry_run, op_id, request_id)
            except ProcuratorError as exc:
                exc.op_id = exc.op_id or op_id
                raise

    async def _apply(
        self,
        fleet: Fleet,
        expected_generation: int | None,
        dry_run: bool,
        op_id: str,
        request_id: str,
    ) -> ApplyResult:
        if request_id and (problem := check_request_id(request_id)) is not None:
            raise ValidationError(f"request id: {problem}")

        def prepare() -> str:
            validate_fleet(fleet)
            return fleet_digest(fleet) if request_id else ""

        # Pure CPU work that grows with the fleet: off the event loop.
        digest = await trio.to_thread.run_sync(prepare)
        async with self._apply_lock:
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
            diffs: list[WorkerDiff] = await trio.to_thread.run_sync(diff_fleets, assignments, fleet)
            if dry_run or not diffs:
                logger.info(
                    "apply %s: %s (generation %d)",
                    op_id,
                    "dry run" if dry_run else "no changes",
                    current,
                    extra={"generation": current},
                )
                return ApplyResult(current, bool(diffs), tuple(diffs), op_id, dry_run)
            desired = fleet.as_dict()
            changes = {d.worker_id: desired.get(d.worker_id, ()) for d in diffs}
            before = {w: assignments[w].vms for w in changes if w in assignments}
            generation = await self._store.commit(
                expected_generation=current,
                changes=changes,
                before=before,
                op_id=op_id,
                unix_ms=self._now_ms(),
                request_id=request_id,
                fleet_digest=digest,
                diffs=diffs,
            )
            # No checkpoint from here to the end: the memory follows the
            # commit even if this task is cancelled (the client went away).
            for worker_id, vms in changes.items():
                self._assignments[worker_id] = Assignment(worker_id, generation, tuple(vms), op_id)
            for diff in diffs:
                voice = self._voice(diff.worker_id)
                voice.assigned = frozenset(vm.id for vm in changes[diff.worker_id])
                for vm_id in diff.removed:
                    voice.pending[vm_id] = generation
                    voice.confirmed.pop(vm_id, None)
            self._generation = generation
            self._mark_changed()
        with log_context(generation=generation):
            logger.info(
                "applied %s: generation %d, %d worker(s) changed", op_id, generation, len(diffs)
            )
            for diff in diffs:
                with log_context(worker_id=diff.worker_id):
                    logger.info("worker %s: %s", diff.worker_id, _diff_summary(diff))
                    worker = self._workers.get(diff.worker_id)
                    if worker is not None and worker.session is not None:
                        self._queue_push(worker.session, self._assignments[diff.worker_id])
                    else:
                        logger.info(
                            "worker %s is not connected: it gets generation %d when it does",
                            diff.worker_id,
                            generation,
                        )
        return ApplyResult(generation, True, tuple(diffs), op_id, False)

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

    async def fleet_status(self) -> FleetStatus:
        self._require_running()
        workers = []
        for worker_id in self._listed_ids():
            assignment = self._assignments.get(worker_id)
            worker = self._workers.get(worker_id)
            workers.append(
                WorkerConnection(
                    worker_id=worker_id,
                    connected=worker is not None and worker.session is not None,
                    since_unix_ms=worker.since_unix_ms if worker else 0,
                    desired_generation=assignment.generation if assignment else 0,
                    status=worker.status if worker else None,
                    last_report_unix_ms=worker.last_report_unix_ms if worker else 0,
                    vm_count=len(assignment.vms) if assignment else 0,
                    desired_vms=assignment.vms if assignment else (),
                    info=worker.info if worker else None,
                )
            )
        return FleetStatus(self._generation, tuple(workers), self._change_index)

    async def describe_vm(self, vm_id: str, event_limit: int = 20) -> VmDescription:
        """Desired and observed state of one VM with its newest events.
        Raises ``NotFoundError`` when no assignment, status or event names
        it. O(VMs of the fleet): an operator's command, not a hot path."""
        self._require_running()
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
            worker_connected=shown is not None and shown.session is not None,
            observed_generation=(
                observer.status.observed_generation if observer and observer.status else 0
            ),
            status=observed,
            events=events,
            change_index=self._change_index,
        )

    async def recent_events(
        self, vm_id: str = "", limit: int = 100, after_seq: int = 0
    ) -> tuple[WorkerEvent, ...]:
        """Events of ``vm_id`` (or of all VMs), oldest first: the newest
        ``limit``, or with ``after_seq`` the oldest ``limit`` whose ``seq``
        is greater (for a client following the stream)."""
        self._require_running()
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

    def fleet_view(self) -> FleetView:
        """What the exporter and service discovery show, as plain values.
        Relayed samples keep their tuple identity until a worker reports
        again (the exporter caches its checks by identity)."""
        views = []
        for worker_id in self._listed_ids():
            assignment = self._assignments.get(worker_id)
            worker = self._workers.get(worker_id)
            status = worker.status if worker else None
            phases = dict.fromkeys(Phase, 0)
            for vm in status.vms if status else ():
                phases[vm.phase] += 1
            last = max(worker.last_report_unix_ms, worker.last_metrics_unix_ms) if worker else 0
            views.append(
                WorkerView(
                    worker_id=worker_id,
                    connected=worker is not None and worker.session is not None,
                    desired_generation=assignment.generation if assignment else 0,
                    observed_generation=status.observed_generation if status else 0,
                    last_report_unix=last / 1000 if last else None,
                    vms_by_phase=phases,
                    samples=worker.metrics if worker else (),
                    metrics_url=worker.info.metrics_url if worker and worker.info else "",
                )
            )
        return FleetView(tuple(views))

    def worker_info(self) -> dict[str, WorkerInfo]:
        """What each worker said about itself when it last registered."""
        return {w.worker_id: w.info for w in self._workers.values() if w.info is not None}

    def worker_metrics(self) -> dict[str, tuple[int, tuple[MetricSample, ...]]]:
        """Each worker's latest metric samples with their time (unix ms)."""
        return {
            w.worker_id: (w.last_metrics_unix_ms, w.metrics)
            for w in self._workers.values()
            if w.metrics
        }

    # ------------------------------------------------------------ workers

    async def register(self, info: WorkerInfo, node: WorkerNode) -> int:
        """Start a session for ``info.worker_id``; returns its token. An
        older session of the same worker is ended and its connection closed."""
        nursery = self._require_running()
        worker = self._workers.get(info.worker_id)
        if worker is None:
            worker = self._workers[info.worker_id] = _Worker(info.worker_id)
        old = worker.session
        session = _Session(next(self._tokens), info.worker_id, info, node)
        self._sessions[session.token] = session
        worker.session = session
        worker.info = info
        worker.since_unix_ms = self._now_ms()
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
        worker = self._workers.get(session.worker_id)
        if worker is not None and worker.session is None:
            logger.info("worker %s disconnected", session.worker_id)

    def _session(self, token: int) -> _Session:
        session = self._sessions.get(token)
        if session is None:
            raise UnavailableError("this worker session has ended; register again")
        return session

    async def get_assignment(self, token: int, known_generation: int) -> tuple[Assignment, bool]:
        """The worker's assignment and whether it differs from
        ``known_generation`` (when it does not, ``vms`` is empty)."""
        self._require_running()
        worker_id = self._session(token).worker_id
        assignment = self._assignments.get(worker_id) or Assignment(worker_id, 0)
        if assignment.generation == known_generation:
            return Assignment(worker_id, assignment.generation, (), assignment.op_id), False
        return assignment, True

    async def report_status(self, token: int, status: WorkerStatus) -> None:
        self._require_running()
        session = self._session(token)
        self._check_own(session, status.worker_id, "status")
        self._check_status(session.worker_id, status.observed_generation, status.vms)
        await self._store_status(session, status)

    async def report_status_changes(self, token: int, changes: StatusChanges) -> None:
        """Merge what changed into the status this session delivered last.
        Refused (``ValidationError``, or ``LimitExceededError`` when the
        merge would pass the per-worker VM limit) without touching the
        stored status; the worker then sends a full one."""
        self._require_running()
        session = self._session(token)
        self._check_own(session, changes.worker_id, "status")
        if session.status is None:
            raise ValidationError(
                "status changes before a full status on this session; send the full status"
            )
        merged = apply_status_changes(session.status, changes)
        if len(merged.vms) > LIMITS.max_vms_per_worker:
            raise LimitExceededError(
                f"status changes would make {len(merged.vms)} VMs, over the limit of "
                f"{LIMITS.max_vms_per_worker} per worker"
            )
        self._check_status(session.worker_id, merged.observed_generation, merged.vms)
        await self._store_status(session, merged)

    def _check_status(self, worker_id: str, observed: int, vms: Sequence[VmStatus]) -> None:
        """Raise unless ``worker_id`` may report this status (see "Who may
        report what"); log the refusal."""
        assignment = self._assignments.get(worker_id)
        issued = assignment.generation if assignment is not None else 0
        voice = self._voices.get(worker_id) or _Voice()
        problem: ProcuratorError | None = None
        if observed > issued:
            problem = ValidationError(
                f"worker {worker_id} reports observed generation {observed}, which was never "
                f"issued to it (its assignment is at generation {issued})"
            )
        else:
            for vm in vms:
                if vm.id in voice.assigned:
                    continue
                removed_by = voice.pending.get(vm.id)
                if removed_by is None:
                    problem = UnauthorizedError(
                        f"worker {worker_id} reports VM {vm.id!r}, which is neither assigned to "
                        "it nor being removed from it"
                    )
                elif removed_by <= observed:
                    problem = ValidationError(
                        f"worker {worker_id} reports VM {vm.id!r} with observed generation "
                        f"{observed}, but generation {removed_by} removed that VM from it"
                    )
                if problem is not None:
                    break
        if problem is not None:
            self._refused(worker_id, "status", problem)

    def _refused(self, worker_id: str, what: str, problem: ProcuratorError) -> NoReturn:
        logger.warning(
            "worker %s: refused its %s report: %s",
            worker_id,
            what,
            problem,
            extra={"worker_id": worker_id},
        )
        raise problem

    async def _confirm_removals(self, session: _Session, observed: int) -> None:
        """Record in the store that the worker confirmed the removals at or
        below ``observed``, then here (in this order: a restarted master
        must not forget a removal the worker has not confirmed)."""
        voice = self._voices.get(session.worker_id)
        if voice is None or not any(g <= observed for g in voice.pending.values()):
            return
        now = self._now_ms()
        await self._store.acknowledge_removals(
            session.worker_id, observed, now, now - self._report_grace_ms
        )
        # Recomputed after the await: an apply may have taken a VM off again.
        confirmed = [vm_id for vm_id, g in voice.pending.items() if g <= observed]
        for vm_id in confirmed:
            del voice.pending[vm_id]
            voice.confirmed[vm_id] = now
        for other in self._voices.values():
            for vm_id, at in list(other.confirmed.items()):
                if now - at >= self._report_grace_ms:
                    del other.confirmed[vm_id]
        with log_context(worker_id=session.worker_id, generation=observed):
            logger.info(
                "worker %s confirmed the removal of %d VM(s): %s",
                session.worker_id,
                len(confirmed),
                some(sorted(confirmed)),
            )
        if self._sessions.get(session.token) is not session:
            raise UnavailableError("this worker session has ended; register again")

    async def _store_status(self, session: _Session, status: WorkerStatus) -> None:
        await self._confirm_removals(session, status.observed_generation)
        session.status = status
        worker = self._workers[session.worker_id]
        before = worker.status.observed_generation if worker.status else 0
        worker.status = status
        worker.last_report_unix_ms = self._now_ms()
        self._mark_changed()
        reached = status.observed_generation
        if reached != before:
            assignment = self._assignments.get(worker.worker_id)
            op_id = assignment.op_id if assignment and assignment.generation == reached else ""
            with log_context(op_id=op_id, worker_id=worker.worker_id, generation=reached):
                logger.info("worker %s converged to generation %d", worker.worker_id, reached)

    async def report_metrics(
        self, token: int, worker_id: str, samples: tuple[MetricSample, ...]
    ) -> None:
        self._require_running()
        session = self._session(token)
        self._check_own(session, worker_id, "metrics")
        voice = self._voices.get(session.worker_id) or _Voice()
        now, grace, checked = self._now_ms(), self._report_grace_ms, ""
        for sample in samples:
            # Samples come grouped by VM: check each VM once.
            if not sample.vm_id or sample.vm_id == checked:
                continue
            if not voice.may_mention(sample.vm_id, now, grace):
                self._refused(
                    session.worker_id,
                    "metrics",
                    UnauthorizedError(
                        f"worker {session.worker_id} reports metrics of VM {sample.vm_id!r}, "
                        "which is neither assigned to it nor was lately removed from it"
                    ),
                )
            checked = sample.vm_id
        worker = self._workers[session.worker_id]
        worker.metrics = samples
        worker.last_metrics_unix_ms = self._now_ms()

    async def report_events(self, token: int, events: Sequence[VmEvent]) -> None:
        self._require_running()
        worker_id = self._session(token).worker_id
        voice = self._voices.get(worker_id) or _Voice()
        now, grace = self._now_ms(), self._report_grace_ms
        for event in events:
            if not voice.may_mention(event.vm_id, now, grace):
                self._refused(
                    worker_id,
                    "events",
                    UnauthorizedError(
                        f"worker {worker_id} reports an event of VM {event.vm_id!r}, which is "
                        "neither assigned to it nor was lately removed from it; none of the "
                        f"{len(events)} event(s) was stored"
                    ),
                )
        for event in events:
            with log_context(op_id=event.op_id, worker_id=worker_id, vm_id=event.vm_id):
                logger.info("VM %s %s: %s", event.vm_id, event.kind.value, event.message)
            self._last_event_seq = max(self._last_event_seq + 1, self._now_ms() * 1000)
            item = WorkerEvent(worker_id, event, self._last_event_seq)
            if len(self._events) == self._events.maxlen:
                # The fleet-wide bound holds for the per-VM rings too: the
                # oldest event leaves its VM's ring with the fleet's (it is
                # that ring's oldest: both are in arrival order).
                oldest = self._events[0]
                old_ring = self._vm_events.get(oldest.event.vm_id)
                if old_ring and old_ring[0] is oldest:
                    old_ring.popleft()
                    if not old_ring:
                        del self._vm_events[oldest.event.vm_id]
            self._events.append(item)
            ring = self._vm_events.pop(event.vm_id, None)
            if ring is None:
                ring = collections.deque(maxlen=self._events_per_vm)
                if len(self._vm_events) >= self._max_vm_event_keys:
                    # Forget the VM whose events are the stalest.
                    del self._vm_events[next(iter(self._vm_events))]
            ring.append(item)
            self._vm_events[event.vm_id] = ring  # re-inserted: newest last
        if events:
            self._mark_changed()

    @staticmethod
    def _check_own(session: _Session, worker_id: str, what: str) -> None:
        if worker_id != session.worker_id:
            raise UnauthorizedError(
                f"the session of worker {session.worker_id!r} cannot report {what} for "
                f"worker {worker_id!r}"
            )

    # ------------------------------------------------------------ pushing

    def _queue_push(self, session: _Session, assignment: Assignment) -> None:
        session.pending = assignment
        session.wake.set()

    def _end_session(self, session: _Session, reason: str) -> None:
        if self._sessions.pop(session.token, None) is None:
            return
        session.scope.cancel()
        worker = self._workers.get(session.worker_id)
        if worker is not None and worker.session is session:
            worker.session = None
            worker.since_unix_ms = self._now_ms()
            self._mark_changed()
        logger.debug("session %d of worker %s ended: %s", session.token, session.worker_id, reason)

    async def _pusher(self, session: _Session) -> None:
        problem: str | None = None
        with session.scope:
            problem = await self._push_until_failure(session)
        if problem is None:  # the session ended otherwise
            return
        # The worker pulls when it reconnects, so nothing is lost.
        logger.warning("worker %s: %s; closing its session", session.worker_id, problem)
        self._end_session(session, problem)
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
                try:
                    with trio.fail_after(self._push_timeout):
                        await session.node.push(assignment)
                except trio.TooSlowError:
                    return f"push of generation {assignment.generation} (op {op}) timed out"
                except ProcuratorError as exc:
                    return f"push of generation {assignment.generation} (op {op}) failed: {exc}"
                logger.info(
                    "pushed generation %d to worker %s", assignment.generation, session.worker_id
                )

    async def _close_node(self, node: WorkerNode, worker_id: str) -> None:
        try:
            with trio.move_on_after(self._push_timeout):
                await node.aclose()
        except ProcuratorError as exc:
            logger.debug("closing the connection of worker %s: %s", worker_id, exc)


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
    return "; ".join(parts)
