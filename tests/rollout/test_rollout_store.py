"""Rollouts in the store (schema version 7), both adapters: stored whole
and read back, started in an apply's transaction, a person's apply refused
while one is under way (or superseding it), the leader's writes fenced."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from procurator.core.models import PowerState, RolloutPolicy, VmAssignment
from procurator.core.rollout import Rollout, RolloutPhase, RolloutVm, VmState
from procurator.master.store import Fence, FencedError, open_store
from procurator.master.store.model import (
    ROLLOUTS_KEPT,
    SCHEMA_VERSION,
    RolloutActiveError,
    RolloutChangedError,
)
from procurator.master.store.port import Store

OLD = "/nix/store/" + "a" * 32 + "-web"
NEW = "/nix/store/" + "b" * 32 + "-web"


def vm(vm_id: str, path: str = OLD) -> VmAssignment:
    return VmAssignment(vm_id, path[11:43], path, PowerState.RUNNING, 1, 256)


def rollout(rollout_id: str = "r1", op_id: str = "op-1") -> Rollout:
    return Rollout(
        rollout_id,
        op_id,
        (RolloutVm("web-1", "w", vm("web-1"), vm("web-1", NEW), RolloutPolicy(max_parallel=2)),),
        (("w", (NEW,)),),
        started_ms=5,
        generation_before=1,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    target = (
        str(tmp_path / "m.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")
    )
    opened: Store = await open_store(target)
    try:
        yield opened
    finally:
        await opened.aclose()


async def first_generation(store: Store) -> int:
    return await store.commit(
        expected_generation=0, changes={"w": [vm("web-1")]}, before={}, op_id="op-0", unix_ms=1
    )


async def test_a_rollout_starts_in_its_applys_transaction_and_reads_back_whole(
    store: Store,
) -> None:
    assert await store.rollout() is None
    g1 = await first_generation(store)
    started = rollout()
    g2 = await store.commit(
        expected_generation=g1,
        changes={"w": [vm("web-1")]},
        before={"w": [vm("web-1")]},
        op_id="op-1",
        unix_ms=2,
        rollout=started,
        guard_rollouts=True,
    )
    assert g2 == g1 + 1
    assert await store.rollout() == started
    assert await store.rollout("r1") == started
    assert await store.rollouts() == (started,)
    # Its next state replaces it; once over, it is no longer "under way".
    done = replace(
        started,
        vms=(replace(started.vms[0], state=VmState.HEALTHY, switched_ms=9),),
        phase=RolloutPhase.DONE,
    )
    await store.put_rollout(done)
    assert await store.rollout() is None
    assert await store.rollout("r1") == done


async def test_an_apply_during_a_rollout_is_refused_and_changes_nothing(store: Store) -> None:
    g1 = await first_generation(store)
    await store.put_rollout(rollout())
    with pytest.raises(RolloutActiveError, match=r"rollout r1 \(apply op-1\) is under way"):
        await store.commit(
            expected_generation=g1,
            changes={"w": [vm("web-1"), vm("web-2")]},
            before={"w": [vm("web-1")]},
            op_id="op-2",
            unix_ms=2,
            guard_rollouts=True,
        )
    assert (await store.versions()).generation == g1
    # The rollout's own generations (and healing's) are not guarded.
    g2 = await store.commit(
        expected_generation=g1,
        changes={"w": [vm("web-1", NEW)]},
        before={"w": [vm("web-1")]},
        op_id="op-3",
        unix_ms=3,
    )
    assert g2 == g1 + 1


async def test_supersede_ends_the_rollout_under_way(store: Store) -> None:
    g1 = await first_generation(store)
    await store.put_rollout(rollout())
    second = rollout("r2", "op-2")
    await store.commit(
        expected_generation=g1,
        changes={"w": [vm("web-1")]},
        before={"w": [vm("web-1")]},
        op_id="op-2",
        unix_ms=7,
        guard_rollouts=True,
        supersede=True,
        rollout=second,
    )
    assert await store.rollout() == second
    ended = await store.rollout("r1")
    assert ended is not None
    assert (ended.phase, ended.reason, ended.ended_ms) == (
        RolloutPhase.FAILED,
        "superseded by apply op-2",
        7,
    )
    assert [r.id for r in await store.rollouts()] == ["r2", "r1"]


async def test_the_leaders_writes_are_fenced(store: Store) -> None:
    epoch = await store.acquire_lease("leader", "m1", lease_ms=60_000)
    assert epoch is not None
    fence = Fence("leader", "m1", epoch)
    await store.put_rollout(rollout(), fence=fence)
    await store.release_lease(fence)
    assert await store.acquire_lease("leader", "m2", lease_ms=60_000) == epoch + 1
    with pytest.raises(FencedError):
        await store.put_rollout(replace(rollout(), paused=True), fence=fence)
    assert await store.rollout() == rollout()


async def test_only_the_newest_rollouts_that_are_over_are_kept(store: Store) -> None:
    await store.put_rollout(rollout("under-way"))
    for i in range(ROLLOUTS_KEPT + 2):
        await store.put_rollout(replace(rollout(f"r{i:03d}"), phase=RolloutPhase.DONE))
    kept = await store.rollouts(limit=1000)
    assert len(kept) == ROLLOUTS_KEPT + 1
    assert kept[0].id == f"r{ROLLOUTS_KEPT + 1:03d}"
    assert await store.rollout() == rollout("under-way")
    assert await store.rollout("r000") is None


async def test_a_version_6_sqlite_database_gains_the_table(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    store = await open_store(str(path))
    await store.aclose()
    with sqlite3.connect(path) as db:
        db.execute("DROP TABLE rollouts")
        db.execute("UPDATE meta SET value = 6 WHERE key = 'schema_version'")
    store = await open_store(str(path))
    try:
        await store.put_rollout(rollout())
        assert await store.rollout() == rollout()
    finally:
        await store.aclose()
    with sqlite3.connect(path) as db:
        (version,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == SCHEMA_VERSION


async def test_a_write_over_a_state_that_changed_meanwhile_is_refused(store: Store) -> None:
    seen = rollout()
    await store.put_rollout(seen)
    paused = replace(seen, paused=True)
    await store.put_rollout(paused, before=seen)  # an operator's pause
    # The leader's step, decided on what it read before the pause, loses.
    with pytest.raises(RolloutChangedError, match="changed meanwhile"):
        await store.put_rollout(replace(seen, batches=1), before=seen)
    g1 = await first_generation(store)
    with pytest.raises(RolloutChangedError):
        await store.commit(
            expected_generation=g1,
            changes={"w": [vm("web-1", NEW)]},
            before={"w": [vm("web-1")]},
            op_id="op-9",
            unix_ms=9,
            rollout=replace(seen, batches=1),
            rollout_before=seen,
        )
    assert (await store.versions()).generation == g1
    assert await store.rollout() == paused
