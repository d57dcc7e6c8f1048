"""Request ids make a retried apply safe: a request the master committed is
answered with that apply's result (``replayed``), never applied again, also
after the master died between the commit and the answer."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from masterhelpers import RestartableService, WallClock

from procurator.core.errors import StaleGenerationError, ValidationError
from procurator.core.models import Fleet, WorkerDiff
from procurator.master.service import MasterService
from procurator.master.store import AppliedRequest, FleetStore, StoredFleet

FleetOf = Callable[[dict[str, list[tuple[str, str]]]], Fleet]


@pytest.fixture
async def master(tmp_path: Path) -> AsyncIterator[RestartableService]:
    async with trio.open_nursery() as nursery:
        running = RestartableService(nursery, tmp_path / "m.db", WallClock())
        await running.start()
        yield running
        nursery.cancel_scope.cancel()


def desired(service: MasterService) -> dict[str, list[str]]:
    return {w: [vm.id for vm in a.vms] for w, a in service._assignments.items() if a.vms}


async def test_a_retried_request_gets_its_first_result_and_applies_nothing(
    master: RestartableService, fleet_of: FleetOf
) -> None:
    assert master.service is not None
    service = master.service
    mine = fleet_of({"host-a": [("web-1", "a")]})
    first = await service.apply(mine, expected_generation=0, request_id="req-1")
    theirs = await service.apply(fleet_of({"host-a": [("web-2", "b")]}))
    # The retry (same id, same fleet, same expected generation) is neither
    # stale nor applied over the newer fleet: it is the first answer again.
    again = await service.apply(mine, expected_generation=0, request_id="req-1")
    assert again.replayed and not first.replayed
    assert (again.generation, again.op_id, again.diffs) == (
        first.generation,
        first.op_id,
        first.diffs,
    )
    assert again.changed and not again.dry_run
    assert service.generation == theirs.generation
    assert desired(service) == {"host-a": ["web-2"]}
    # A dry run with the id tells whether it was applied, and changes nothing.
    dry = await service.apply(mine, dry_run=True, request_id="req-1")
    assert dry.replayed and dry.generation == first.generation
    # Without the id, the same fleet is a new apply (here: a stale one).
    with pytest.raises(StaleGenerationError):
        await service.apply(mine, expected_generation=0)
    # The id with another fleet is a client's mistake: refused, nothing applied.
    with pytest.raises(ValidationError, match="req-1 was used already, for another fleet"):
        await service.apply(fleet_of({"host-a": [("web-3", "c")]}), request_id="req-1")
    with pytest.raises(ValidationError, match="request id: 'no spaces' is not"):
        await service.apply(mine, request_id="no spaces")
    with pytest.raises(ValidationError, match="request id"):
        await service.apply(mine, request_id="x" * 65)
    # A no-op records nothing: the id is free for the next apply.
    noop = await service.apply(fleet_of({"host-a": [("web-2", "b")]}), request_id="req-2")
    assert not noop.changed and not noop.replayed
    applied = await service.apply(mine, request_id="req-2")
    assert applied.changed and not applied.replayed
    assert service.generation == theirs.generation + 1


class DiesAfterCommit:
    """The master's store, for a master that dies right after its commit
    (the apply is stored; the answer is never sent)."""

    def __init__(self, store: FleetStore) -> None:
        self._store = store
        self.committed = trio.Event()

    async def load(self) -> StoredFleet:
        return await self._store.load()

    async def commit(self, **kwargs: Any) -> int:
        await self._store.commit(**kwargs)
        self.committed.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async def find_request(self, request_id: str) -> AppliedRequest | None:
        return await self._store.find_request(request_id)

    async def acknowledge_removals(
        self, worker_id: str, observed_generation: int, unix_ms: int, forget_before_unix_ms: int
    ) -> None:
        await self._store.acknowledge_removals(
            worker_id, observed_generation, unix_ms, forget_before_unix_ms
        )


async def test_a_request_committed_before_the_master_died_is_replayed_after_a_restart(
    master: RestartableService, fleet_of: FleetOf
) -> None:
    await master.stop()
    dying: list[DiesAfterCommit] = []

    def wrap(store: FleetStore) -> DiesAfterCommit:
        dying.append(DiesAfterCommit(store))
        return dying[-1]

    service = await master.start(wrap)
    fleet = fleet_of({"host-a": [("web-1", "a")], "host-b": [("db-1", "b")]})
    async with trio.open_nursery() as nursery:
        # The client's call: it never gets an answer.
        nursery.start_soon(lambda: service.apply(fleet, op_id="op-first", request_id="req-lost"))
        await dying[0].committed.wait()
        nursery.cancel_scope.cancel()
    service = await master.restart()
    retried = await service.apply(fleet, expected_generation=0, request_id="req-lost")
    assert retried.replayed
    assert (retried.generation, retried.op_id) == (1, "op-first")
    assert sorted(d.worker_id for d in retried.diffs) == ["host-a", "host-b"]
    assert retried.diffs[0] == WorkerDiff("host-a", added=("web-1",))
    assert service.generation == 1  # applied once
