"""A master vets what a metrics change leaves, not only what it carries
(``MasterService.report_metrics``): after a change the master relays every
series it holds of the worker, so a series of a VM that is no longer the
worker's (moved away or removed, past the report grace) must not stay held
because the worker merely stopped mentioning it; and a report that waited
(its master caught up on the store first) lands only on a session still
live, never over what the worker's newer session reported. Service tests on
a real SQLite store and on real PostgreSQL; the worker's Node and the store
gate are hand-written fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import trio
from pgfixtures import pg, pg_url
from rpcfixtures import make_fleet

from procurator.core.errors import UnauthorizedError, UnavailableError, UnsupportedError
from procurator.core.metrics import MetricSample, MetricsReport, series_key
from procurator.core.models import Assignment, Phase, VmStatus, WorkerInfo, WorkerStatus
from procurator.core.status import StatusChanges
from procurator.master.service import MasterService
from procurator.master.store import FleetStore, OnChange, OnHealth, Store, StoredWorker, open_store

__all__ = ["pg", "pg_url"]  # fixtures

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
    await service.report_metrics(token, MetricsReport("host-a", (_cpu("web-1", 1),)))
    # web-2's series come in a change (what the master holds grows by it).
    await service.report_metrics(token, MetricsReport("host-a", (_cpu("web-2", 1),), whole=False))

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


class _DeafAndGated:
    """A master's store whose notifications never arrive (its caches stay
    behind until it reads the store) and whose next read of a worker waits
    at a gate once armed."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.armed = False
        self.entered = trio.Event()
        self.release = trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def watch(
        self,
        on_change: OnChange,
        on_health: OnHealth,
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await self._store.watch(lambda change: None, on_health, task_status=task_status)

    async def worker(self, worker_id: str) -> StoredWorker:
        if self.armed:
            self.armed = False
            self.entered.set()
            await self.release.wait()
        return await self._store.worker(worker_id)


async def test_a_report_that_waited_does_not_land_on_a_session_since_replaced(
    pg_url: str,
) -> None:
    """Master b learns of web-2 only from the store: a change naming it
    waits while b catches up, and meanwhile the worker registers again and
    reports whole. The change must not then land on the ended session and
    put its series over the new session's."""
    fast = {"sync_interval": 3600.0, "worker_lease": 5.0, "leader_lease": 5.0}
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        services = []
        gate: _DeafAndGated | None = None
        for index in range(2):
            store: Store = await open_store(pg_url, application_name=f"procurator-master/m{index}")
            stack.push_async_callback(store.aclose)
            if index == 1:
                store = gate = _DeafAndGated(store)  # type: ignore[assignment]
            service = MasterService(store, master_id=f"m{index}", **fast)  # type: ignore[arg-type]
            await nursery.start(service.run)
            services.append(service)
        a, b = services
        assert gate is not None
        await a.apply(make_fleet({"host-a": [("web-1", "a")]}))
        await b.apply(make_fleet({"host-a": [("web-1", "a")]}), dry_run=True)  # b catches up
        old = await b.register(WorkerInfo("host-a"), _Node())
        await b.report_metrics(old, MetricsReport("host-a", (_cpu("web-1", 1),)))
        await a.apply(make_fleet({"host-a": [("web-1", "a"), ("web-2", "a")]}))  # b unaware

        stale = MetricsReport("host-a", (_cpu("web-2", 5),), whole=False)
        outcome: list[BaseException | None] = []

        async def report_stale() -> None:
            try:
                await b.report_metrics(old, stale)
                outcome.append(None)
            except UnavailableError as exc:
                outcome.append(exc)

        gate.armed = True
        async with trio.open_nursery() as reports:
            reports.start_soon(report_stale)
            await gate.entered.wait()
            # The worker gave up on that call: a new session, a whole report.
            new = await b.register(WorkerInfo("host-a"), _Node())
            whole = MetricsReport("host-a", (_cpu("web-1", 7), _cpu("web-2", 7)))
            await b.report_metrics(new, whole)
            gate.release.set()
        assert set(b.worker_metrics()["host-a"][1]) == set(whole.samples)
        assert isinstance(outcome[0], UnavailableError)
        nursery.cancel_scope.cancel()
