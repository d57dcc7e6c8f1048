"""The master's "worker W converged to generation N" line says something:
a worker reaching a newer generation. A worker that comes back with
nothing settled yet (restarted, or reconnecting before it holds an
assignment) reports generation 0; that once read "converged to generation
0" in the master's log, noise beside the real lines operators grep for
(tests/ops/test_ops_story)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import trio
from masterhelpers import FakeNode

from procurator.core.models import Fleet, Phase, VmStatus, WorkerInfo, WorkerStatus
from procurator.master.service import MasterService
from procurator.master.store import FleetStore

FleetOf = Callable[[dict[str, list[tuple[str, str]]]], Fleet]


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[MasterService]:
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        svc = MasterService(store, push_timeout=1.0)
        await nursery.start(svc.run)
        yield svc
        nursery.cancel_scope.cancel()


def converged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "converged to generation" in r.getMessage()]


async def test_only_a_newer_observed_generation_is_logged_as_convergence(
    service: MasterService, fleet_of: FleetOf, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="procurator.master.service")
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    await service.report_status(token, WorkerStatus("host-a", 0))
    result = await service.apply(fleet_of({"host-a": [("web-1", "a")]}))
    running = (VmStatus("web-1", Phase.RUNNING, "a"),)
    await service.report_status(token, WorkerStatus("host-a", result.generation, running))
    assert converged(caplog) == [f"worker host-a converged to generation {result.generation}"]
    # The worker restarts with its state gone: a new session that reports
    # nothing settled until it has its assignment again, then settles it.
    caplog.clear()
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    await service.report_status(token, WorkerStatus("host-a", 0))
    await service.report_status(token, WorkerStatus("host-a", 0))
    assert converged(caplog) == []
    await service.report_status(token, WorkerStatus("host-a", result.generation, running))
    assert converged(caplog) == [f"worker host-a converged to generation {result.generation}"]
