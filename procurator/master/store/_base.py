"""The methods both SQL adapters share: each runs one ``_sql`` function in
one transaction of the adapter (``_read`` or ``_write``)."""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from procurator.core.control import WorkerEvent
from procurator.core.drain import DEFAULT_MAX_UNAVAILABLE, Handoff, ModeAction, ModeChange
from procurator.core.models import VmAssignment, VmEvent, WorkerDiff, WorkerInfo
from procurator.core.move import Move
from procurator.core.rollout import Rollout
from procurator.core.snapshot import SnapshotInfo
from procurator.master.store import _sql
from procurator.master.store.model import (
    REQUESTS_KEPT,
    AppliedRequest,
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

T = TypeVar("T")


class SqlStore(abc.ABC):
    """Implements ``procurator.master.store.port.Store`` but for ``watch``,
    ``aclose``, ``name`` and ``single_master``, given ``_read`` and
    ``_write``."""

    requests_kept: int = REQUESTS_KEPT

    @abc.abstractmethod
    async def _read(self, fn: Callable[[_sql.Tx], T], what: str) -> T:
        """``fn`` in a read-only transaction over one snapshot."""

    @abc.abstractmethod
    async def _write(self, fn: Callable[[_sql.Tx], T], what: str, *, durable: bool = True) -> T:
        """``fn`` in a write transaction. ``durable=False``: the commit may
        be lost in a crash of the database host (status, sessions, events:
        what workers send again), but never half of it."""

    async def load(self, *, events: int = 10_000) -> StoredFleet:
        return await self._read(lambda tx: _sql.load(tx, events), "load")

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
        request = (request_id, fleet_digest, diffs, self.requests_kept) if request_id else None
        return await self._write(
            lambda tx: _sql.commit(
                tx,
                expected_generation,
                changes,
                before,
                op_id,
                unix_ms,
                request,
                placement=placement,
                fence=fence,
                rollout=rollout,
                guard_rollouts=guard_rollouts,
                supersede=supersede,
                rollout_before=rollout_before,
            ),
            f"apply {op_id}",
        )

    async def put_rollout(
        self, rollout: Rollout, *, fence: Fence | None = None, before: Rollout | None = None
    ) -> None:
        await self._write(
            lambda tx: _sql.put_rollout(tx, rollout, fence, before), f"store rollout {rollout.id}"
        )

    async def rollouts(self, limit: int = 20) -> tuple[Rollout, ...]:
        return await self._read(lambda tx: _sql.rollouts(tx, limit), "read rollouts")

    async def rollout(self, rollout_id: str = "") -> Rollout | None:
        return await self._read(lambda tx: _sql.rollout(tx, rollout_id), "read a rollout")

    async def placement(self) -> PlacementRecord:
        return await self._read(_sql.placement, "read the placement rules")

    async def put_snapshot(self, info: SnapshotInfo) -> None:
        await self._write(
            lambda tx: _sql.put_snapshot(tx, info),
            f"record snapshot {info.vm_id}/{info.name}",
            durable=False,
        )

    async def drop_snapshot(self, worker_id: str, vm_id: str, name: str) -> None:
        await self._write(
            lambda tx: _sql.drop_snapshot(tx, worker_id, vm_id, name),
            f"forget snapshot {vm_id}/{name}",
            durable=False,
        )

    async def replace_snapshots(
        self, worker_id: str, vm_id: str | None, infos: Sequence[SnapshotInfo]
    ) -> None:
        await self._write(
            lambda tx: _sql.replace_snapshots(tx, worker_id, vm_id, infos),
            f"record the snapshots of worker {worker_id}",
            durable=False,
        )

    async def snapshots(self, vm_id: str | None = None) -> tuple[SnapshotInfo, ...]:
        return await self._read(lambda tx: _sql.snapshots(tx, vm_id), "read snapshots")

    async def find_request(self, request_id: str) -> AppliedRequest | None:
        return await self._read(
            lambda tx: _sql.find_request(tx, request_id), f"find request {request_id}"
        )

    async def fleet_since(self, generation: int) -> FleetDelta:
        return await self._read(
            lambda tx: _sql.fleet_since(tx, generation), f"read the fleet since {generation}"
        )

    async def versions(self) -> Versions:
        return await self._read(_sql.versions, "read versions")

    async def worker(self, worker_id: str) -> StoredWorker:
        return await self._read(
            lambda tx: _sql.load_worker(tx, worker_id), f"read worker {worker_id}"
        )

    async def register(
        self, worker_id: str, master_id: str, info: WorkerInfo, *, unix_ms: int, lease_ms: int
    ) -> StoredWorker:
        return await self._write(
            lambda tx: _sql.register(tx, worker_id, master_id, info, unix_ms, lease_ms),
            f"register worker {worker_id}",
            durable=False,
        )

    async def unregister(
        self, worker_id: str, master_id: str, session: int, *, unix_ms: int
    ) -> StatusWritten | None:
        return await self._write(
            lambda tx: _sql.unregister(tx, worker_id, master_id, session, unix_ms),
            f"end a session of worker {worker_id}",
            durable=False,
        )

    async def renew_sessions(self, master_id: str, *, lease_ms: int) -> dict[str, int]:
        return await self._write(
            lambda tx: _sql.renew_sessions(tx, master_id, lease_ms),
            "renew the workers' leases",
            durable=False,
        )

    async def reclaim_session(
        self, worker_id: str, master_id: str, session: int, *, unix_ms: int, lease_ms: int
    ) -> int | None:
        return await self._write(
            lambda tx: _sql.reclaim_session(tx, worker_id, master_id, session, unix_ms, lease_ms),
            f"reclaim the session of worker {worker_id}",
            durable=False,
        )

    async def end_sessions(self, except_master: str, *, unix_ms: int) -> list[str]:
        return await self._write(
            lambda tx: _sql.end_sessions(tx, except_master, unix_ms),
            "end earlier sessions",
            durable=False,
        )

    async def write_status(self, write: StatusWrite) -> StatusWritten:
        return await self._write(
            lambda tx: _sql.write_status(tx, write),
            f"store the status of worker {write.worker_id}",
            # A confirmed removal must not come back after a crash: the
            # worker will not confirm it again.
            durable=write.ack is not None,
        )

    async def add_events(
        self, worker_id: str, events: Sequence[VmEvent], *, per_vm: int, total: int
    ) -> int:
        return await self._write(
            lambda tx: _sql.add_events(tx, worker_id, events, per_vm, total),
            f"store events of worker {worker_id}",
            durable=False,
        )

    async def events_since(self, seq: int, limit: int) -> tuple[WorkerEvent, ...]:
        return await self._read(lambda tx: _sql.events_since(tx, seq, limit), "read events")

    async def acquire_lease(self, name: str, holder: str, *, lease_ms: int) -> int | None:
        return await self._write(
            lambda tx: _sql.acquire_lease(tx, name, holder, lease_ms), f"take lease {name}"
        )

    async def renew_lease(self, fence: Fence, *, lease_ms: int) -> bool:
        return await self._write(
            lambda tx: _sql.renew_lease(tx, fence, lease_ms), f"renew lease {fence.name}"
        )

    async def release_lease(self, fence: Fence) -> None:
        await self._write(lambda tx: _sql.release_lease(tx, fence), f"release lease {fence.name}")

    async def read_lease(self, name: str) -> LeaseState:
        return await self._read(lambda tx: _sql.read_lease(tx, name), f"read lease {name}")

    async def expire_sessions(self, fence: Fence) -> list[tuple[str, int]]:
        return await self._write(
            lambda tx: _sql.expire_sessions(tx, fence), "expire the workers' leases"
        )

    async def forget_removals(self, fence: Fence, *, confirmed_before_unix_ms: int) -> list[str]:
        return await self._write(
            lambda tx: _sql.forget_removals(tx, fence, confirmed_before_unix_ms),
            "forget confirmed removals",
        )

    async def change_mode(
        self,
        worker_id: str,
        action: ModeAction,
        *,
        op_id: str,
        unix_ms: int,
        max_unavailable: int = DEFAULT_MAX_UNAVAILABLE,
    ) -> ModeChange:
        return await self._write(
            lambda tx: _sql.change_mode(tx, worker_id, action, op_id, unix_ms, max_unavailable),
            f"{action.value} worker {worker_id}",
        )

    async def update_drain(
        self, fence: Fence, worker_id: str, op_id: str, *, blocked: str = "", finished: bool = False
    ) -> bool:
        return await self._write(
            lambda tx: _sql.update_drain(tx, fence, worker_id, op_id, blocked, finished),
            f"record drain {op_id} of worker {worker_id}",
        )

    async def drain_moved(self, fence: Fence, worker_id: str, op_id: str) -> bool:
        return await self._write(
            lambda tx: _sql.drain_moved(tx, fence, worker_id, op_id),
            f"count a VM drain {op_id} moved off worker {worker_id}",
        )

    async def lease_renewals(self) -> tuple[int, dict[str, int]]:
        return await self._read(_sql.lease_renewals, "read the leases' renewals")

    async def handoffs(self) -> dict[str, Handoff]:
        return await self._read(_sql.handoffs, "read handoffs")

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
        return await self._write(
            lambda tx: _sql.commit_handoffs(
                tx,
                fence,
                expected_generation,
                changes,
                before,
                op_id,
                unix_ms,
                start,
                end,
                cancel,
            ),
            f"handoffs of {op_id}",
        )

    async def start_move(self, move: Move) -> None:
        await self._write(lambda tx: _sql.start_move(tx, move), f"record move {move.op_id}")

    async def moves(self, vm_id: str | None = None, limit: int = 20) -> tuple[Move, ...]:
        return await self._read(lambda tx: _sql.moves(tx, vm_id, limit), "read moves")

    async def put_move(self, fence: Fence, move: Move, before: Move, *, drain: str = "") -> None:
        await self._write(
            lambda tx: _sql.put_move(tx, fence, move, before, drain), f"record move {move.op_id}"
        )

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
        return await self._write(
            lambda tx: _sql.commit_move(
                tx, fence, expected_generation, changes, before, unix_ms, move, move_before
            ),
            f"move {move.op_id} ({move.phase.value})",
        )

    async def export(self) -> FleetDump:
        return await self._read(_sql.export, "export")

    async def import_dump(self, dump: FleetDump) -> None:
        await self._write(lambda tx: _sql.import_(tx, dump, self.describe()), "import")

    @abc.abstractmethod
    def describe(self) -> str:
        """The database, for messages (``name``)."""
