"""Cordon and uncordon, and each worker's state in status and metrics
(issue 27): MasterService on a real SQLite store, workers as fake
``Node``s, through the service's methods (the wire is
tests/placement/test_drain_cli.py's)."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from test_healing import LEASE, FakeNode, info, service, unpinned, where

from procurator.core.drain import ModeAction, WorkerMode
from procurator.core.errors import NotFoundError, ValidationError
from procurator.core.models import Fleet, WorkerState
from procurator.master.metrics import MasterMetrics
from procurator.master.service import MasterService
from procurator.master.store import FleetStore

__all__ = ["service"]


async def test_a_cordoned_worker_keeps_its_vms_and_takes_no_new_ones(
    service: MasterService,
) -> None:
    await service.register(info("host-a", 8, 8192), FakeNode())
    await service.register(info("host-b", 8, 8192), FakeNode())
    await service.apply(Fleet((), (unpinned("web-1"),)))
    first = (await where(service))["web-1"]
    other = "host-b" if first == "host-a" else "host-a"

    change = await service.change_worker_mode(first, ModeAction.CORDON)
    assert change.changed and change.mode is not None
    assert change.mode.state is WorkerState.CORDONED
    assert change.message == f"worker {first} cordoned: it takes no new VMs"
    # Idempotent: a second cordon changes nothing and says so.
    again = await service.change_worker_mode(first, ModeAction.CORDON)
    assert not again.changed and again.mode == change.mode

    # Binpack would put web-2 next to web-1: the cordon sends it elsewhere,
    # and web-1 stays.
    await service.apply(Fleet((), (unpinned("web-1"), unpinned("web-2"))))
    assert await where(service) == {"web-1": first, "web-2": other}

    # Cordon both: a new VM fits nowhere, named with the cordons.
    await service.change_worker_mode(other, ModeAction.CORDON)
    with pytest.raises(ValidationError, match=r"web-3: .*2 workers cordoned"):
        await service.apply(Fleet((), (unpinned("web-1"), unpinned("web-2"), unpinned("web-3"))))

    uncordoned = await service.change_worker_mode(first, ModeAction.UNCORDON)
    assert uncordoned.changed and uncordoned.mode is None
    assert not (await service.change_worker_mode(first, ModeAction.UNCORDON)).changed
    await service.apply(Fleet((), (unpinned("web-1"), unpinned("web-2"), unpinned("web-3"))))
    assert (await where(service))["web-3"] == first


async def test_an_unknown_worker_is_refused_clearly(service: MasterService) -> None:
    await service.register(info("host-a", 8, 8192), FakeNode())
    with pytest.raises(NotFoundError, match="'host-z' is unknown: it never registered"):
        await service.change_worker_mode("host-z", ModeAction.CORDON)
    status = await service.fleet_status()
    assert [w.worker_id for w in status.workers] == ["host-a"]


async def test_a_cordon_outlives_a_master_restart(tmp_path: Path) -> None:
    for run in range(2):
        async with (
            await FleetStore.open(tmp_path / "m.db") as store,
            trio.open_nursery() as nursery,
        ):
            master = MasterService(store, worker_lease=LEASE, leader_lease=LEASE)
            await nursery.start(master.run)
            await master.register(info("host-a", 8, 8192), FakeNode())
            if run == 0:
                await master.change_worker_mode("host-a", ModeAction.CORDON)
            (worker,) = (await master.fleet_status()).workers
            assert worker.state is WorkerState.CORDONED
            nursery.cancel_scope.cancel()


async def test_status_and_metrics_show_each_workers_state_and_last_renewal(
    service: MasterService,
) -> None:
    a = await service.register(info("host-a", 8, 8192), FakeNode())
    await service.register(info("host-b", 8, 8192), FakeNode())
    await service.apply(Fleet((), (unpinned("web-1"),)))
    await service.change_worker_mode("host-b", ModeAction.CORDON)
    host = (await where(service))["web-1"]
    assert host == "host-a"
    await service.unregister(a)

    def states(status_workers: object) -> dict[str, WorkerState | None]:
        return {w.worker_id: w.state for w in status_workers}  # type: ignore[attr-defined]

    status = await service.fleet_status()
    # Away, within its lease: still ready (it may come back any moment).
    assert states(status.workers) == {"host-a": WorkerState.READY, "host-b": WorkerState.CORDONED}
    for w in status.workers:
        assert w.renewed_unix_ms > 0 and w.renewed_ago_ms >= 0
    with trio.fail_after(30):  # a hang guard: a lease (1 s) and a heal interval
        while states((await service.fleet_status()).workers)["host-a"] is not WorkerState.LOST:
            await trio.sleep(0.1)
    lost = next(w for w in (await service.fleet_status()).workers if w.worker_id == "host-a")
    assert not lost.connected and lost.renewed_ago_ms >= 0

    text = MasterMetrics(service.fleet_view).exposition().decode()
    assert 'procurator_master_worker_state{state="lost",worker="host-a"} 1.0' in text
    assert 'procurator_master_worker_state{state="ready",worker="host-a"} 0.0' in text
    assert 'procurator_master_worker_state{state="cordoned",worker="host-b"} 1.0' in text


def test_a_mode_is_cordoned_or_draining() -> None:
    with pytest.raises(ValueError, match="cordoned or draining"):
        WorkerMode(WorkerState.READY, "op", 0)
