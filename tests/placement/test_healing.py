"""Healing (issue 27): when a worker's lease expires, the leader places its
``reschedule`` VMs on other workers in a new generation; ``wait`` VMs and
pinned ones stay. MasterService on a real SQLite store, short leases,
workers as fake ``Node``s."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "master"))

from masterhelpers import FakeNode

from procurator.core.models import (
    Capacity,
    EventKind,
    Fleet,
    OnWorkerLost,
    PlacementPolicy,
    UnpinnedVm,
    VmAssignment,
    WorkerInfo,
)
from procurator.master.scheduling import is_lost
from procurator.master.service import MasterService
from procurator.master.store import FleetStore, Registration

IMAGE = "/nix/store/" + "d" * 32 + "-vm"
LEASE = 1.0  # seconds: a worker's lease, and how long the master is up before it heals


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[MasterService]:
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        svc = MasterService(store, push_timeout=1.0, worker_lease=LEASE, leader_lease=LEASE)
        await nursery.start(svc.run)
        yield svc
        nursery.cancel_scope.cancel()


def info(worker_id: str, vcpus: int, memory_mib: int) -> WorkerInfo:
    return WorkerInfo(worker_id, "1.0", Capacity(vcpus, memory_mib, 0))


def unpinned(vm_id: str, lost: OnWorkerLost = OnWorkerLost.RESCHEDULE) -> UnpinnedVm:
    vm = VmAssignment(vm_id, "h-" + vm_id, IMAGE, vcpus=1, memory_mib=1024)
    return UnpinnedVm(vm, on_worker_lost=lost)


async def where(service: MasterService) -> dict[str, str]:
    status = await service.fleet_status()
    return {v.id: w.worker_id for w in status.workers for v in w.desired_vms}


async def wait_until_moved(service: MasterService, vm_id: str, worker_id: str) -> None:
    with trio.fail_after(30):  # a hang guard: healing takes about a lease
        while (await where(service)).get(vm_id) != worker_id:
            await service.wait_change(service.change_index, 1.0)


async def test_a_lost_workers_reschedule_vms_move_and_wait_vms_stay(
    service: MasterService,
) -> None:
    pinned = (("host-a", (VmAssignment("pin-1", "h-pin", IMAGE, vcpus=1, memory_mib=1024),)),)
    fleet = Fleet(
        pinned,
        (
            unpinned("db-1", OnWorkerLost.WAIT),
            unpinned("web-1"),
            unpinned("web-2"),
        ),
        PlacementPolicy(),
    )
    token = await service.register(info("host-a", 8, 8192), FakeNode())
    applied = await service.apply(fleet)
    assert set((await where(service)).values()) == {"host-a"}
    # Room for one of the two reschedule VMs elsewhere.
    b = FakeNode()
    await service.register(info("host-b", 1, 1024), b)
    gone_at = trio.current_time()
    await service.unregister(token)  # host-a is gone: its lease runs out

    await wait_until_moved(service, "web-1", "host-b")
    # Never before a whole lease since it was last heard of (load can only
    # make this later).
    assert trio.current_time() - gone_at >= LEASE
    placed = await where(service)
    # web-2 fits nowhere and stays, unavailable; the wait VM and the
    # pinned VM stay on their worker.
    assert placed == {"pin-1": "host-a", "db-1": "host-a", "web-1": "host-b", "web-2": "host-a"}
    assert service.generation == applied.generation + 1
    with trio.fail_after(10):  # stored right after the commit
        while not (
            moved := [e for e in await service.recent_events("web-1") if e.worker_id == "host-b"]
        ):
            await service.wait_change(service.change_index, 1.0)
    (event,) = moved
    assert event.event.kind is EventKind.RESCHEDULED
    assert event.event.message == "moved from host-a to host-b (worker lost)"
    with trio.fail_after(10):
        while not b.pushed or [v.id for v in b.pushed[-1].vms] != ["web-1"]:
            await trio.sleep(0.01)
    # host-a comes back: its assignment no longer has web-1 (it stops it).
    back = await service.register(info("host-a", 8, 8192), FakeNode())
    assignment, _ = await service.get_assignment(back, 0)
    assert [v.id for v in assignment.vms] == ["db-1", "pin-1", "web-2"]


async def test_the_rules_of_an_apply_that_moves_nothing_are_stored(
    service: MasterService,
) -> None:
    token = await service.register(info("host-a", 4, 4096), FakeNode())
    first = await service.apply(Fleet((), (unpinned("web-1"), unpinned("web-2"))))
    # web-1 should now wait for its worker: no VM moves, the rule is stored.
    second = await service.apply(
        Fleet((), (unpinned("web-1", OnWorkerLost.WAIT), unpinned("web-2")))
    )
    assert second.changed and second.diffs == () and second.generation == first.generation + 1
    await service.register(info("host-b", 4, 4096), FakeNode())
    await service.unregister(token)
    await wait_until_moved(service, "web-2", "host-b")  # healed
    assert (await where(service))["web-1"] == "host-a"  # waits


def test_a_worker_is_lost_a_whole_lease_after_it_was_last_heard_of() -> None:
    # As a master caches it: renewals do not reach the cache, so the expiry
    # is the registration's, long past; since_unix_ms is when it went away.
    gone = Registration("m1", 1, WorkerInfo("w"), False, 10_000, 1_000, 2_000)
    assert not is_lost(gone, 10_999, lease_ms=1_000, up_since_ms=0)
    assert is_lost(gone, 11_000, lease_ms=1_000, up_since_ms=0)
    # Connected (to any master), or never registered: not lost.
    assert not is_lost(replace(gone, connected=True), 99_000, lease_ms=1_000, up_since_ms=0)
    assert not is_lost(None, 99_000, lease_ms=1_000, up_since_ms=0)
    # A master up for less than a lease has not given workers the time to
    # come back to it.
    assert not is_lost(gone, 11_000, lease_ms=1_000, up_since_ms=10_500)
    assert is_lost(gone, 11_500, lease_ms=1_000, up_since_ms=10_500)
