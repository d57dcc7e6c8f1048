"""A description's change index is never newer than what it shows: a
blocking reader waits for a change *after* the index it was given, so an
index read after a report the description missed hides that report until
the next change (issue 31's 10 s stragglers: the benchmark's blocking
``describe`` waited out its whole timeout while the worker had long
reported)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio
from masterhelpers import FakeNode

from procurator.core.models import Fleet, Phase, VmStatus, WorkerInfo, WorkerStatus
from procurator.core.move import Move
from procurator.master.service import MasterService
from procurator.master.store import FleetStore

FleetOf = Callable[[dict[str, list[tuple[str, str]]]], Fleet]


class HeldMovesStore(FleetStore):
    """The SQLite store, whose ``moves`` read waits until ``release`` is
    set once ``hold`` is (a slow read, as a loaded store has)."""

    hold = False
    release: trio.Event | None = None
    reading: trio.Event | None = None

    async def moves(self, vm_id: str | None = None, limit: int = 20) -> tuple[Move, ...]:
        if self.hold and self.release is not None and self.reading is not None:
            self.reading.set()
            await self.release.wait()
        return await super().moves(vm_id, limit)


async def test_a_report_during_a_describe_is_not_hidden_from_the_next_wait(
    tmp_path: Path, fleet_of: FleetOf
) -> None:
    async with (
        await HeldMovesStore.open(tmp_path / "m.db") as store,
        trio.open_nursery() as nursery,
    ):
        assert isinstance(store, HeldMovesStore)
        service = MasterService(store)
        await nursery.start(service.run)
        token = await service.register(WorkerInfo("host-a"), FakeNode())
        result = await service.apply(fleet_of({"host-a": [("web-1", "a")]}))
        store.hold, store.release, store.reading = True, trio.Event(), trio.Event()
        described = []
        done = trio.Event()

        async def describe() -> None:
            described.append(await service.describe_vm("web-1", event_limit=0))
            done.set()

        nursery.start_soon(describe)
        await store.reading.wait()  # the description read the status, not the moves yet
        running = VmStatus("web-1", Phase.RUNNING, observed_hash="a")
        await service.report_status(token, WorkerStatus("host-a", result.generation, (running,)))
        store.release.set()
        with trio.fail_after(10):
            await done.wait()
        (description,) = described
        if description.status != running:
            # It missed the report: its index must let the next wait see it.
            assert description.change_index != service.change_index
            with trio.fail_after(5):
                await service.wait_change(description.change_index, 60)
        nursery.cancel_scope.cancel()
