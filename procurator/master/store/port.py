"""The store port: what the master service needs of its database.

Two adapters implement it: ``SqliteStore`` (embedded, one master per file)
and ``PostgresStore`` (several masters on one database). One contract test
suite (``tests/master/test_store_contract.py``) runs against both.

Every method is a coroutine that fails with the taxonomy's errors only:
``UnavailableError`` naming the database when it cannot be reached (the
outcome of a write that fails so is unknown: the caller retries or looks
again), ``StaleGenerationError``, ``SessionEndedError``, ``FencedError``,
``RequestRecordedError`` as documented, ``ProcuratorError`` otherwise.
Every write is one transaction: it happens whole or not at all.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import trio

from procurator.core.control import WorkerEvent
from procurator.core.drain import DEFAULT_MAX_UNAVAILABLE, Handoff, ModeAction, ModeChange
from procurator.core.models import VmAssignment, VmEvent, WorkerDiff, WorkerInfo
from procurator.core.move import Move
from procurator.core.rollout import Rollout
from procurator.core.snapshot import SnapshotInfo
from procurator.master.store.model import (
    AppliedRequest,
    Change,
    Fence,
    FleetDelta,
    FleetDump,
    LeaseState,
    PlacementRecord,
    StatusWrite,
    StatusWritten,
    StoredFleet,
    StoredWorker,
    Versions,
)

__all__ = ["OnChange", "OnHealth", "Store"]

OnChange = Callable[[Change], None]
OnHealth = Callable[[bool, str], None]


class Store(Protocol):
    @property
    def name(self) -> str:
        """The database, for messages: a path or a URL without secrets."""
        ...

    @property
    def single_master(self) -> bool:
        """True when no other master can use this database (SQLite's file
        lock): every session it records is this master's or a dead one's."""
        ...

    async def aclose(self) -> None: ...

    # -- the fleet ------------------------------------------------------------

    async def load(self, *, events: int = 10_000) -> StoredFleet:
        """Everything, in one consistent snapshot, with the newest
        ``events`` events."""
        ...

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
        placement: PlacementRecord | None = None,
        fence: Fence | None = None,
        rollout: Rollout | None = None,
        guard_rollouts: bool = False,
        supersede: bool = False,
        rollout_before: Rollout | None = None,
    ) -> int:
        """Store the new VM lists of the workers in ``changes`` (all others
        keep theirs) under a new generation, which is returned. The
        generation is minted inside the transaction, which holds the
        generation row until it ends: applies of every master take turns.
        ``before`` holds those workers' lists as stored now: only the rows
        that differ are written, and a store that does not hold ``before``
        fails the commit. Every VM in ``before`` but not in ``changes`` is
        recorded as removed from its worker by the new generation. With a
        ``request_id``, it is recorded with ``fleet_digest`` and ``diffs``
        for :meth:`find_request` (the newest ``REQUESTS_KEPT`` are kept).
        Raises ``StaleGenerationError`` if the stored generation is not
        ``expected_generation``, ``RequestRecordedError`` if the request id
        is recorded already; nothing is changed then, nor on any error.
        With ``placement``, it becomes the stored ``PlacementRecord`` in the
        same transaction (None: the stored one stays). With ``fence`` (a
        leader's duty: healing), the commit is fenced: ``FencedError`` and
        nothing changed unless the fence's lease is live. With ``rollout``,
        it is stored in the same transaction (``put_rollout``). With
        ``guard_rollouts`` (a person's apply), a rollout under way refuses
        the commit (``RolloutActiveError``, nothing changed) unless
        ``supersede``: then it ends ``failed``, superseded by ``op_id``.
        ``rollout_before``: as in ``put_rollout``'s ``before``."""
        ...

    # -- rollouts (procurator.core.rollout; docs/ROLLOUTS.md) ---------------------

    async def put_rollout(
        self, rollout: Rollout, *, fence: Fence | None = None, before: Rollout | None = None
    ) -> None:
        """Store ``rollout`` (a new one, or its next state); fenced with
        ``fence`` (the leader driving it). With ``before``, only over that
        very state (``RolloutChangedError`` and nothing written otherwise):
        the leader's step and an operator's action never undo each other.
        The newest ``ROLLOUTS_KEPT`` rollouts that are over are kept."""
        ...

    async def rollouts(self, limit: int = 20) -> tuple[Rollout, ...]:
        """The newest ``limit`` rollouts, newest first."""
        ...

    async def rollout(self, rollout_id: str = "") -> Rollout | None:
        """One rollout; "": the one under way (None if none is)."""
        ...

    async def placement(self) -> PlacementRecord:
        """The ``PlacementRecord`` the newest apply that carried one stored."""
        ...

    # -- snapshots: what workers last said they keep (a record, not the truth:
    # a snapshot lives on its worker; docs/SNAPSHOTS.md) ------------------------

    async def put_snapshot(self, info: SnapshotInfo) -> None:
        """Record one snapshot of ``info.worker_id`` (replacing its row)."""
        ...

    async def drop_snapshot(self, worker_id: str, vm_id: str, name: str) -> None: ...

    async def replace_snapshots(
        self, worker_id: str, vm_id: str | None, infos: Sequence[SnapshotInfo]
    ) -> None:
        """``worker_id``'s snapshots of ``vm_id`` (None: all) are ``infos``."""
        ...

    async def snapshots(self, vm_id: str | None = None) -> tuple[SnapshotInfo, ...]:
        """The recorded snapshots (of ``vm_id``, or all), oldest first."""
        ...

    async def find_request(self, request_id: str) -> AppliedRequest | None: ...

    async def fleet_since(self, generation: int) -> FleetDelta:
        """The assignments that applies after ``generation`` changed."""
        ...

    async def versions(self) -> Versions: ...

    # -- workers ----------------------------------------------------------------

    async def worker(self, worker_id: str) -> StoredWorker: ...

    async def register(
        self, worker_id: str, master_id: str, info: WorkerInfo, *, unix_ms: int, lease_ms: int
    ) -> StoredWorker:
        """A new session of the worker, held by ``master_id``, leased for
        ``lease_ms`` (the database's clock); an older session, whoever holds
        it, has ended."""
        ...

    async def unregister(
        self, worker_id: str, master_id: str, session: int, *, unix_ms: int
    ) -> StatusWritten | None:
        """That session ended: the worker is disconnected since ``unix_ms``
        (its version before and after: ``StatusWritten``), unless another
        session replaced it (None)."""
        ...

    async def renew_sessions(self, master_id: str, *, lease_ms: int) -> dict[str, int]:
        """Extend the leases of the connected sessions ``master_id`` holds:
        worker id -> session, for each."""
        ...

    async def reclaim_session(
        self, worker_id: str, master_id: str, session: int, *, unix_ms: int, lease_ms: int
    ) -> int | None: ...

    async def end_sessions(self, except_master: str, *, unix_ms: int) -> list[str]: ...

    async def write_status(self, write: StatusWrite) -> StatusWritten:
        """Store one status report (see ``StatusWrite``); the worker's
        version before and after (``StatusWritten``)."""
        ...

    # -- events -------------------------------------------------------------------

    async def add_events(
        self, worker_id: str, events: Sequence[VmEvent], *, per_vm: int, total: int
    ) -> int:
        """Store events under new seqs, keeping at most ``per_vm`` per VM
        and ``total`` in all. The newest seq is returned: the events got
        the seqs ``newest - len(events) + 1 .. newest``, in their order (a
        master that alone writes the store puts them in its rings so)."""
        ...

    async def events_since(self, seq: int, limit: int) -> tuple[WorkerEvent, ...]: ...

    # -- leader leases --------------------------------------------------------------

    async def acquire_lease(self, name: str, holder: str, *, lease_ms: int) -> int | None: ...

    async def renew_lease(self, fence: Fence, *, lease_ms: int) -> bool: ...

    async def release_lease(self, fence: Fence) -> None: ...

    async def read_lease(self, name: str) -> LeaseState: ...

    async def expire_sessions(self, fence: Fence) -> list[tuple[str, int]]:
        """A singleton duty (fenced): sessions whose lease expired are
        lost. (worker id, last renewal) of each."""
        ...

    async def forget_removals(self, fence: Fence, *, confirmed_before_unix_ms: int) -> list[str]:
        """A singleton duty (fenced): forget removals confirmed before the
        horizon; the workers concerned."""
        ...

    # -- cordon, drain, handoffs (procurator.core.drain) -------------------------------

    async def change_mode(
        self,
        worker_id: str,
        action: ModeAction,
        *,
        op_id: str,
        unix_ms: int,
        max_unavailable: int = DEFAULT_MAX_UNAVAILABLE,
    ) -> ModeChange:
        """Cordon, uncordon or drain ``worker_id``, decided against its
        stored mode in the same transaction (idempotent; the worker's
        version moves when it changes). ``NotFoundError`` for a worker the
        store never heard of."""
        ...

    async def update_drain(
        self, fence: Fence, worker_id: str, op_id: str, *, blocked: str = "", finished: bool = False
    ) -> bool:
        """A leader's duty (fenced): drain ``op_id`` is blocked (why), or
        not, or finished (the worker stays cordoned). False when that drain
        is over already."""
        ...

    async def drain_moved(self, fence: Fence, worker_id: str, op_id: str) -> bool:
        """A leader's duty (fenced): drain ``op_id`` of ``worker_id`` has
        one more VM off the worker (a move of it ended done: live moves are
        the drain's first way). False when that drain is over already."""
        ...

    async def lease_renewals(self) -> tuple[int, dict[str, int]]:
        """The database's clock (unix ms) and, by worker id, when each
        registered worker's lease was last renewed (``status`` shows how
        long ago; renewals do not move a worker's version)."""
        ...

    async def handoffs(self) -> dict[str, Handoff]:
        """The handoffs under way, by VM id."""
        ...

    async def commit_handoffs(
        self,
        *,
        fence: Fence,
        expected_generation: int,
        changes: Mapping[str, Sequence[VmAssignment]],
        before: Mapping[str, Sequence[VmAssignment]],
        op_id: str,
        unix_ms: int,
        start: Sequence[Handoff] = (),
        end: Sequence[Handoff] = (),
        cancel: Sequence[Handoff] = (),
    ) -> int:
        """A leader's duty (fenced), one new generation, as ``commit``
        (``StaleGenerationError`` the same way): handoffs started,
        completed (their VMs moved in ``changes``; each counted by its
        source's drain) and called off (the target's copy becomes its
        pending removal). The new generation."""
        ...

    # -- moves (procurator.core.move) ------------------------------------------------

    async def start_move(self, move: Move) -> None:
        """Record a new (``pending``) move; ``ValidationError`` when its VM
        is moving already."""
        ...

    async def moves(self, vm_id: str | None = None, limit: int = 20) -> tuple[Move, ...]:
        """The moves under way, then the newest ``limit`` that are over,
        newest first (of one VM when ``vm_id`` is given)."""
        ...

    async def put_move(self, fence: Fence, move: Move, before: Move, *, drain: str = "") -> None:
        """A leader's duty (fenced): ``move`` replaces ``before`` (its
        phase, generation, reason), compare-and-set: ``ProcuratorError``
        when the stored move is not ``before`` any more. ``drain``: the op
        id of the drain of the move's source that a move ending ``done``
        counts in (as ``drain_moved``, in the same transaction: a drain
        never sees the move over and not counted; nothing when that drain
        is over already)."""
        ...

    async def commit_move(
        self,
        *,
        fence: Fence,
        expected_generation: int,
        changes: Mapping[str, Sequence[VmAssignment]],
        before: Mapping[str, Sequence[VmAssignment]],
        unix_ms: int,
        move: Move,
        move_before: Move,
    ) -> int:
        """A leader's duty (fenced), one new generation under the move's op
        id, as ``commit`` (``StaleGenerationError`` the same way), with the
        move's new phase (as ``put_move``; its generation is the new one).
        The new generation."""
        ...

    # -- moving a fleet ---------------------------------------------------------------

    async def export(self) -> FleetDump: ...

    async def import_dump(self, dump: FleetDump) -> None:
        """Into an empty store only; ``ProcuratorError`` otherwise."""
        ...

    # -- notifications ------------------------------------------------------------------

    async def watch(
        self,
        on_change: OnChange,
        on_health: OnHealth,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Until cancelled: call ``on_change`` for each change another
        master committed (this master's own come too), and
        ``on_health(ok, reason)`` when the database becomes reachable or not.
        After notifications may have been lost (a reconnect), a ``RESYNC``
        change. Started once listening (or at once, for a store with one
        master, which has nobody to hear)."""
        ...
