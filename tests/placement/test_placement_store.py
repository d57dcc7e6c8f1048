"""The store keeps what healing needs besides the assignments — each
unpinned VM's rules and the strategy — in the apply's transaction, and a
healing commit is fenced by the leader's epoch. Both adapters."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from procurator.core.errors import ValidationError
from procurator.core.models import (
    OnWorkerLost,
    PlacementStrategy,
    PowerState,
    VmAssignment,
)
from procurator.master.store import (
    Fence,
    FencedError,
    FleetDump,
    open_store,
)
from procurator.master.store.codec import decode_dump, encode_dump
from procurator.master.store.model import PlacementRecord, UnpinnedRules
from procurator.master.store.port import Store

PATH = "/nix/store/" + "c" * 32 + "-vm"


def vm(vm_id: str) -> VmAssignment:
    return VmAssignment(vm_id, "h", PATH, PowerState.RUNNING, 1, 512)


WEB = UnpinnedRules((("zone", "b"),), "web")
DB = UnpinnedRules((), "", OnWorkerLost.WAIT)


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


async def test_the_rules_are_stored_with_the_apply(store: Store) -> None:
    assert await store.placement() == PlacementRecord()
    first = PlacementRecord({"web-1": WEB, "db-1": DB}, PlacementStrategy.SPREAD)
    g1 = await store.commit(
        expected_generation=0,
        changes={"w": [vm("web-1"), vm("db-1")]},
        before={},
        op_id="op-1",
        unix_ms=1,
        placement=first,
    )
    assert await store.placement() == first
    # A commit without a record (healing) keeps the stored one.
    g2 = await store.commit(
        expected_generation=g1,
        changes={"w": [vm("web-1")], "v": [vm("db-1")]},
        before={"w": [vm("web-1"), vm("db-1")]},
        op_id="op-2",
        unix_ms=2,
    )
    assert await store.placement() == first
    # The next apply's record replaces it whole: rules changed, VMs gone.
    second = PlacementRecord({"web-1": UnpinnedRules((("zone", "c"),), "web")})
    await store.commit(
        expected_generation=g2,
        changes={"v": []},
        before={"v": [vm("db-1")]},
        op_id="op-3",
        unix_ms=3,
        placement=second,
    )
    assert await store.placement() == second


async def test_a_commit_under_an_old_epoch_changes_nothing(store: Store) -> None:
    epoch = await store.acquire_lease("leader", "m1", lease_ms=60_000)
    assert epoch is not None
    fence = Fence("leader", "m1", epoch)
    record = PlacementRecord({"web-1": WEB})
    g1 = await store.commit(
        expected_generation=0,
        changes={"w": [vm("web-1")]},
        before={},
        op_id="op-1",
        unix_ms=1,
        placement=record,
        fence=fence,
    )
    await store.release_lease(fence)
    assert await store.acquire_lease("leader", "m2", lease_ms=60_000) == epoch + 1
    with pytest.raises(FencedError, match="nothing was written"):
        await store.commit(
            expected_generation=g1,
            changes={"v": [vm("web-1")], "w": []},
            before={"w": [vm("web-1")]},
            op_id="op-2",
            unix_ms=2,
            placement=PlacementRecord(),
            fence=fence,
        )
    stored = await store.load()
    assert stored.generation == g1
    assert [v.id for v in stored.assignments["w"].vms] == ["web-1"]
    assert "v" not in stored.assignments
    assert await store.placement() == record


async def test_a_database_of_an_older_schema_gets_the_table(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    async with await open_store(str(db)) as store:  # type: ignore[attr-defined]
        pass
    with sqlite3.connect(db) as conn:  # back to version 3, as a 3 wrote it
        conn.executescript(
            "DROP TABLE unpinned; DELETE FROM meta WHERE key = 'strategy'; "
            "UPDATE meta SET value = 3 WHERE key = 'schema_version';"
        )
    async with await open_store(str(db)) as store:  # type: ignore[attr-defined]
        assert await store.placement() == PlacementRecord()


async def test_export_and_import_carry_the_rules(store: Store, tmp_path: Path) -> None:
    record = PlacementRecord({"web-1": WEB, "db-1": DB}, PlacementStrategy.SPREAD)
    await store.commit(
        expected_generation=0,
        changes={"w": [vm("web-1"), vm("db-1")]},
        before={},
        op_id="op-1",
        unix_ms=1,
        placement=record,
    )
    dump = await store.export()
    assert dump.placement == record
    # Through the JSON of `procurator master export` into another store.
    again = decode_dump(json.loads(json.dumps(encode_dump(dump))), "dump.json")
    assert again == dump
    async with await open_store(str(tmp_path / "other.db")) as other:  # type: ignore[attr-defined]
        await other.import_dump(again)
        assert await other.placement() == record


def test_a_dump_without_rules_reads_as_none_and_bad_rules_are_refused() -> None:
    data = encode_dump(FleetDump(0, (), (), (), ()))
    del data["placement"]  # a dump of a release that placed nothing
    assert decode_dump(data, "d.json").placement == PlacementRecord()
    data["placement"] = {"strategy": "binpack", "unpinned": {"web-1": {"on_worker_lost": "x"}}}
    with pytest.raises(ValidationError, match=r"placement\.unpinned\.web-1\.on_worker_lost"):
        decode_dump(data, "d.json")
    data["placement"] = {"unpinned": {"web-1": {"on_worker_lost": "wait", "spread": "A B"}}}
    with pytest.raises(ValidationError, match="not a valid group name"):
        decode_dump(data, "d.json")
