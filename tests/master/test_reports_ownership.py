"""Who may report what: a worker speaks only for the VMs assigned to it or
being removed from it, and only of generations the master issued to it
(the rule is in ``procurator.master.service``'s docstring). Service tests on
a real SQLite store, restarted where the rule must survive a restart; one
test through a real Cap'n Proto socket."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
import trio
from masterhelpers import FakeNode, RestartableService, WallClock
from rpcfixtures import RunningMaster

from procurator.core.errors import NotFoundError, UnauthorizedError, ValidationError
from procurator.core.metrics import MetricSample, MetricsReport
from procurator.core.models import (
    EventKind,
    Fleet,
    Phase,
    VmEvent,
    VmStatus,
    WorkerInfo,
    WorkerStatus,
)
from procurator.core.status import StatusChanges
from procurator.master.service import MasterService
from procurator.rpc.bridge import Bridge
from procurator.rpc.clients import CapnpMasterDialer, open_control

FleetOf = Callable[[dict[str, list[tuple[str, str]]]], Fleet]
GRACE = 300.0


@pytest.fixture
async def master(tmp_path: Path) -> AsyncIterator[RestartableService]:
    async with trio.open_nursery() as nursery:
        running = RestartableService(nursery, tmp_path / "m.db", WallClock(), report_grace=GRACE)
        await running.start()
        yield running
        nursery.cancel_scope.cancel()


def svc(master: RestartableService) -> MasterService:
    assert master.service is not None
    return master.service


def vms(*ids: str, phase: Phase = Phase.RUNNING) -> tuple[VmStatus, ...]:
    return tuple(VmStatus(vm_id, phase) for vm_id in ids)


def event(vm_id: str, message: str = "") -> VmEvent:
    return VmEvent(vm_id, EventKind.BOOTED, message)


async def status_of(service: MasterService, worker_id: str) -> WorkerStatus | None:
    for worker in (await service.fleet_status()).workers:
        if worker.worker_id == worker_id:
            return worker.status
    return None


async def test_a_worker_cannot_speak_for_another_workers_vm(
    master: RestartableService, fleet_of: FleetOf, caplog: pytest.LogCaptureFixture
) -> None:
    service = svc(master)
    result = await service.apply(fleet_of({"host-a": [("web-1", "a")], "host-b": [("db-1", "b")]}))
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    caplog.set_level(logging.WARNING, "procurator.master.service")

    # A status naming host-b's VM, with a generation never issued.
    with pytest.raises(UnauthorizedError, match="'db-1', which is neither assigned"):
        await service.report_status(token, WorkerStatus("host-a", 1, vms("web-1", "db-1")))
    with pytest.raises(ValidationError, match="generation 1000000000000, which was never issued"):
        await service.report_status(token, WorkerStatus("host-a", 10**12, vms("web-1")))
    assert await status_of(service, "host-a") is None  # nothing of either was stored
    # Events about it: refused whole, even mixed with events of its own VM.
    with pytest.raises(UnauthorizedError, match="event of VM 'db-1'"):
        await service.report_events(token, [event("web-1", "mine"), event("db-1", "forged")])
    # Metrics of it.
    with pytest.raises(UnauthorizedError, match="metrics of VM 'db-1'"):
        await service.report_metrics(
            token,
            MetricsReport(
                "host-a",
                (MetricSample("procurator_vm_up", 1.0, "web-1"), MetricSample("x", 1.0, "db-1")),
            ),
        )
    assert service.worker_metrics() == {}
    described = await service.describe_vm("db-1")
    assert (described.observed_by, described.status, described.events) == ("", None, ())
    assert await service.recent_events() == ()
    # Nor may it invent a VM nobody has.
    with pytest.raises(UnauthorizedError, match="'ghost'"):
        await service.report_events(token, [event("ghost")])
    with pytest.raises(NotFoundError):
        await service.describe_vm("ghost")
    # Each refusal is logged with the worker id.
    refusals = [r for r in caplog.records if "refused its" in r.getMessage()]
    assert len(refusals) == 5
    assert all(getattr(r, "worker_id", "") == "host-a" for r in refusals)

    # What is its own is taken, through whole and change reports; a change
    # report that brings in the other's VM is refused and changes nothing.
    await service.report_status(token, WorkerStatus("host-a", result.generation, vms("web-1")))
    await service.report_events(token, [event("web-1", "mine")])
    with pytest.raises(UnauthorizedError, match="'db-1'"):
        await service.report_status_changes(
            token, StatusChanges("host-a", result.generation, changed=vms("db-1"))
        )
    assert await status_of(service, "host-a") == WorkerStatus(
        "host-a", result.generation, vms("web-1")
    )
    assert [e.event.message for e in await service.recent_events()] == ["mine"]


async def test_a_vm_being_removed_is_reported_until_the_worker_observed_its_removal(
    master: RestartableService, fleet_of: FleetOf
) -> None:
    service = svc(master)
    first = await service.apply(fleet_of({"host-a": [("web-1", "a"), ("web-2", "a")]}))
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    await service.report_status(
        token, WorkerStatus("host-a", first.generation, vms("web-1", "web-2"))
    )
    second = await service.apply(fleet_of({"host-a": [("web-1", "a")]}))

    # Stopping web-2: reported with the old generation, by whole and change reports.
    await service.report_status(
        token,
        WorkerStatus(
            "host-a", first.generation, (*vms("web-1"), *vms("web-2", phase=Phase.REMOVING))
        ),
    )
    await service.report_status_changes(
        token, StatusChanges("host-a", first.generation, changed=vms("web-2", phase=Phase.STOPPING))
    )
    # A report that claims the removal's generation cannot still show the VM.
    with pytest.raises(ValidationError, match="generation 2 removed that VM"):
        await service.report_status_changes(token, StatusChanges("host-a", second.generation))
    with pytest.raises(ValidationError, match="generation 2 removed that VM"):
        await service.report_status(
            token, WorkerStatus("host-a", second.generation, vms("web-1", "web-2"))
        )
    assert (await status_of(service, "host-a")) == WorkerStatus(
        "host-a", first.generation, (*vms("web-1"), *vms("web-2", phase=Phase.STOPPING))
    )
    # Gone: the removal is confirmed, and the status may no longer name it...
    await service.report_status_changes(
        token, StatusChanges("host-a", second.generation, removed=("web-2",))
    )
    with pytest.raises(UnauthorizedError, match="'web-2', which is neither assigned"):
        await service.report_status(
            token, WorkerStatus("host-a", second.generation, vms("web-1", "web-2"))
        )
    # ...but its last events and metric samples, sent apart, still arrive...
    await service.report_events(token, [event("web-2", "removed")])
    await service.report_metrics(token, MetricsReport("host-a", (MetricSample("x", 1.0, "web-2"),)))
    # ...for the grace period, not after.
    master.clock.now += GRACE
    with pytest.raises(UnauthorizedError, match="event of VM 'web-2'"):
        await service.report_events(token, [event("web-2", "late")])
    with pytest.raises(UnauthorizedError, match="metrics of VM 'web-2'"):
        await service.report_metrics(
            token, MetricsReport("host-a", (MetricSample("x", 1.0, "web-2"),))
        )
    assert [e.event.message for e in await service.recent_events("web-2")] == ["removed"]


async def test_a_moved_vm_is_reported_by_both_workers_until_the_old_one_lets_go(
    master: RestartableService, fleet_of: FleetOf
) -> None:
    service = svc(master)
    first = await service.apply(fleet_of({"host-a": [("web-1", "a")]}))
    a = await service.register(WorkerInfo("host-a"), FakeNode())
    b = await service.register(WorkerInfo("host-b"), FakeNode())
    await service.report_status(a, WorkerStatus("host-a", first.generation, vms("web-1")))
    # host-b may not speak for it before the move...
    with pytest.raises(UnauthorizedError):
        await service.report_status(b, WorkerStatus("host-b", 0, vms("web-1")))
    moved = await service.apply(fleet_of({"host-b": [("web-1", "a")]}))
    # ...and both may during it.
    await service.report_status(
        a, WorkerStatus("host-a", first.generation, vms("web-1", phase=Phase.STOPPING))
    )
    await service.report_status(b, WorkerStatus("host-b", 0, vms("web-1", phase=Phase.PENDING)))
    await service.report_events(a, [event("web-1", "stopped on a")])
    await service.report_events(b, [event("web-1", "created on b")])
    described = await service.describe_vm("web-1")
    assert (described.worker_id, described.observed_by) == ("host-b", "host-b")
    assert [(e.worker_id, e.event.message) for e in described.events] == [
        ("host-a", "stopped on a"),
        ("host-b", "created on b"),
    ]
    # Moved back before host-a let go: its own again, host-b's to remove.
    back = await service.apply(fleet_of({"host-a": [("web-1", "a")]}))
    await service.report_status(
        a, WorkerStatus("host-a", moved.generation, vms("web-1", phase=Phase.RUNNING))
    )
    await service.report_status(b, WorkerStatus("host-b", moved.generation, vms("web-1")))
    await service.report_status(b, WorkerStatus("host-b", back.generation))
    with pytest.raises(UnauthorizedError):
        await service.report_status(b, WorkerStatus("host-b", back.generation, vms("web-1")))
    await service.report_status(a, WorkerStatus("host-a", back.generation, vms("web-1")))


async def test_what_a_worker_may_report_survives_reconnects_and_master_restarts(
    master: RestartableService, fleet_of: FleetOf
) -> None:
    service = svc(master)
    first = await service.apply(fleet_of({"host-a": [("web-1", "a"), ("web-2", "a")]}))
    second = await service.apply(fleet_of({"host-a": [("web-1", "a")]}))
    stopping = WorkerStatus("host-a", first.generation, (*vms("web-1"), *vms("web-2")))
    # A new session of the same worker: the same rights.
    await service.register(WorkerInfo("host-a"), FakeNode())
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    await service.report_status(token, stopping)

    # A restarted master knows from its store that web-2 is being removed...
    service = await master.restart()
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    await service.report_status(token, stopping)
    with pytest.raises(ValidationError, match="never issued"):
        await service.report_status(token, WorkerStatus("host-a", second.generation + 1))
    await service.report_status(token, WorkerStatus("host-a", second.generation, vms("web-1")))
    # ...and, after one more restart, that the removal was confirmed: no
    # status may name web-2 now, its late events still may (grace).
    service = await master.restart()
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    with pytest.raises(UnauthorizedError, match="'web-2'"):
        await service.report_status(token, stopping)
    await service.report_events(token, [event("web-2", "removed")])
    # The grace is counted from the confirmation, across restarts too.
    master.clock.now += GRACE
    service = await master.restart()
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    with pytest.raises(UnauthorizedError, match="'web-2'"):
        await service.report_events(token, [event("web-2", "late")])
    await service.report_events(token, [event("web-1", "still mine")])


async def test_removed_workers_are_listed_until_they_confirm(
    master: RestartableService, fleet_of: FleetOf
) -> None:
    service = svc(master)
    first = await service.apply(
        fleet_of({"host-a": [("web-1", "a")], "host-b": [("db-1", "b")], "host-c": [("c-1", "c")]})
    )
    b = await service.register(WorkerInfo("host-b"), FakeNode())
    await service.register(WorkerInfo("host-d"), FakeNode())  # never given anything
    await service.report_status(b, WorkerStatus("host-b", first.generation, vms("db-1")))
    removed = await service.apply(fleet_of({"host-a": [("web-1", "a")]}))

    async def listed() -> list[str]:
        status = await service.fleet_status()
        view = [w.worker_id for w in service.fleet_view().workers]
        ids = [w.worker_id for w in status.workers]
        assert view == ids
        return ids

    # host-b and host-c may still run their VMs: listed; host-a has VMs.
    assert await listed() == ["host-a", "host-b", "host-c", "host-d"]
    await service.report_status(b, WorkerStatus("host-b", removed.generation))
    assert await listed() == ["host-a", "host-b", "host-c", "host-d"]  # still connected
    await service.unregister(b)
    assert await listed() == ["host-a", "host-c", "host-d"]
    # A restart forgets who is connected, not what is unconfirmed.
    service = await master.restart()
    assert await listed() == ["host-a", "host-c"]


async def test_over_the_wire_a_forged_report_is_refused_and_not_shown(
    bridge: Bridge, master_factory: type[RunningMaster], fleet_of: FleetOf, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        running = master_factory(nursery, tmp_path / "wire.db", "127.0.0.1:0")
        address = await running.start()
        async with open_control(bridge, address) as control:
            await control.apply(fleet_of({"host-a": [("web-1", "a")], "host-b": [("db-1", "b")]}))
            dialer = CapnpMasterDialer(bridge, address)
            session = await dialer.connect(WorkerInfo("host-a"), _ignore)
            try:
                forged = VmStatus("db-1", Phase.RUNNING, message="forged by host-a")
                with pytest.raises(UnauthorizedError, match="'db-1'"):
                    await session.report_status(WorkerStatus("host-a", 1, (forged,)))
                with pytest.raises(ValidationError, match="never issued"):
                    await session.report_status(WorkerStatus("host-a", 10**12, vms("web-1")))
                with pytest.raises(UnauthorizedError, match="'db-1'"):
                    await session.report_events([event("db-1", "forged")])
                await session.report_status(WorkerStatus("host-a", 1, vms("web-1")))
            finally:
                await session.aclose()
            described = await control.describe_vm("db-1")
            assert (described.observed_by, described.status, described.events) == ("", None, ())
            status = await control.status()
            (host_a,) = [w for w in status.workers if w.worker_id == "host-a"]
            assert host_a.status == WorkerStatus("host-a", 1, vms("web-1"))
        nursery.cancel_scope.cancel()


async def _ignore(assignment: object) -> None:
    return None


async def test_a_burst_of_change_reports_is_vetted_by_what_each_carries(
    master: RestartableService, fleet_of: FleetOf, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against the voice the last report was vetted with, a change report
    that keeps the observed generation is vetted by its own entries; when
    the voice was replaced meanwhile (here by hand: a move that ends, a
    catch-up), the next one is vetted whole again."""
    service = svc(master)
    result = await service.apply(fleet_of({"host-a": [(f"web-{i}", "a") for i in range(6)]}))
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    looked_at: list[int] = []
    status_problem = service._status_problem

    def counting(worker_id: str, observed: int, checked: Sequence[VmStatus]) -> object:
        looked_at.append(len(checked))
        return status_problem(worker_id, observed, checked)

    monkeypatch.setattr(service, "_status_problem", counting)
    ids = [f"web-{i}" for i in range(6)]
    await service.report_status(token, WorkerStatus("host-a", 0, vms(*ids[:4])))
    for vm_id in ids[3:]:
        await service.report_status_changes(token, StatusChanges("host-a", 0, changed=vms(vm_id)))
    assert looked_at == [4, 1, 1, 1]
    # A new observed generation is vetted whole.
    await service.report_status_changes(token, StatusChanges("host-a", result.generation))
    assert looked_at[-1] == 6

    # The voice replaced: web-0, which no report since touched, is no
    # longer the worker's to report.
    voice = service._voices["host-a"]
    service._voices["host-a"] = dataclasses.replace(voice, assigned=voice.assigned - {"web-0"})
    with pytest.raises(UnauthorizedError, match="'web-0'"):
        await service.report_status_changes(
            token,
            StatusChanges("host-a", result.generation, changed=vms("web-1", phase=Phase.FAILED)),
        )
    assert looked_at[-1] == 6
    assert await status_of(service, "host-a") == WorkerStatus(
        "host-a", result.generation, vms(*ids)
    )
