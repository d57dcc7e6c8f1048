"""The SQLite store: one transaction per apply, generations that survive."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from procurator.core.errors import PermanentError, ProcuratorError, StaleGenerationError
from procurator.core.models import PowerState, VmAssignment
from procurator.master.store import FleetStore

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
