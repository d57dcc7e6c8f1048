"""The SQLite store: one transaction per apply, generations that survive."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from procurator.core.errors import PermanentError, ProcuratorError, StaleGenerationError
from procurator.core.models import PowerChange, PowerState, VmAssignment, WorkerDiff
from procurator.master.store import AppliedRequest, FleetStore, Removal

PATH_A = "/nix/store/" + "a" * 32 + "-a"


def vm(vm_id: str, vm_hash: str = "h") -> VmAssignment:
    return VmAssignment(vm_id, vm_hash, PATH_A, PowerState.PAUSED, 2, 256)


async def test_generations_survive_reopening_and_keep_counting(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    async with await FleetStore.open(db) as store:
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
    async with await FleetStore.open(db) as store:
        stored = await store.load()
        # Emptied workers keep an (empty) assignment at their generation.
        assert stored.generation == 2
        assert stored.assignments["w1"].vms == ()
        assert stored.assignments["w1"].generation == 2
        assert stored.assignments["w1"].op_id == "op-2"
        g3 = await store.commit(
            expected_generation=2, changes={"w2": [vm("b")]}, before={}, op_id="op-3", unix_ms=3
        )
        assert g3 == 3
        stored = await store.load()
        assert stored.assignments["w2"].vms == (vm("b"),)
        assert stored.assignments["w1"].generation == 2


async def test_stale_commit_changes_nothing(tmp_path: Path) -> None:
    async with await FleetStore.open(tmp_path / "m.db") as store:
        await store.commit(
            expected_generation=0, changes={"w": [vm("a")]}, before={}, op_id="o", unix_ms=1
        )
        with pytest.raises(StaleGenerationError):
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


async def test_a_failing_apply_is_rolled_back_entirely(tmp_path: Path) -> None:
    async with await FleetStore.open(tmp_path / "m.db") as store:
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


async def test_only_changed_rows_are_written(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    first = [vm("a"), vm("b"), vm("c"), vm("d")]
    second = [vm("a"), vm("b", "h2"), VmAssignment("d", "h", PATH_A), vm("e")]
    marked = "/nix/store/" + "m" * 32 + "-untouched"
    async with await FleetStore.open(db) as store:
        await store.commit(
            expected_generation=0, changes={"w": first}, before={}, op_id="o", unix_ms=1
        )
        # Mark every stored row behind the store's back: a row the next
        # apply writes loses the mark, one it leaves alone keeps it.
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE vms SET nix_store_path = ?", (marked,))
        await store.commit(
            expected_generation=1, changes={"w": second}, before={"w": first}, op_id="o2", unix_ms=2
        )
    with sqlite3.connect(db) as conn:
        rows = dict(conn.execute("SELECT vm_id, nix_store_path FROM vms").fetchall())
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
    tmp_path: Path, before: dict[str, list[VmAssignment]]
) -> None:
    """The row delta is only right against what the store holds; a caller
    whose ``before`` is not that gets an error, and nothing changes."""
    async with await FleetStore.open(tmp_path / "m.db") as store:
        await store.commit(
            expected_generation=0, changes={"w": [vm("a")]}, before={}, op_id="o", unix_ms=1
        )
        with pytest.raises(ProcuratorError, match="nothing was applied"):
            await store.commit(
                expected_generation=1,
                changes={"w": [vm("c")]},
                before=before,
                op_id="o2",
                unix_ms=2,
            )
        stored = await store.load()
    assert stored.generation == 1
    assert stored.assignments["w"].vms == (vm("a"),)


async def test_one_master_per_database(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    async with await FleetStore.open(db):
        with pytest.raises(PermanentError, match="in use by another master"):
            await FleetStore.open(db)
    async with await FleetStore.open(db):
        pass


async def test_uses_wal_and_refuses_missing_directories(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    async with await FleetStore.open(db):
        pass
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("SELECT count(*) FROM applies").fetchone()[0] == 0
    with pytest.raises(PermanentError, match="does not exist"):
        await FleetStore.open(tmp_path / "nope" / "m.db")


# ------------------------------------------------------------ request ids


def diff(worker_id: str, *added: str) -> WorkerDiff:
    change = PowerChange("x", PowerState.RUNNING, PowerState.PAUSED)
    return WorkerDiff(worker_id, added=added, removed=("old",), power_changed=(change,))


async def test_a_request_id_is_committed_with_its_apply_or_not_at_all(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    async with await FleetStore.open(db) as store:
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
        # A request id recorded already: the whole apply fails.
        with pytest.raises(ProcuratorError, match="req-1 is recorded already; nothing was applied"):
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
    async with await FleetStore.open(db) as store:
        found = await store.find_request("req-1")
        stored = await store.load()
    assert found == AppliedRequest("req-1", g1, "op-1", "digest-1", (diff("w", "a"),))
    assert stored.generation == g1 and stored.assignments["w"].vms == (vm("a"),)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT generation, request_id FROM applies").fetchall() == [
            (1, "req-1")
        ]


async def test_only_the_newest_request_ids_are_kept(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    async with await FleetStore.open(db, requests_kept=2) as store:
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
    assert [f.generation if f else None for f in found] == [None, 2, None, 4]
    with sqlite3.connect(db) as conn:
        # The apply log keeps every apply's request id.
        assert conn.execute("SELECT request_id FROM applies ORDER BY generation").fetchall() == [
            ("req-1",),
            ("req-2",),
            ("",),
            ("req-4",),
        ]


# ------------------------------------------------------------ removals


async def test_removals_are_recorded_by_the_apply_and_confirmed_by_the_worker(
    tmp_path: Path,
) -> None:
    db = tmp_path / "m.db"
    async with await FleetStore.open(db) as store:
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
        # A rejected commit records no removal.
        with pytest.raises(StaleGenerationError):
            await store.commit(
                expected_generation=g1,
                changes={"w1": []},
                before={"w1": [vm("a")]},
                op_id="o3",
                unix_ms=3,
            )
        await store.acknowledge_removals("w1", g1, 100, 0)  # observed too old: nothing
        await store.acknowledge_removals("w2", g2, 100, 0)  # another worker: nothing
        assert (await store.load()).removals == {"w1": {"b": Removal(g2), "c": Removal(g2)}}
        await store.acknowledge_removals("w1", g2, 100, 0)
        # c taken off w2 too: pending there; w1's confirmations stay.
        g3 = await store.commit(
            expected_generation=g2,
            changes={"w2": []},
            before={"w2": [vm("c")]},
            op_id="o4",
            unix_ms=4,
        )
    async with await FleetStore.open(db) as store:
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
        g5 = await store.commit(
            expected_generation=g4,
            changes={"w1": [vm("a")]},
            before={"w1": [vm("a"), vm("c")]},
            op_id="o6",
            unix_ms=6,
        )
        # Confirmations older than the caller's horizon are forgotten.
        await store.acknowledge_removals("w2", g3, 200, 150)
        assert (await store.load()).removals == {
            "w1": {"c": Removal(g5)},
            "w2": {"c": Removal(g3, 200)},
        }


async def test_a_version_1_database_is_migrated(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    with sqlite3.connect(db) as conn:
        conn.executescript(
            """
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
        )
    async with await FleetStore.open(db) as store:
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
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            2,
        )
        assert conn.execute("SELECT generation, request_id FROM applies").fetchall() == [
            (7, ""),
            (8, "req-new"),
        ]
