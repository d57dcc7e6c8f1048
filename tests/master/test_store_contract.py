"""The store port's contract, run against both adapters: SQLite (a file) and
PostgreSQL (a real server, a new database per test).

Everything here holds for both; what only one adapter does (SQLite's file
lock and migrations from its old schemas; PostgreSQL's concurrent masters
and notifications) is at the end, marked by the adapter it needs."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio

from procurator.core.errors import PermanentError, ProcuratorError, StaleGenerationError
from procurator.core.models import (
    EventKind,
    Phase,
    PowerChange,
    PowerState,
    VmAssignment,
    VmEvent,
    VmStatus,
    WorkerDiff,
    WorkerInfo,
)
from procurator.core.snapshot import SnapshotInfo
from procurator.master.store import (
    SCHEMA_VERSION,
    AppliedRequest,
    Change,
    ChangeKind,
    Fence,
    FencedError,
    Removal,
    RemovalAck,
    RequestRecordedError,
    SessionEndedError,
    StatusWrite,
    Store,
    open_store,
)

PATH_A = "/nix/store/" + "a" * 32 + "-a"


def vm(vm_id: str, vm_hash: str = "h") -> VmAssignment:
    return VmAssignment(vm_id, vm_hash, PATH_A, PowerState.PAUSED, 2, 256)


def running(vm_id: str, message: str = "") -> VmStatus:
    return VmStatus(vm_id, Phase.RUNNING, "h", message, 0, "10.0.0.2", PowerState.RUNNING, "op-1")


@dataclass
class Db:
    """One database, whichever adapter: open stores on it, look inside."""

    kind: str
    target: str  # a SQLite path or a PostgreSQL URL

    async def open(self, **kwargs: Any) -> Any:
        return await open_store(self.target, **kwargs)

    def script(self, statements: str) -> None:
        """Run several statements behind the store's back (committed)."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.target) as conn:
                conn.executescript(statements)
            return
        with psycopg.connect(self.target, autocommit=True) as conn:
            conn.execute(statements.encode())

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement behind the store's back (committed)."""
        if self.kind == "sqlite":
            with sqlite3.connect(self.target) as conn:
                return conn.execute(statement, params).fetchall()
        with psycopg.connect(self.target, autocommit=True) as conn:
            cursor = conn.execute(statement.replace("?", "%s"), params)
            return cursor.fetchall() if cursor.description else []


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Db:
    if request.param == "sqlite":
        return Db("sqlite", str(tmp_path / "m.db"))
    return Db("postgresql", request.getfixturevalue("pg_url"))


@pytest.fixture
async def store(db: Db) -> AsyncIterator[Store]:
    opened = await db.open()
    try:
        yield opened
    finally:
        await opened.aclose()


async def reopened(db: Db, store: Store) -> Store:
    await store.aclose()
    result: Store = await db.open()
    return result


# ---------------------------------------------------------------- the fleet


async def test_generations_survive_reopening_and_keep_counting(db: Db, store: Store) -> None:
    assert (await store.load()).generation == 0
    g1 = await store.commit(
        expected_generation=0, changes={"w1": [vm("a")]}, before={}, op_id="op-1", unix_ms=1
    )
    g2 = await store.commit(
        expected_generation=g1,
        changes={"w1": []},
        before={"w1": [vm("a")]},
        op_id="op-2",
        unix_ms=2,
    )
    assert (g1, g2) == (1, 2)
    store = await reopened(db, store)
    try:
        stored = await store.load()
        # Emptied workers keep an (empty) assignment at their generation.
        assert stored.generation == 2
        assert stored.assignments["w1"].vms == ()
        assert (stored.assignments["w1"].generation, stored.assignments["w1"].op_id) == (2, "op-2")
        g3 = await store.commit(
            expected_generation=2, changes={"w2": [vm("b")]}, before={}, op_id="op-3", unix_ms=3
        )
        assert g3 == 3
        stored = await store.load()
        assert stored.assignments["w2"].vms == (vm("b"),)
        assert stored.assignments["w1"].generation == 2
        # What changed after a generation, for a master catching up.
        delta = await store.fleet_since(2)
        assert (delta.generation, list(delta.assignments)) == (3, ["w2"])
        assert (await store.fleet_since(0)).assignments.keys() == {"w1", "w2"}
        assert (await store.fleet_since(3)).assignments == {}
    finally:
        await store.aclose()


async def test_a_stale_commit_changes_nothing(store: Store) -> None:
    await store.commit(
        expected_generation=0, changes={"w": [vm("a")]}, before={}, op_id="o", unix_ms=1
    )
    with pytest.raises(StaleGenerationError, match="at generation 1, not 0"):
        await store.commit(
            expected_generation=0,
            changes={"w": [vm("b")]},
            before={"w": [vm("a")]},
            op_id="o2",
            unix_ms=2,
        )
    stored = await store.load()
    assert stored.generation == 1
    assert [v.id for v in stored.assignments["w"].vms] == ["a"]


async def test_a_failing_apply_is_rolled_back_entirely(store: Store) -> None:
    await store.commit(
        expected_generation=0, changes={"w1": [vm("a")]}, before={}, op_id="o", unix_ms=1
    )
    # The same VM id on two workers violates the primary key midway.
    with pytest.raises(ProcuratorError):
        await store.commit(
            expected_generation=1,
            changes={"w2": [vm("x")], "w3": [vm("x")]},
            before={},
            op_id="o2",
            unix_ms=2,
        )
    stored = await store.load()
    assert stored.generation == 1
    assert set(stored.assignments) == {"w1"}
    # A VM may move between workers in one apply.
    await store.commit(
        expected_generation=1,
        changes={"w1": [], "w2": [vm("a")]},
        before={"w1": [vm("a")]},
        op_id="o3",
        unix_ms=3,
    )
    assert (await store.load()).assignments["w2"].vms == (vm("a"),)


async def test_only_changed_rows_are_written(db: Db, store: Store) -> None:
    first = [vm("a"), vm("b"), vm("c"), vm("d")]
    second = [vm("a"), vm("b", "h2"), VmAssignment("d", "h", PATH_A), vm("e")]
    marked = "/nix/store/" + "m" * 32 + "-untouched"
    await store.commit(expected_generation=0, changes={"w": first}, before={}, op_id="o", unix_ms=1)
    # Mark every stored row behind the store's back: a row the next apply
    # writes loses the mark, one it leaves alone keeps it.
    db.sql("UPDATE vms SET nix_store_path = ?", (marked,))
    await store.commit(
        expected_generation=1, changes={"w": second}, before={"w": first}, op_id="o2", unix_ms=2
    )
    rows = dict(db.sql("SELECT vm_id, nix_store_path FROM vms"))
    # a unchanged; b replaced and d updated (rewritten); c removed; e added.
    assert rows == {"a": marked, "b": PATH_A, "d": PATH_A, "e": PATH_A}


@pytest.mark.parametrize(
    "before",
    [
        pytest.param({}, id="worker-believed-empty"),
        pytest.param({"w": [vm("a"), vm("b")]}, id="one-more-believed"),
        pytest.param({"w": [vm("z")]}, id="another-vm-believed"),
    ],
)
async def test_a_commit_against_a_store_it_does_not_mirror_fails_whole(
    store: Store, before: dict[str, list[VmAssignment]]
) -> None:
    await store.commit(
        expected_generation=0, changes={"w": [vm("a")]}, before={}, op_id="o", unix_ms=1
    )
    with pytest.raises(ProcuratorError, match="nothing was applied"):
        await store.commit(
            expected_generation=1, changes={"w": [vm("c")]}, before=before, op_id="o2", unix_ms=2
        )
    stored = await store.load()
    assert stored.generation == 1
    assert stored.assignments["w"].vms == (vm("a"),)


# ---------------------------------------------------------------- request ids


def diff(worker_id: str, *added: str) -> WorkerDiff:
    change = PowerChange("x", PowerState.RUNNING, PowerState.PAUSED)
    return WorkerDiff(worker_id, added=added, removed=("old",), power_changed=(change,))


async def test_a_request_id_is_committed_with_its_apply_or_not_at_all(db: Db, store: Store) -> None:
    g1 = await store.commit(
        expected_generation=0,
        changes={"w": [vm("a")]},
        before={},
        op_id="op-1",
        unix_ms=1,
        request_id="req-1",
        fleet_digest="digest-1",
        diffs=[diff("w", "a")],
    )
    # Stale: neither the fleet nor the request id is stored.
    with pytest.raises(StaleGenerationError):
        await store.commit(
            expected_generation=0,
            changes={"w": [vm("b")]},
            before={"w": [vm("a")]},
            op_id="op-2",
            unix_ms=2,
            request_id="req-2",
            fleet_digest="digest-2",
        )
    # A request id recorded already: the whole apply fails, typed.
    with pytest.raises(RequestRecordedError, match="req-1 is recorded already; nothing was"):
        await store.commit(
            expected_generation=g1,
            changes={"w": [vm("b")]},
            before={"w": [vm("a")]},
            op_id="op-3",
            unix_ms=3,
            request_id="req-1",
            fleet_digest="digest-3",
        )
    assert await store.find_request("req-2") is None
    store = await reopened(db, store)
    try:
        found = await store.find_request("req-1")
        stored = await store.load()
    finally:
        await store.aclose()
    assert found == AppliedRequest("req-1", g1, "op-1", "digest-1", (diff("w", "a"),))
    assert stored.generation == g1 and stored.assignments["w"].vms == (vm("a"),)
    assert db.sql("SELECT generation, request_id FROM applies") == [(1, "req-1")]


async def test_only_the_newest_request_ids_are_kept(db: Db) -> None:
    store = await db.open(requests_kept=2)
    try:
        generation, vms = 0, []
        for n in range(1, 5):
            new = [*vms, vm(f"v{n}")]
            generation = await store.commit(
                expected_generation=generation,
                changes={"w": new},
                before={"w": vms},
                op_id=f"op-{n}",
                unix_ms=n,
                request_id=f"req-{n}" if n != 3 else "",
                fleet_digest="d",
            )
            vms = new
        found = [await store.find_request(f"req-{n}") for n in range(1, 5)]
    finally:
        await store.aclose()
    assert [f.generation if f else None for f in found] == [None, 2, None, 4]
    # The apply log keeps every apply's request id.
    assert db.sql("SELECT request_id FROM applies ORDER BY generation") == [
        ("req-1",),
        ("req-2",),
        ("",),
        ("req-4",),
    ]


# ---------------------------------------------------------------- workers


async def registered(store: Store, worker_id: str, master_id: str = "m1") -> int:
    worker = await store.register(
        worker_id, master_id, WorkerInfo(worker_id, "v1"), unix_ms=5, lease_ms=60_000
    )
    assert worker.registration is not None
    return worker.registration.session


def status_write(worker_id: str, session: int, observed: int, *vms: VmStatus, **kw: Any) -> Any:
    return StatusWrite(worker_id, "m1", session, observed, 100, upserts=vms, **kw)


async def test_removals_are_recorded_by_the_apply_and_confirmed_by_the_worker(
    db: Db, store: Store
) -> None:
    s1 = await registered(store, "w1")
    g1 = await store.commit(
        expected_generation=0,
        changes={"w1": [vm("a"), vm("b"), vm("c")]},
        before={},
        op_id="o1",
        unix_ms=1,
    )
    # b removed, c moved to w2.
    g2 = await store.commit(
        expected_generation=g1,
        changes={"w1": [vm("a")], "w2": [vm("c")]},
        before={"w1": [vm("a"), vm("b"), vm("c")]},
        op_id="o2",
        unix_ms=2,
    )
    assert (await store.load()).removals == {"w1": {"b": Removal(g2), "c": Removal(g2)}}
    assert (await store.worker("w1")).removals == {"b": Removal(g2), "c": Removal(g2)}
    # A rejected commit records no removal.
    with pytest.raises(StaleGenerationError):
        await store.commit(
            expected_generation=g1,
            changes={"w1": []},
            before={"w1": [vm("a")]},
            op_id="o3",
            unix_ms=3,
        )
    # Observed too old: nothing confirmed.
    await store.write_status(status_write("w1", s1, g1, ack=RemovalAck(g1, 100)))
    assert (await store.worker("w1")).removals == {"b": Removal(g2), "c": Removal(g2)}
    await store.write_status(status_write("w1", s1, g2, ack=RemovalAck(g2, 100)))
    # c taken off w2 too: pending there; w1's confirmations stay.
    g3 = await store.commit(
        expected_generation=g2, changes={"w2": []}, before={"w2": [vm("c")]}, op_id="o4", unix_ms=4
    )
    store = await reopened(db, store)
    try:
        assert (await store.load()).removals == {
            "w1": {"b": Removal(g2, 100), "c": Removal(g2, 100)},
            "w2": {"c": Removal(g3)},
        }
        # Back on w1 and off again: pending there anew.
        g4 = await store.commit(
            expected_generation=g3,
            changes={"w1": [vm("a"), vm("c")]},
            before={"w1": [vm("a")]},
            op_id="o5",
            unix_ms=5,
        )
        await store.commit(
            expected_generation=g4,
            changes={"w1": [vm("a")]},
            before={"w1": [vm("a"), vm("c")]},
            op_id="o6",
            unix_ms=6,
        )
        # Forgetting old confirmations is a singleton duty: fenced.
        epoch = await store.acquire_lease("leader", "m1", lease_ms=60_000)
        assert epoch is not None
        assert await store.forget_removals(
            Fence("leader", "m1", epoch), confirmed_before_unix_ms=150
        ) == ["w1"]
        assert (await store.load()).removals == {
            "w1": {"c": Removal(g4 + 1)},
            "w2": {"c": Removal(g3)},
        }
    finally:
        await store.aclose()


async def test_sessions_are_numbered_and_only_the_newest_may_write(store: Store) -> None:
    first = await registered(store, "w")
    second = await registered(store, "w", master_id="m2")  # failed over to m2
    assert second == first + 1
    worker = await store.worker("w")
    assert worker.registration is not None
    assert (worker.registration.master_id, worker.registration.connected) == ("m2", True)
    assert worker.registration.info == WorkerInfo("w", "v1")
    # The old master's late writes change nothing.
    with pytest.raises(SessionEndedError, match="register again"):
        await store.write_status(status_write("w", first, 0, running("a")))
    assert await store.unregister("w", "m1", first, unix_ms=9) is None
    assert (await store.worker("w")).status is None
    # m2 renews what it holds, m1 nothing.
    assert await store.renew_sessions("m2", lease_ms=60_000) == {"w": second}
    assert await store.renew_sessions("m1", lease_ms=60_000) == {}
    before = (await store.worker("w")).version
    written = await store.unregister("w", "m2", second, unix_ms=10)
    assert written is not None and written.previous == before
    worker = await store.worker("w")
    assert worker.registration is not None and worker.version == written.version
    assert (worker.registration.connected, worker.registration.since_unix_ms) == (False, 10)
    assert await store.renew_sessions("m2", lease_ms=60_000) == {}
    # The session is still alive on m2 (the store could not be told while
    # it was away): reclaimed, unless the worker registered since.
    assert await store.reclaim_session("w", "m2", second, unix_ms=11, lease_ms=60_000)
    assert (await store.worker("w")).registration.connected  # type: ignore[union-attr]
    third = await registered(store, "w", master_id="m3")
    assert await store.reclaim_session("w", "m2", second, unix_ms=12, lease_ms=60_000) is None
    # A master alone on its store ends what an earlier run left connected.
    assert await store.end_sessions("m4", unix_ms=13) == ["w"]
    assert await store.reclaim_session("w", "m3", third, unix_ms=14, lease_ms=60_000)


_LOG_WRITES = {
    "sqlite": """
        CREATE TABLE writes (vm_id TEXT);
        CREATE TRIGGER written AFTER INSERT ON vm_status BEGIN
            INSERT INTO writes VALUES (NEW.vm_id); END;
        CREATE TRIGGER rewritten AFTER UPDATE ON vm_status BEGIN
            INSERT INTO writes VALUES (NEW.vm_id); END;
    """,
    "postgresql": """
        CREATE TABLE writes (vm_id TEXT);
        CREATE FUNCTION log_write() RETURNS trigger AS $$
            BEGIN INSERT INTO writes VALUES (NEW.vm_id); RETURN NEW; END $$ LANGUAGE plpgsql;
        CREATE TRIGGER written AFTER INSERT OR UPDATE ON vm_status
            FOR EACH ROW EXECUTE FUNCTION log_write();
    """,
}


async def test_status_writes_change_only_the_rows_that_differ(db: Db, store: Store) -> None:
    """A status report is the hottest write: a whole report rewrites only
    the VMs whose status changed (a trigger logs every row written)."""
    session = await registered(store, "w")
    await store.write_status(
        status_write("w", session, 0, running("a"), running("b"), running("c"), whole=True)
    )
    db.script(_LOG_WRITES[db.kind])
    # Whole again: b changed, c gone, d new; a unchanged.
    await store.write_status(
        status_write("w", session, 1, running("a"), running("b", "new"), running("d"), whole=True)
    )
    assert sorted(db.sql("SELECT vm_id FROM writes")) == [("b",), ("d",)]
    assert sorted(db.sql("SELECT vm_id FROM vm_status WHERE worker_id = 'w'")) == [
        ("a",),
        ("b",),
        ("d",),
    ]
    # A change report: what changed and what went.
    before = (await store.worker("w")).version
    written = await store.write_status(status_write("w", session, 2, running("e"), deletes=("a",)))
    worker = await store.worker("w")
    assert written.previous == before and written.version == worker.version > before
    assert worker.reported_unix_ms == 100
    assert worker.status is not None and worker.status.observed_generation == 2
    assert sorted(v.id for v in worker.status.vms) == ["b", "d", "e"]
    assert next(v for v in worker.status.vms if v.id == "b") == running("b", "new")
    assert (await store.load()).workers["w"] == worker


async def test_every_change_to_a_worker_moves_its_version(store: Store) -> None:
    seen = [0]

    async def moved() -> None:
        version = (await store.versions()).workers["w"]
        assert version > seen[-1]
        seen.append(version)

    session = await registered(store, "w")
    await moved()
    await store.write_status(status_write("w", session, 0, whole=True))
    await moved()
    await store.commit(
        expected_generation=0, changes={"w": [vm("a")]}, before={}, op_id="o", unix_ms=1
    )
    await store.commit(
        expected_generation=1, changes={"w": []}, before={"w": [vm("a")]}, op_id="o", unix_ms=2
    )
    await moved()  # a removal
    await store.unregister("w", "m1", session, unix_ms=3)
    await moved()
    assert (await store.versions()).generation == 2


# ---------------------------------------------------------------- events


def event(vm_id: str, message: str) -> VmEvent:
    return VmEvent(vm_id, EventKind.BOOTED, message, "op-1", 7)


async def test_events_get_growing_seqs_and_stay_bounded(db: Db, store: Store) -> None:
    first = await store.add_events("w", [event("a", str(i)) for i in range(5)], per_vm=3, total=6)
    stored = await store.load(events=100)
    assert [e.event.message for e in stored.events] == ["2", "3", "4"]  # 3 per VM
    assert stored.event_seq == first == stored.events[-1].seq
    assert [e.seq for e in stored.events] == [first - 2, first - 1, first]
    assert stored.events[0].worker_id == "w" and stored.events[0].event == event("a", "2")
    newest = await store.add_events("w", [event("b", "x"), event("c", "y")], per_vm=3, total=4)
    assert newest > first
    kept = await store.events_since(0, 100)
    assert [e.event.message for e in kept] == ["3", "4", "x", "y"]  # 4 in all
    assert [e.seq for e in kept[2:]] == [newest - 1, newest]
    assert [e.event.message for e in await store.events_since(first, 1)] == ["x"]
    # Seqs follow the clock in microseconds (they outgrow a restart).
    assert first > 1_600_000_000 * 10**6
    store = await reopened(db, store)
    try:
        again = await store.add_events("w", [event("a", "z")], per_vm=3, total=4)
    finally:
        await store.aclose()
    assert again > newest


# ---------------------------------------------------------------- leases


async def test_a_lease_has_one_holder_per_epoch_and_fences_writes(store: Store) -> None:
    epoch = await store.acquire_lease("leader", "m1", lease_ms=60_000)
    assert epoch == 1
    assert await store.acquire_lease("leader", "m2", lease_ms=60_000) is None
    fence = Fence("leader", "m1", epoch)
    assert await store.renew_lease(fence, lease_ms=200)
    lease = await store.read_lease("leader")
    assert (lease.holder, lease.epoch, lease.live) == ("m1", 1, True)
    # A worker whose lease is already over, for the duty to find.
    await store.register("w", "m1", WorkerInfo("w"), unix_ms=1, lease_ms=0)
    await trio.sleep(0.3)  # the leader's 200 ms lease runs out
    assert not (await store.read_lease("leader")).live
    assert not await store.renew_lease(fence, lease_ms=60_000)  # expired: only a new epoch
    # The old epoch may not write, even with nobody else holding the lease.
    with pytest.raises(FencedError, match="epoch 1 of m1 is over"):
        await store.expire_sessions(fence)
    assert (await store.worker("w")).registration.connected  # type: ignore[union-attr]
    second = await store.acquire_lease("leader", "m2", lease_ms=60_000)
    assert second == 2
    with pytest.raises(FencedError, match="held by m2"):
        await store.expire_sessions(fence)
    lost = await store.expire_sessions(Fence("leader", "m2", second))
    worker = await store.worker("w")
    assert worker.registration is not None and not worker.registration.connected
    assert lost == [("w", worker.registration.renewed_unix_ms)]
    assert worker.registration.since_unix_ms == worker.registration.renewed_unix_ms
    assert await store.expire_sessions(Fence("leader", "m2", second)) == []
    # Released: anyone may take it at once, in a new epoch.
    await store.release_lease(Fence("leader", "m2", second))
    assert await store.acquire_lease("leader", "m1", lease_ms=60_000) == 3


# ---------------------------------------------------------------- snapshots


def snap(worker_id: str, vm_id: str, name: str, created: int) -> SnapshotInfo:
    return SnapshotInfo(vm_id, name, "h1", PATH_A, 1 << 20, created, "op", "qemu", worker_id)


async def test_snapshots_are_recorded_per_worker_and_replaced_by_its_answers(
    db: Db, store: Store
) -> None:
    await store.put_snapshot(snap("w1", "a", "s1", 2))
    await store.put_snapshot(snap("w1", "a", "s0", 1))
    await store.put_snapshot(snap("w2", "b", "s1", 3))
    await store.put_snapshot(snap("w1", "a", "s1", 4))  # the same one, again: replaced
    assert [(s.worker_id, s.vm_id, s.name) for s in await store.snapshots()] == [
        ("w1", "a", "s0"),
        ("w2", "b", "s1"),
        ("w1", "a", "s1"),
    ]
    assert [s.name for s in await store.snapshots("a")] == ["s0", "s1"]
    await store.drop_snapshot("w1", "a", "s0")
    # A worker's answer replaces its record, of one VM or of all of them.
    await store.replace_snapshots("w1", "a", [snap("w1", "a", "s2", 5)])
    store = await reopened(db, store)
    try:
        assert [(s.worker_id, s.name) for s in await store.snapshots()] == [
            ("w2", "s1"),
            ("w1", "s2"),
        ]
        await store.replace_snapshots("w2", None, [])
        assert await store.snapshots() == (snap("w1", "a", "s2", 5),)
    finally:
        await store.aclose()


# ---------------------------------------------------------------- moving a fleet


async def test_export_and_import_move_a_fleet_between_adapters(
    db: Db, store: Store, tmp_path: Path, pg_url: str
) -> None:
    session = await registered(store, "w1")
    g1 = await store.commit(
        expected_generation=0,
        changes={"w1": [vm("a"), vm("b")], "w2": [vm("c")]},
        before={},
        op_id="o1",
        unix_ms=1,
        request_id="req-1",
        fleet_digest="d1",
        diffs=[diff("w1", "a", "b")],
    )
    g2 = await store.commit(
        expected_generation=g1,
        changes={"w1": [vm("a")]},
        before={"w1": [vm("a"), vm("b")]},
        op_id="o2",
        unix_ms=2,
    )
    await store.write_status(status_write("w1", session, g2, whole=True, ack=RemovalAck(g2, 50)))
    seq = await store.add_events("w1", [event("a", "booted")], per_vm=10, total=10)
    dump = await store.export()
    assert (dump.generation, dump.event_seq) == (g2, seq)
    # Into the other kind of database.
    other = (
        Db("postgresql", pg_url) if db.kind == "sqlite" else Db("sqlite", str(tmp_path / "x.db"))
    )
    target = await other.open()
    try:
        await target.import_dump(dump)
        stored, before = await target.load(), await store.load()
        assert (stored.generation, stored.assignments, stored.removals) == (
            before.generation,
            before.assignments,
            before.removals,
        )
        assert await target.find_request("req-1") == await store.find_request("req-1")
        assert await target.export() == dump
        # Generations go on from there; event seqs too.
        assert (
            await target.commit(
                expected_generation=g2,
                changes={"w2": []},
                before={"w2": [vm("c")]},
                op_id="o3",
                unix_ms=3,
            )
            == g2 + 1
        )
        assert await target.add_events("w1", [event("a", "x")], per_vm=10, total=10) > seq
        with pytest.raises(ProcuratorError, match=r"is not empty .* nothing was imported"):
            await target.import_dump(dump)
    finally:
        await target.aclose()


# ---------------------------------------------------------------- adapter specifics


async def test_sqlite_one_master_per_file_and_no_missing_directories(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    async with await open_store(str(db)) as store:  # type: ignore[attr-defined]
        assert store.single_master
        with pytest.raises(PermanentError, match="in use by another master"):
            await open_store(str(db))
    async with await open_store(f"sqlite://{db}"):  # type: ignore[attr-defined]
        pass
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(PermanentError, match="does not exist"):
        await open_store(str(tmp_path / "nope" / "m.db"))


_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE workers (worker_id TEXT PRIMARY KEY, generation INTEGER NOT NULL,
    op_id TEXT NOT NULL);
CREATE TABLE vms (vm_id TEXT PRIMARY KEY, worker_id TEXT NOT NULL
    REFERENCES workers(worker_id), hash TEXT NOT NULL, nix_store_path TEXT NOT NULL,
    power TEXT NOT NULL, vcpus INTEGER NOT NULL, memory_mib INTEGER NOT NULL);
CREATE TABLE applies (generation INTEGER PRIMARY KEY, op_id TEXT NOT NULL,
    unix_ms INTEGER NOT NULL, workers_changed INTEGER NOT NULL);
INSERT INTO meta VALUES ('schema_version', 1), ('generation', 7);
INSERT INTO workers VALUES ('w', 7, 'op-old');
INSERT INTO vms VALUES ('a', 'w', 'h', '/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-a',
    'running', 0, 0);
INSERT INTO applies VALUES (7, 'op-old', 1, 1);
"""


async def test_sqlite_an_old_database_is_migrated_only_when_allowed(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(_V1)
    with pytest.raises(
        PermanentError,
        match=rf"schema version 1, this procurator needs {SCHEMA_VERSION}: run .procurator master",
    ):
        await open_store(str(db), migrate=False)
    async with await open_store(str(db)) as store:  # type: ignore[attr-defined]
        stored = await store.load()
        assert stored.generation == 7 and [v.id for v in stored.assignments["w"].vms] == ["a"]
        g8 = await store.commit(
            expected_generation=7,
            changes={"w": []},
            before={"w": stored.assignments["w"].vms},
            op_id="op-new",
            unix_ms=2,
            request_id="req-new",
        )
        assert (await store.find_request("req-new")) is not None
        assert (await store.load()).removals == {"w": {"a": Removal(g8)}}
        await registered(store, "w")
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            SCHEMA_VERSION,
        )
        assert conn.execute("SELECT generation, request_id FROM applies").fetchall() == [
            (7, ""),
            (8, "req-new"),
        ]
        conn.execute("UPDATE meta SET value = 99 WHERE key = 'schema_version'")
    with pytest.raises(
        PermanentError, match=f"schema version 99; this procurator knows up to {SCHEMA_VERSION}"
    ):
        await open_store(str(db))


async def test_postgresql_masters_on_one_database_take_turns(pg_url: str) -> None:
    """Two stores (two masters) commit against the same generation at once:
    exactly one wins; the other is stale, whatever the timing."""
    one, two = await open_store(pg_url), await open_store(pg_url)
    try:
        assert not one.single_master
        results: dict[str, object] = {}

        async def attempt(name: str, store: Store) -> None:
            try:
                results[name] = await store.commit(
                    expected_generation=0,
                    changes={name: [vm(f"vm-{name}")]},
                    before={},
                    op_id=f"op-{name}",
                    unix_ms=1,
                )
            except StaleGenerationError as exc:
                results[name] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(attempt, "one", one)
            nursery.start_soon(attempt, "two", two)
        winners = [name for name, r in results.items() if r == 1]
        losers = [r for r in results.values() if isinstance(r, StaleGenerationError)]
        assert len(winners) == 1 and len(losers) == 1, results
        assert set((await two.load()).assignments) == set(winners)
    finally:
        await one.aclose()
        await two.aclose()


async def test_postgresql_every_master_hears_what_another_committed(pg_url: str) -> None:
    writer, reader = await open_store(pg_url), await open_store(pg_url)
    heard: list[Change] = []
    health: list[bool] = []
    wake = trio.Event()

    def on_change(change: Change) -> None:
        heard.append(change)
        wake.set()

    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(reader.watch, on_change, lambda ok, why: health.append(ok))
            assert health == [True] and heard == [Change(ChangeKind.RESYNC)]
            session = await registered(writer, "w")
            registered_as = (await writer.versions()).workers["w"]
            await writer.commit(
                expected_generation=0, changes={"w": [vm("a")]}, before={}, op_id="o", unix_ms=1
            )
            await writer.write_status(status_write("w", session, 1, whole=True))
            seq = await writer.add_events("w", [event("a", "x")], per_vm=5, total=5)
            versions = await writer.versions()
            want = [
                Change(ChangeKind.WORKER, registered_as, "w"),
                Change(ChangeKind.GENERATION, 1),
                Change(ChangeKind.WORKER, versions.workers["w"], "w"),
                Change(ChangeKind.EVENTS, seq),
            ]
            with trio.fail_after(10):
                while heard[1:] != want:
                    wake = trio.Event()
                    await wake.wait()
            nursery.cancel_scope.cancel()
    finally:
        await writer.aclose()
        await reader.aclose()


async def test_postgresql_schema_is_migrated_once_and_refused_when_newer(
    pg_url: str, pg: Any
) -> None:
    stores = []

    async def open_one() -> None:
        stores.append(await open_store(pg_url))

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(open_one)
    for store in stores:
        await store.aclose()
    assert pg.psql(
        "SELECT value FROM meta WHERE key = 'schema_version'", pg_url.rsplit("/", 1)[1]
    ).strip() == str(SCHEMA_VERSION)
    newer = SCHEMA_VERSION + 1
    Db("postgresql", pg_url).sql(f"UPDATE meta SET value = {newer} WHERE key = 'schema_version'")
    known = f"knows up to {SCHEMA_VERSION}"
    with pytest.raises(PermanentError, match=f"schema version {newer}; this procurator {known}"):
        await open_store(pg_url)


async def test_postgresql_errors_name_the_database_without_its_password(pg: Any) -> None:
    from procurator.core.errors import UnavailableError  # noqa: PLC0415

    url = f"postgresql://procurator:secret@127.0.0.1:{pg.port + 1}/nowhere"
    with pytest.raises(UnavailableError) as caught:
        await open_store(url)
    text = str(caught.value)
    assert f"database postgresql://procurator@127.0.0.1:{pg.port + 1}/nowhere" in text
    assert "secret" not in text
