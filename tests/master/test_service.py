"""MasterService logic with a fake WorkerNode (no sockets)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from masterhelpers import FakeNode, PassThroughStore

from procurator.core.errors import (
    LimitExceededError,
    StaleGenerationError,
    UnauthorizedError,
    UnavailableError,
    ValidationError,
)
from procurator.core.metrics import MetricsReport
from procurator.core.models import (
    EventKind,
    Fleet,
    Phase,
    VmAssignment,
    VmEvent,
    VmStatus,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.status import StatusChanges
from procurator.core.validation import LIMITS
from procurator.master.service import MasterService
from procurator.master.store import Change, ChangeKind, FleetStore, StatusWrite

FleetOf = Callable[[dict[str, list[tuple[str, str]]]], Fleet]


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[MasterService]:
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        svc = MasterService(store, push_timeout=1.0, events_per_vm=3, events_total=5)
        await nursery.start(svc.run)
        yield svc
        nursery.cancel_scope.cancel()


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def test_apply_pushes_only_to_affected_connected_workers(
    service: MasterService, fleet_of: FleetOf
) -> None:
    a, b = FakeNode(), FakeNode()
    await service.register(WorkerInfo("host-a"), a)
    await service.register(WorkerInfo("host-b"), b)
    result = await service.apply(fleet_of({"host-a": [("web-1", "a")], "host-b": [("db-1", "b")]}))
    await settle()
    assert [p.generation for p in a.pushed] == [result.generation]
    assert [p.generation for p in b.pushed] == [result.generation]

    second = await service.apply(fleet_of({"host-a": [("web-1", "c")], "host-b": [("db-1", "b")]}))
    await settle()
    assert [p.generation for p in a.pushed] == [1, 2]
    assert a.pushed[-1].op_id == second.op_id
    assert [p.generation for p in b.pushed] == [1]


async def test_dry_run_and_noop_store_nothing(service: MasterService, fleet_of: FleetOf) -> None:
    fleet = fleet_of({"host-a": [("web-1", "a")]})
    dry = await service.apply(fleet, dry_run=True)
    assert (dry.dry_run, dry.changed, dry.generation) == (True, True, 0)
    assert dry.diffs[0].added == ("web-1",)
    assert service.generation == 0
    applied = await service.apply(fleet)
    again = await service.apply(fleet)
    assert (applied.generation, again.generation, again.changed) == (1, 1, False)
    assert again.op_id != applied.op_id


async def test_invalid_or_stale_applies_change_nothing(
    service: MasterService, fleet_of: FleetOf
) -> None:
    await service.apply(fleet_of({"host-a": [("web-1", "a")]}))
    with pytest.raises(StaleGenerationError) as stale:
        await service.apply(fleet_of({"host-a": [("web-2", "a")]}), expected_generation=0)
    assert stale.value.op_id.startswith("op-")
    bad = Fleet((("host-a", (VmAssignment("BAD", "h", "/nix/store/x"),)),))
    with pytest.raises(ValidationError) as invalid:
        await service.apply(bad)
    assert any("workers.host-a.vms[0].id" in d for d in invalid.value.details)
    status = await service.fleet_status()
    assert status.generation == 1
    assert status.workers[0].vm_count == 1


async def test_a_dead_worker_does_not_block_apply_or_others(
    service: MasterService, fleet_of: FleetOf
) -> None:
    dead, alive = FakeNode(hang=True), FakeNode()
    await service.register(WorkerInfo("host-dead"), dead)
    await service.register(WorkerInfo("host-ok"), alive)
    with trio.fail_after(0.5):  # well under the push timeout
        await service.apply(fleet_of({"host-dead": [("a", "a")], "host-ok": [("b", "b")]}))
    await settle()
    assert [p.generation for p in alive.pushed] == [1]
    # After the push timeout the dead worker's session is closed.
    with trio.fail_after(10):
        while not dead.closed:
            await trio.sleep(0.05)
    (dead_status,) = [
        w for w in (await service.fleet_status()).workers if w.worker_id == "host-dead"
    ]
    assert not dead_status.connected


async def test_reregistering_replaces_the_old_session(service: MasterService) -> None:
    old, new = FakeNode(), FakeNode()
    old_token = await service.register(WorkerInfo("host-a"), old)
    new_token = await service.register(WorkerInfo("host-a"), new)
    await settle()
    assert old.closed and not new.closed
    with pytest.raises(UnavailableError):
        await service.get_assignment(old_token, 0)
    assignment, changed = await service.get_assignment(new_token, 0)
    assert (assignment.generation, changed) == (0, False)
    # The old connection's late disconnect does not unseat the new session.
    await service.unregister(old_token)
    assert (await service.fleet_status()).workers[0].connected


async def test_get_assignment_reports_changes_only(
    service: MasterService, fleet_of: FleetOf
) -> None:
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    result = await service.apply(fleet_of({"host-a": [("web-1", "a")]}))
    assignment, changed = await service.get_assignment(token, 0)
    assert changed and assignment.generation == result.generation and len(assignment.vms) == 1
    same, changed = await service.get_assignment(token, result.generation)
    assert not changed and same.vms == ()


async def test_reports_are_bound_to_the_session_worker(service: MasterService) -> None:
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    await service.report_status(token, WorkerStatus("host-a", 0))
    with pytest.raises(UnauthorizedError):
        await service.report_status(token, WorkerStatus("host-b", 0))
    with pytest.raises(UnauthorizedError):
        await service.report_metrics(token, MetricsReport("host-b", ()))
    status = await service.fleet_status()
    assert status.workers[0].status == WorkerStatus("host-a", 0)
    assert status.workers[0].last_report_unix_ms > 0


async def test_status_changes_merge_into_the_sessions_last_status(
    service: MasterService, fleet_of: FleetOf
) -> None:
    def running(*ids: str) -> tuple[VmStatus, ...]:
        return tuple(VmStatus(i, Phase.RUNNING) for i in ids)

    await service.apply(fleet_of({"host-a": [("a", "a"), ("b", "a"), ("c", "a")]}))
    await service.apply(fleet_of({"host-a": [("a", "a"), ("b", "b"), ("c", "a")]}))
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    with pytest.raises(ValidationError, match="before a full status"):
        await service.report_status_changes(token, StatusChanges("host-a", 1))
    await service.report_status(token, WorkerStatus("host-a", 1, running("a", "b")))
    failed = VmStatus("b", Phase.FAILED, message="boom")
    await service.report_status_changes(
        token, StatusChanges("host-a", 2, changed=(failed, *running("c")), removed=("a",))
    )
    merged = WorkerStatus("host-a", 2, (failed, *running("c")))
    assert (await service.fleet_status()).workers[0].status == merged
    # Changes that do not fit leave the status as it was.
    with pytest.raises(ValidationError, match="'a', which the last status"):
        await service.report_status_changes(token, StatusChanges("host-a", 3, removed=("a",)))
    with pytest.raises(UnauthorizedError):
        await service.report_status_changes(token, StatusChanges("host-b", 3))
    assert (await service.fleet_status()).workers[0].status == merged
    # A new session's changes never apply to what the old one reported.
    new_token = await service.register(WorkerInfo("host-a"), FakeNode())
    with pytest.raises(ValidationError, match="before a full status"):
        await service.report_status_changes(new_token, StatusChanges("host-a", 3))


async def test_status_changes_over_the_vm_limit_are_refused(
    service: MasterService, monkeypatch: pytest.MonkeyPatch, fleet_of: FleetOf
) -> None:
    await service.apply(fleet_of({"host-a": [("a", "a"), ("b", "a"), ("c", "a")]}))
    monkeypatch.setattr(LIMITS, "max_vms_per_worker", 2)
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    await service.report_status(token, WorkerStatus("host-a", 1, (VmStatus("a", Phase.RUNNING),)))
    more = tuple(VmStatus(i, Phase.PENDING) for i in ("b", "c"))
    with pytest.raises(LimitExceededError, match="3 VMs, over the limit of 2"):
        await service.report_status_changes(token, StatusChanges("host-a", 1, changed=more))
    (worker,) = (await service.fleet_status()).workers
    assert worker.status is not None and [v.id for v in worker.status.vms] == ["a"]


async def test_events_are_bounded(service: MasterService, fleet_of: FleetOf) -> None:
    await service.apply(fleet_of({"host-a": [("vm-0", "a"), ("vm-1", "a")]}))
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    events = [VmEvent(f"vm-{i % 2}", EventKind.BOOTED, str(i)) for i in range(10)]
    await service.report_events(token, events)
    assert [e.event.message for e in await service.recent_events()] == ["5", "6", "7", "8", "9"]
    # "4" left vm-0's ring with the overall oldest.
    assert [e.event.message for e in await service.recent_events("vm-0")] == ["6", "8"]
    assert [e.event.message for e in await service.recent_events("vm-1", 2)] == ["7", "9"]


async def test_disconnect_is_visible_in_status(service: MasterService, fleet_of: FleetOf) -> None:
    await service.apply(fleet_of({"host-a": [("web-1", "a")]}))
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    await service.unregister(token)
    (worker,) = (await service.fleet_status()).workers
    assert not worker.connected and worker.since_unix_ms > 0


# ------------------------------------------------------------ blocking reads


async def test_the_change_index_moves_with_what_status_shows(
    service: MasterService, fleet_of: FleetOf
) -> None:
    seen = [(await service.fleet_status()).change_index]

    def moved() -> bool:
        index = service.change_index
        changed = index != seen[-1]
        seen.append(index)
        return changed

    token = await service.register(WorkerInfo("host-a"), FakeNode())
    assert moved()
    fleet = fleet_of({"host-a": [("web-1", "a")]})
    result = await service.apply(fleet)
    assert moved()
    await service.apply(fleet)  # no-op
    await service.apply(fleet_of({"host-a": [("web-1", "b")]}), dry_run=True)
    assert not moved()
    await service.report_metrics(token, MetricsReport("host-a", ()))
    assert not moved()  # metrics are not in a status
    await service.report_status(token, WorkerStatus("host-a", result.generation))
    assert moved()
    await service.report_events(token, [VmEvent("web-1", EventKind.BOOTED, "up")])
    assert moved()
    description = await service.describe_vm("web-1")
    assert description.change_index == service.change_index
    await service.unregister(token)
    assert moved()
    assert seen == sorted(seen)


async def test_wait_change_blocks_until_a_report_and_no_longer(
    service: MasterService, fleet_of: FleetOf
) -> None:
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    result = await service.apply(fleet_of({"host-a": [("web-1", "a")]}))
    index = service.change_index
    # Another index (a stale one, one from before a restart) answers at once,
    # and so does a zero timeout.
    with trio.fail_after(1):
        assert await service.wait_change(index - 1, 60) == index
        assert await service.wait_change(index, 0) == index
    answered: list[int] = []

    async def waiter() -> None:
        answered.append(await service.wait_change(index, 60))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        nursery.start_soon(waiter)
        await settle()
        assert answered == []  # nothing changed: both still wait
        await service.report_status(token, WorkerStatus("host-a", result.generation))
    assert answered == [index + 1, index + 1]
    # Nothing changes: the wait ends with its timeout, the index unchanged.
    with trio.fail_after(5):
        assert await service.wait_change(index + 1, 0.05) == index + 1


async def test_waiters_are_bounded(tmp_path: Path) -> None:
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        svc = MasterService(store, max_waiters=2)
        await nursery.start(svc.run)
        index = svc.change_index
        for _ in range(2):
            nursery.start_soon(svc.wait_change, index, 60)
        await settle()
        with pytest.raises(LimitExceededError, match="poll without waiting"):
            await svc.wait_change(index, 60)
        nursery.cancel_scope.cancel()
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        svc2 = MasterService(store, max_waiters=1)
        await nursery.start(svc2.run)
        # A restarted master's index does not go back (wall clock based).
        assert svc2.change_index > index
        # A wait that is cancelled gives its slot back.
        with trio.move_on_after(0.01):
            await svc2.wait_change(svc2.change_index, 60)
        assert await svc2.wait_change(svc2.change_index, 0.01) == svc2.change_index
        nursery.cancel_scope.cancel()


async def test_status_changes_in_flight_together_are_merged_one_after_the_other(
    tmp_path: Path, fleet_of: FleetOf, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker's link keeps one status report in flight, but the master
    does not rely on it: a second change of the session that arrives while
    the first one's store write runs is merged into what the first left,
    so neither one's VM is lost (each merge used to start from the status
    before both)."""
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        service = MasterService(store, push_timeout=1.0)
        await nursery.start(service.run)
        await service.apply(fleet_of({"host-a": [("a", "a"), ("b", "a")]}))
        token = await service.register(WorkerInfo("host-a"), FakeNode())
        await service.report_status(token, WorkerStatus("host-a", 1))
        writing, release = trio.Event(), trio.Event()
        write_status = store.write_status

        async def held_write(write: StatusWrite) -> Any:
            writing.set()
            await release.wait()
            return await write_status(write)

        monkeypatch.setattr(store, "write_status", held_write)
        done: list[str] = []

        async def report(vm_id: str) -> None:
            changed = (VmStatus(vm_id, Phase.RUNNING),)
            await service.report_status_changes(token, StatusChanges("host-a", 1, changed=changed))
            done.append(vm_id)

        nursery.start_soon(report, "a")
        await writing.wait()
        nursery.start_soon(report, "b")
        await settle()
        release.set()
        while len(done) < 2:
            await settle()
        status = (await service.fleet_status()).workers[0].status
        assert status is not None
        assert sorted(vm.id for vm in status.vms) == ["a", "b"]
        nursery.cancel_scope.cancel()


async def test_a_report_during_the_restore_after_the_database_returned_is_not_lost(
    tmp_path: Path, fleet_of: FleetOf, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restore after the database's return writes again, whole, the
    status each session delivered last; a status change of the session
    that arrives while that write runs is merged after it, not before it
    (the restore's write would then put the older status back, in the store
    and in the session)."""
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        service = MasterService(store, push_timeout=1.0)
        await nursery.start(service.run)
        await service.apply(fleet_of({"host-a": [("a", "a")]}))
        token = await service.register(WorkerInfo("host-a"), FakeNode())
        await service.report_status(token, WorkerStatus("host-a", 1))
        writing, release = trio.Event(), trio.Event()
        write_status = store.write_status

        async def held_write(write: StatusWrite) -> Any:
            if not writing.is_set():  # the restore's
                writing.set()
                await release.wait()
            return await write_status(write)

        monkeypatch.setattr(store, "write_status", held_write)
        done: list[str] = []

        async def restore() -> None:
            # What the syncer calls once the database is back (a test of the
            # step itself: taking the store away and back is the HA tests').
            await service._restore_statuses()
            done.append("restore")

        async def report() -> None:
            changed = (VmStatus("a", Phase.RUNNING),)
            await service.report_status_changes(token, StatusChanges("host-a", 1, changed=changed))
            done.append("report")

        nursery.start_soon(restore)
        await writing.wait()
        nursery.start_soon(report)
        await settle()
        release.set()
        while len(done) < 2:
            await settle()
        assert done == ["restore", "report"]
        status = (await service.fleet_status()).workers[0].status
        assert status == WorkerStatus("host-a", 1, (VmStatus("a", Phase.RUNNING),))
        stored = await store.worker("host-a")
        assert stored is not None and stored.status == status
        nursery.cancel_scope.cancel()


async def test_events_a_master_stores_alone_are_kept_as_stored_not_read_back(
    tmp_path: Path, fleet_of: FleetOf
) -> None:
    """On a store only this master writes, the events of a report go into
    its rings as stored (seqs included) without a read of the store; with
    reports from many workers at once, whose writes return out of order,
    they hold what the store holds, in its order, as a master started
    afterwards on it shows (each VM's events within what the store keeps
    of one VM: see ``_add_events``)."""
    reads = 0
    writes = 0

    class Counting(PassThroughStore):
        async def events_since(self, seq: int, limit: int) -> Any:
            nonlocal reads
            reads += 1
            return await self._store.events_since(seq, limit)

        async def add_events(self, *args: Any, **kw: Any) -> int:
            nonlocal writes
            writes += 1
            newest: int = await self._store.add_events(*args, **kw)
            # Writes return late by turns: in the store's order only if the
            # master keeps it (its event lock).
            await trio.sleep(0.002 * (writes % 3))
            return newest

    workers = [f"host-{i}" for i in range(6)]
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        service = MasterService(
            Counting(store),  # type: ignore[arg-type]
            push_timeout=1.0,
            events_per_vm=8,  # all of a VM's: only the bound on all of them trims
            events_total=30,
            sync_interval=3600,  # no backstop comparison (it may read events) meanwhile
        )
        await nursery.start(service.run)
        await service.apply(fleet_of({w: [(f"vm-{w}", "a")] for w in workers}))
        tokens = {w: await service.register(WorkerInfo(w), FakeNode()) for w in workers}
        reads_before = reads

        async def report(worker_id: str) -> None:
            for batch in range(4):
                await service.report_events(
                    tokens[worker_id],
                    [
                        VmEvent(f"vm-{worker_id}", EventKind.BOOTED, f"{batch}.{i}")
                        for i in range(2)
                    ],
                )

        async with trio.open_nursery() as reporters:
            for w in workers:
                reporters.start_soon(report, w)
        assert reads == reads_before  # nothing read back
        shown = await service.recent_events(limit=100)
        stored = await store.events_since(0, 100)
        assert len(shown) == 30  # the bound, of 48 reported
        assert shown == stored
        assert [e.seq for e in shown] == sorted(e.seq for e in shown)
        for w in workers:
            assert await service.recent_events(f"vm-{w}") == tuple(
                e for e in stored if e.event.vm_id == f"vm-{w}"
            )
        nursery.cancel_scope.cancel()
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        again = MasterService(store, push_timeout=1.0, events_per_vm=8, events_total=30)
        await nursery.start(again.run)
        assert await again.recent_events(limit=100) == shown
        nursery.cancel_scope.cancel()


async def test_events_a_failed_write_committed_are_not_skipped(
    tmp_path: Path, fleet_of: FleetOf
) -> None:
    """A write of events that committed but answered with an error (the
    connection lost after the commit) is not skipped by the next report's
    events: that write reads back everything after the cursor."""
    failing = [True]

    class CommitThenFail(PassThroughStore):
        async def add_events(self, *args: Any, **kw: Any) -> int:
            newest: int = await self._store.add_events(*args, **kw)
            if failing[0]:
                failing[0] = False
                raise UnavailableError("the answer was lost after the commit")
            return newest

    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        service = MasterService(
            CommitThenFail(store),  # type: ignore[arg-type]
            push_timeout=1.0,
            sync_interval=3600,
        )
        await nursery.start(service.run)
        await service.apply(fleet_of({"host-a": [("vm-a", "a")]}))
        token = await service.register(WorkerInfo("host-a"), FakeNode())
        with pytest.raises(UnavailableError, match="lost after the commit"):
            await service.report_events(token, [VmEvent("vm-a", EventKind.BOOTED, "first")])
        await service.report_events(token, [VmEvent("vm-a", EventKind.BOOTED, "second")])
        shown = await service.recent_events()
        assert [e.event.message for e in shown] == ["first", "second"]
        assert shown == await store.events_since(0, 10)
        nursery.cancel_scope.cancel()


async def test_a_status_written_again_as_the_database_goes_away_is_written_once_more(
    tmp_path: Path, fleet_of: FleetOf
) -> None:
    """The database comes back, the master writes its sessions' statuses
    again, and the database goes away before that write is done (seen once
    on PostgreSQL: the write committed on a server that was then restarted
    from an older copy). The master must not serve as caught up: once the
    database is back again it writes the statuses once more."""
    health: list[Callable[[bool, str], None]] = []
    changes: list[Callable[[Change], None]] = []
    writes: list[int] = []
    gate: list[trio.Event] = []
    entered = trio.Event()
    written = trio.Event()

    class Watched(PassThroughStore):
        async def watch(self, on_change: Any, on_health: Any, *, task_status: Any) -> None:
            health.append(on_health)
            changes.append(on_change)
            on_health(True, "")
            task_status.started()
            await trio.sleep_forever()

        async def write_status(self, write: StatusWrite) -> Any:
            writes.append(write.observed_generation)
            if not gate:
                return await self._store.write_status(write)
            entered.set()
            await gate[0].wait()
            done = await self._store.write_status(write)
            written.set()
            return done

    def database(up: bool) -> None:
        health[0](up, "" if up else "database gone")
        if up:
            changes[0](Change(ChangeKind.RESYNC))

    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        service = MasterService(
            Watched(store),  # type: ignore[arg-type]
            push_timeout=1.0,
            sync_interval=3600,
        )
        await nursery.start(service.run)
        applied = await service.apply(fleet_of({"host-a": [("web-1", "a")]}))
        token = await service.register(WorkerInfo("host-a"), FakeNode())
        reported = WorkerStatus("host-a", applied.generation, ())
        await service.report_status(token, reported)
        assert writes == [applied.generation]
        database(False)
        assert not service.available
        gate.append(trio.Event())
        database(True)
        await entered.wait()  # the status is being written again...
        database(False)  # ...as the database goes away once more
        gate[0].set()
        await written.wait()
        await settle()
        assert not service.available  # what it wrote may be lost with it
        gate.clear()
        database(True)
        with trio.fail_after(10):
            while not service.available:
                await trio.sleep(0.01)
        assert writes == [applied.generation] * 3  # the report, the restore, once more
        (worker,) = (await service.fleet_status()).workers
        assert worker.status == reported
        nursery.cancel_scope.cancel()
