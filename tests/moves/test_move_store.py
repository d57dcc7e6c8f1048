"""The store's part of moves (schema version 9), on both adapters: SQLite
(a file) and PostgreSQL (a real server); the migration from version 8."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from procurator.core.errors import PermanentError, ProcuratorError, ValidationError
from procurator.core.models import PowerState, VmAssignment
from procurator.core.move import MOVES_KEPT, Move, MoveKind, MovePhase, advance
from procurator.master.store import SCHEMA_VERSION, Fence, FencedError, Store, open_store

PATH = "/nix/store/" + "m" * 32 + "-m"


def vm(vm_id: str, power: PowerState = PowerState.RUNNING) -> VmAssignment:
    return VmAssignment(vm_id, "h", PATH, power, 1, 128)


def pending(vm_id: str = "a", op_id: str = "op-m1", started: int = 10) -> Move:
    return Move(vm_id, "w1", "w2", MoveKind.COLD, MovePhase.PENDING, op_id, started, 10_000)


async def leader(store: Store) -> Fence:
    epoch = await store.acquire_lease("leader", "m1", lease_ms=60_000)
    assert epoch is not None
    return Fence("leader", "m1", epoch)


async def test_a_move_is_recorded_once_per_vm_and_its_phases_commit_with_generations(
    store: Store,
) -> None:
    g1 = await store.commit(
        expected_generation=0, changes={"w1": [vm("a")]}, before={}, op_id="op-a", unix_ms=1
    )
    move = pending()
    await store.start_move(move)
    assert await store.moves() == (move,)
    with pytest.raises(ValidationError, match="VM a is moving already \\(move op-m1\\)"):
        await store.start_move(pending(op_id="op-m2"))
    fence = await leader(store)
    # The stop: one generation under the move's op id, with the new phase.
    stopping = advance(move, MovePhase.STOPPING, now_ms=20)
    g2 = await store.commit_move(
        fence=fence,
        expected_generation=g1,
        changes={"w1": [vm("a", PowerState.STOPPED)]},
        before={"w1": [vm("a")]},
        unix_ms=20,
        move=stopping,
        move_before=move,
    )
    stored = await store.load()
    assert stored.generation == g2 == g1 + 1
    assert stored.assignments["w1"].vms == (vm("a", PowerState.STOPPED),)
    assert stored.assignments["w1"].op_id == "op-m1"
    (now,) = await store.moves("a")
    assert now == dataclasses.replace(stopping, generation=g2)
    # Compare-and-set: a write over a phase that is gone changes nothing.
    with pytest.raises(ProcuratorError, match="changed meanwhile"):
        await store.put_move(fence, advance(move, MovePhase.FAILED, now_ms=30), move)
    assert await store.moves("a") == (now,)
    done = advance(now, MovePhase.DONE, now_ms=40)
    await store.put_move(fence, done, now)
    assert await store.moves("a") == (done,)
    # Over: the VM may move again.
    await store.start_move(pending(op_id="op-m3", started=50))
    assert [m.op_id for m in await store.moves("a")] == ["op-m3", "op-m1"]
    assert await store.moves("b") == ()


async def test_a_fenced_out_leader_writes_no_phase(store: Store) -> None:
    g1 = await store.commit(
        expected_generation=0, changes={"w1": [vm("a")]}, before={}, op_id="op-a", unix_ms=1
    )
    move = pending()
    await store.start_move(move)
    stale = Fence("leader", "m0", 0)
    with pytest.raises(FencedError):
        await store.commit_move(
            fence=stale,
            expected_generation=g1,
            changes={"w1": [vm("a", PowerState.STOPPED)]},
            before={"w1": [vm("a")]},
            unix_ms=2,
            move=advance(move, MovePhase.STOPPING, now_ms=2),
            move_before=move,
        )
    with pytest.raises(FencedError):
        await store.put_move(stale, advance(move, MovePhase.FAILED, now_ms=2), move)
    stored = await store.load()
    assert stored.generation == g1 and stored.assignments["w1"].vms == (vm("a"),)
    assert await store.moves() == (move,)


async def test_only_the_newest_moves_over_are_kept(store: Store) -> None:
    fence = await leader(store)
    for i in range(MOVES_KEPT + 2):
        move = pending("a", f"op-{i:04}", started=i + 1)
        await store.start_move(move)
        await store.put_move(fence, advance(move, MovePhase.FAILED, now_ms=i + 1), move)
    await store.start_move(pending("a", "op-live", started=1_000))
    kept = await store.moves("a", limit=1_000)
    assert len(kept) == MOVES_KEPT + 1 and kept[0].op_id == "op-live"
    assert kept[-1].op_id == "op-0002"


async def test_sqlite_a_version_8_database_is_migrated_to_hold_moves(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    async with await open_store(str(db)) as fresh:  # type: ignore[attr-defined]
        await fresh.commit(
            expected_generation=0, changes={"w1": [vm("a")]}, before={}, op_id="op-a", unix_ms=1
        )
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE moves")
        conn.execute("ALTER TABLE worker_state DROP COLUMN transfers")
        conn.execute("UPDATE meta SET value = 8 WHERE key = 'schema_version'")
    with pytest.raises(
        PermanentError, match=f"schema version 8, this procurator needs {SCHEMA_VERSION}"
    ):
        await open_store(str(db), migrate=False)
    async with await open_store(str(db)) as store:  # type: ignore[attr-defined]
        assert (await store.load()).generation == 1
        await store.start_move(pending())
        assert [m.op_id for m in await store.moves()] == ["op-m1"]
        assert (await store.load()).workers == {}  # worker_state reads, transfers included
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            9,
        )


async def test_postgresql_a_version_8_database_is_migrated_to_hold_moves(
    pg_url: str, pg: Any
) -> None:
    dbname = pg_url.rsplit("/", 1)[1]
    fresh = await open_store(pg_url)
    await fresh.aclose()
    pg.psql(
        "DROP TABLE moves; ALTER TABLE worker_state DROP COLUMN transfers; "
        "UPDATE meta SET value = 8 WHERE key = 'schema_version'",
        dbname,
    )
    with pytest.raises(
        PermanentError, match=f"schema version 8, this procurator needs {SCHEMA_VERSION}"
    ):
        await open_store(pg_url, migrate=False)
    store = await open_store(pg_url)
    try:
        await store.start_move(pending())
        assert [m.op_id for m in await store.moves()] == ["op-m1"]
    finally:
        await store.aclose()
    assert pg.psql("SELECT value FROM meta WHERE key = 'schema_version'", dbname).strip() == "9"
