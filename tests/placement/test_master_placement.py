"""The master places unpinned VMs at apply time (issue 27, phase B):
MasterService on a real SQLite store, workers as fake ``Node``s."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "master"))

from masterhelpers import FakeNode

from procurator.core.errors import ValidationError
from procurator.core.models import (
    Capacity,
    EventKind,
    Fleet,
    OnWorkerLost,
    PlacementPolicy,
    PlacementReason,
    PlacementStrategy,
    UnpinnedVm,
    VmAssignment,
    VmPlacement,
    WorkerInfo,
)
from procurator.master.service import MasterService, fleet_digest
from procurator.master.store import FleetStore

IMAGE = "/nix/store/" + "a" * 32 + "-vm"


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[MasterService]:
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        svc = MasterService(store, push_timeout=1.0)
        await nursery.start(svc.run)
        yield svc
        nursery.cancel_scope.cancel()


def info(worker_id: str, vcpus: int = 4, memory_mib: int = 4096, **labels: str) -> WorkerInfo:
    return WorkerInfo(
        worker_id, "1.0", Capacity(vcpus, memory_mib, 0), labels=tuple(sorted(labels.items()))
    )


def vm(vm_id: str, vcpus: int = 1, memory_mib: int = 1024, **constraints: str) -> UnpinnedVm:
    return UnpinnedVm(
        VmAssignment(vm_id, "h-" + vm_id, IMAGE, vcpus=vcpus, memory_mib=memory_mib),
        tuple(sorted(constraints.items())),
    )


def fleet(
    *unpinned: UnpinnedVm,
    pinned: Sequence[tuple[str, tuple[VmAssignment, ...]]] = (),
    strategy: PlacementStrategy = PlacementStrategy.BINPACK,
) -> Fleet:
    return Fleet(
        tuple(pinned), tuple(sorted(unpinned, key=lambda u: u.id)), PlacementPolicy(strategy)
    )


async def where(service: MasterService) -> dict[str, str]:
    """VM id -> the worker it is assigned to, as the master's status shows."""
    status = await service.fleet_status()
    return {v.id: w.worker_id for w in status.workers for v in w.desired_vms}


async def test_unpinned_vms_go_where_they_fit_and_match(service: MasterService) -> None:
    a, b, c = FakeNode(), FakeNode(), FakeNode()
    await service.register(info("host-a", zone="a"), a)
    await service.register(info("host-b", zone="b"), b)
    await service.register(info("host-c", vcpus=64, memory_mib=65536, zone="c"), c)
    result = await service.apply(
        fleet(vm("web-1", zone="b"), vm("web-2", zone="b"), vm("db-1", 2, 3072, zone="a"))
    )
    await trio.testing.wait_all_tasks_blocked()
    assert await where(service) == {"web-1": "host-b", "web-2": "host-b", "db-1": "host-a"}
    # What a worker receives is an assignment like any other.
    assert [v.id for v in b.pushed[-1].vms] == ["web-1", "web-2"]
    assert [v.id for v in a.pushed[-1].vms] == ["db-1"]
    assert c.pushed == []
    assert {d.worker_id: d.added for d in result.diffs} == {
        "host-a": ("db-1",),
        "host-b": ("web-1", "web-2"),
    }


async def test_placement_is_stable_across_applies(service: MasterService) -> None:
    for name in ("host-a", "host-b", "host-c"):
        await service.register(info(name), FakeNode())
    first = fleet(*(vm(f"web-{i}") for i in range(6)), strategy=PlacementStrategy.SPREAD)
    await service.apply(first)
    before = await where(service)
    assert sorted(before.values()) == ["host-a"] * 2 + ["host-b"] * 2 + ["host-c"] * 2
    # The same fleet again: nothing to do.
    again = await service.apply(first)
    assert not again.changed
    # One more VM, one fewer: the others stay where they were.
    second = fleet(*(vm(f"web-{i}") for i in range(1, 7)), strategy=PlacementStrategy.SPREAD)
    result = await service.apply(second)
    after = await where(service)
    assert {k: after[k] for k in before if k != "web-0"} == {
        k: v for k, v in before.items() if k != "web-0"
    }
    assert after["web-6"] == before["web-0"]  # the only room left
    assert sorted(a for d in result.diffs for a in d.added) == ["web-6"]


async def test_a_worker_that_is_not_connected_keeps_its_vms_and_takes_no_new_one(
    service: MasterService,
) -> None:
    token = await service.register(info("host-a"), FakeNode())
    await service.register(info("host-b"), FakeNode())
    await service.apply(fleet(vm("web-1", 2, 3072), vm("web-2", 2, 3072)))
    placed = await where(service)
    assert sorted(placed.values()) == ["host-a", "host-b"]
    await service.unregister(token)
    # host-a is away (its VMs may still run): an apply moves nothing off it
    # and places nothing new on it.
    await service.apply(fleet(vm("web-1", 2, 3072), vm("web-2", 2, 3072), vm("web-3")))
    after = await where(service)
    assert {k: after[k] for k in placed} == placed
    assert after["web-3"] == "host-b"


async def test_an_unplaceable_fleet_is_refused_whole_and_nothing_is_stored(
    service: MasterService,
) -> None:
    await service.register(info("host-a", zone="a"), FakeNode())
    await service.register(info("host-b", 2, 2048, zone="b"), FakeNode())
    await service.apply(fleet(vm("web-1", zone="a")))
    with pytest.raises(ValidationError) as refused:
        await service.apply(
            fleet(vm("web-1", zone="a"), vm("web-7", 4, 8192, zone="b"), vm("web-8"))
        )
    assert refused.value.message == "1 VM(s) cannot be placed; nothing was applied"
    # Against what the VMs that fit leave: web-8 took 1 vCPU/1 GiB of host-b.
    assert refused.value.details == (
        "web-7: needs 4 vCPU/8 GiB; best worker host-b has 1 vCPU/1 GiB free; "
        "1 worker excluded by constraint zone=b",
    )
    assert refused.value.op_id.startswith("op-")
    assert service.generation == 1
    assert await where(service) == {"web-1": "host-a"}


async def test_pinned_and_unpinned_vms_share_a_workers_capacity(service: MasterService) -> None:
    await service.register(info("host-a"), FakeNode())
    await service.register(info("host-b"), FakeNode())
    pinned = (("host-a", (VmAssignment("db-1", "h-db", IMAGE, vcpus=4, memory_mib=4096),)),)
    dry = await service.apply(fleet(vm("web-1"), pinned=pinned), dry_run=True)
    assert {d.worker_id: d.added for d in dry.diffs} == {
        "host-a": ("db-1",),
        "host-b": ("web-1",),
    }
    assert dry.placed == (VmPlacement("web-1", "host-b", PlacementReason.NEW),)
    assert service.generation == 0  # a dry run shows where, and stores nothing


async def test_the_result_says_which_vms_move_and_why(service: MasterService) -> None:
    await service.register(info("host-a", zone="a"), FakeNode())
    await service.register(info("host-b", zone="b"), FakeNode())
    first = await service.apply(fleet(vm("web-1", zone="a"), vm("web-2")))
    assert {p.vm_id: p.reason for p in first.placed} == {
        "web-1": PlacementReason.NEW,
        "web-2": PlacementReason.NEW,
    }
    second = await service.apply(fleet(vm("web-1", zone="b"), vm("web-2")))
    # web-2 keeps its worker: only what moves or is new is listed.
    assert second.placed == (
        VmPlacement("web-1", "host-b", PlacementReason.CONSTRAINTS, "host-a", "lacks zone=b"),
    )
    # And an event of the VM says so, under its new worker.
    (moved,) = [e for e in await service.recent_events("web-1") if e.worker_id == "host-b"]
    assert (moved.event.kind, moved.event.op_id) == (EventKind.RESCHEDULED, second.op_id)
    assert moved.event.message == (
        "moved from host-a to host-b (constraints no longer match: lacks zone=b)"
    )


async def test_no_worker_at_all_refuses_unpinned_vms(service: MasterService) -> None:
    with pytest.raises(ValidationError) as refused:
        await service.apply(fleet(vm("web-1")))
    assert refused.value.details == ("web-1: needs 1 vCPU/1 GiB; no worker is known",)


def test_the_request_digest_covers_unpinned_vms_and_keeps_pinned_ones() -> None:
    pinned = (("host-a", (VmAssignment("db-1", "h-db", IMAGE),)),)
    assert fleet_digest(Fleet(pinned)) == (
        # The digest of a pinned fleet is what it was before this phase.
        fleet_digest(Fleet(pinned, (), PlacementPolicy()))
    )
    base = fleet(vm("web-1"), pinned=pinned)
    changed = [
        fleet(vm("web-1", 2), pinned=pinned),
        fleet(vm("web-1", zone="b"), pinned=pinned),
        fleet(vm("web-1"), pinned=pinned, strategy=PlacementStrategy.SPREAD),
        Fleet(
            pinned,
            (UnpinnedVm(vm("web-1").vm, (), "", OnWorkerLost.WAIT),),
        ),
        Fleet(pinned, (UnpinnedVm(vm("web-1").vm, (), "g"),)),
    ]
    digests = {fleet_digest(f) for f in [base, *changed]}
    assert len(digests) == 1 + len(changed)
    assert fleet_digest(Fleet(pinned)) not in digests
