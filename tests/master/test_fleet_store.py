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
            expected_generation=0, changes={"w1": [vm("a")]}, op_id="op-1", unix_ms=1
        )
        g2 = await store.commit(expected_generation=g1, changes={"w1": []}, op_id="op-2", unix_ms=2)
    assert (g1, g2) == (1, 2)
    async with await FleetStore.open(db) as store:
        stored = await store.load()
        # Emptied workers keep an (empty) assignment at their generation.
        assert stored.generation == 2
        assert stored.assignments["w1"].vms == ()
        assert stored.assignments["w1"].generation == 2
        assert stored.assignments["w1"].op_id == "op-2"
        g3 = await store.commit(
            expected_generation=2, changes={"w2": [vm("b")]}, op_id="op-3", unix_ms=3
        )
        assert g3 == 3
        stored = await store.load()
        assert stored.assignments["w2"].vms == (vm("b"),)
        assert stored.assignments["w1"].generation == 2


async def test_stale_commit_changes_nothing(tmp_path: Path) -> None:
    async with await FleetStore.open(tmp_path / "m.db") as store:
        await store.commit(expected_generation=0, changes={"w": [vm("a")]}, op_id="o", unix_ms=1)
        with pytest.raises(StaleGenerationError):
            await store.commit(
                expected_generation=0, changes={"w": [vm("b")]}, op_id="o2", unix_ms=2
            )
        stored = await store.load()
        assert stored.generation == 1
        assert [v.id for v in stored.assignments["w"].vms] == ["a"]


async def test_a_failing_apply_is_rolled_back_entirely(tmp_path: Path) -> None:
    async with await FleetStore.open(tmp_path / "m.db") as store:
        await store.commit(expected_generation=0, changes={"w1": [vm("a")]}, op_id="o", unix_ms=1)
        # The same VM id on two workers violates the primary key midway.
        with pytest.raises(ProcuratorError):
            await store.commit(
                expected_generation=1,
                changes={"w2": [vm("x")], "w3": [vm("x")]},
                op_id="o2",
                unix_ms=2,
            )
        stored = await store.load()
        assert stored.generation == 1
        assert set(stored.assignments) == {"w1"}
        # A VM may move between workers in one apply.
        await store.commit(
            expected_generation=1, changes={"w1": [], "w2": [vm("a")]}, op_id="o3", unix_ms=3
        )
        assert (await store.load()).assignments["w2"].vms == (vm("a"),)


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
