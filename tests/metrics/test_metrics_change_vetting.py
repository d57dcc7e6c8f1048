"""A master vets what a metrics change leaves, not only what it carries
(``MasterService.report_metrics``): after a change the master relays every
series it holds of the worker, so a series of a VM that is no longer the
worker's (moved away or removed, past the report grace) must not stay held
because the worker merely stopped mentioning it. Service tests on a real
SQLite store; the worker's Node is a hand-written fake."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from rpcfixtures import make_fleet

from procurator.core.errors import UnauthorizedError, UnsupportedError
from procurator.core.metrics import MetricSample, MetricsReport, series_key
from procurator.core.models import Assignment, Phase, VmStatus, WorkerInfo, WorkerStatus
from procurator.core.status import StatusChanges
from procurator.master.service import MasterService
from procurator.master.store import FleetStore

GRACE = 300.0


class _Clock:
    """A wall clock (seconds) that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


class _Node:
    """A worker's Node that takes whole assignments and nothing else."""

    connection_id = 1

    async def push(self, assignment: Assignment) -> None:
        pass

    async def push_changes(self, changes: object) -> None:
        raise UnsupportedError("Node.pushChanges: not implemented by this fake")

    async def aclose(self) -> None:
        pass


@pytest.fixture
async def clock_and_service(tmp_path: Path) -> AsyncIterator[tuple[_Clock, MasterService]]:
    clock = _Clock()
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        service = MasterService(store, wall_clock=clock, report_grace=GRACE)
        await nursery.start(service.run)
        yield clock, service
        nursery.cancel_scope.cancel()


def _cpu(vm_id: str, value: float) -> MetricSample:
    return MetricSample("procurator_vm_cpu_seconds_total", value, vm_id)


async def test_a_change_cannot_keep_the_series_of_a_vm_no_longer_the_workers(
    clock_and_service: tuple[_Clock, MasterService],
) -> None:
    clock, service = clock_and_service
    first = await service.apply(make_fleet({"host-a": [("web-1", "a"), ("web-2", "a")]}))
    token = await service.register(WorkerInfo("host-a"), _Node())
    running = tuple(VmStatus(v, Phase.RUNNING) for v in ("web-1", "web-2"))
    await service.report_status(token, WorkerStatus("host-a", first.generation, running))
    await service.report_metrics(
        token, MetricsReport("host-a", (_cpu("web-1", 1), _cpu("web-2", 1)))
    )

    # web-2 is removed and the worker confirms it...
    second = await service.apply(make_fleet({"host-a": [("web-1", "a")]}))
    await service.report_status_changes(
        token, StatusChanges("host-a", second.generation, removed=("web-2",))
    )
    # ...and, within the grace, a change that leaves web-2's series held passes...
    change = MetricsReport("host-a", (_cpu("web-1", 2),), whole=False)
    await service.report_metrics(token, change)
    # ...but not after it: the master would relay web-2's figures from a
    # worker that no longer has it, as a whole report of them is refused.
    clock.now += GRACE
    with pytest.raises(UnauthorizedError, match="metrics of VM 'web-2'"):
        await service.report_metrics(
            token, MetricsReport("host-a", (_cpu("web-1", 3),), whole=False)
        )
    # A change that ends them needs no voice for them, and is taken.
    ended = MetricsReport("host-a", (_cpu("web-1", 3),), (series_key(_cpu("web-2", 0)),), False)
    await service.report_metrics(token, ended)
    assert service.worker_metrics()["host-a"][1] == (_cpu("web-1", 3),)
