"""The master's side of operations: bounded event history, event seqs for
followers, ``describeVm`` and desired VMs in status, errors carrying the op
id — through a real Cap'n Proto server and control client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from procurator.core.errors import (
    NotFoundError,
    StaleGenerationError,
    UnsupportedError,
    ValidationError,
)
from procurator.core.fleet import parse_fleet
from procurator.core.models import (
    Assignment,
    EventKind,
    Phase,
    PowerState,
    VmEvent,
    VmStatus,
    WorkerInfo,
    WorkerStatus,
)
from procurator.master.service import MasterService
from procurator.master.store import FleetStore
from procurator.rpc.address import parse_address
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import ControlClient, open_control
from procurator.rpc.master_server import serve_master

IMAGE = "/nix/store/" + "a" * 32 + "-vm"
HASH = "a" * 32


class FakeNode:
    connection_id = 1

    def __init__(self) -> None:
        self.pushed: list[Assignment] = []

    async def push(self, assignment: Assignment) -> None:
        self.pushed.append(assignment)

    async def push_changes(self, changes: object) -> None:
        # An older worker: the master pushes it whole assignments.
        raise UnsupportedError("Node.pushChanges: not implemented by this fake")

    async def aclose(self) -> None:
        return None


@dataclass
class Served:
    service: MasterService
    control: ControlClient


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[Served]:
    async with (
        open_bridge() as bridge,
        await FleetStore.open(tmp_path / "m.db") as store,
        trio.open_nursery() as nursery,
    ):
        service = MasterService(store, events_per_vm=4, events_total=10)
        await nursery.start(service.run)
        address = await nursery.start(serve_master, bridge, service, parse_address("127.0.0.1:0"))
        async with open_control(bridge, address) as control:
            yield Served(service, control)
        nursery.cancel_scope.cancel()


def _fleet(power: str = "paused") -> str:
    return f'[workers.host-a]\nvms = [ {{ id = "web-1", image = "{IMAGE}", power = "{power}" }} ]\n'


async def _assign(served: Served, *vm_ids: str) -> None:
    """Assign ``vm_ids`` to host-a: a worker reports only its own VMs."""
    vms = ", ".join(f'{{ id = "{vm_id}", image = "{IMAGE}" }}' for vm_id in vm_ids)
    await served.control.apply(parse_fleet(f"[workers.host-a]\nvms = [ {vms} ]\n"))


async def test_event_history_is_bounded_per_vm_overall_and_in_vms(served: Served) -> None:
    service = served.service
    await _assign(served, "web-1", "a", "b", "c", *(f"vm-{i}" for i in range(25)))
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    await service.report_events(
        token, [VmEvent("web-1", EventKind.BOOTED, str(i)) for i in range(50)]
    )
    per_vm = await served.control.events("web-1", 1000)
    assert [e.event.message for e in per_vm] == ["46", "47", "48", "49"]
    # Full rings of several VMs together still hold at most events_total.
    await service.report_events(
        token, [VmEvent(vm, EventKind.BOOTED, f"{vm} {i}") for vm in "abc" for i in range(4)]
    )
    assert sum(len(ring) for ring in service._vm_events.values()) == 10
    assert await served.control.events("web-1", 1000) == ()  # left with the fleet's oldest
    kept = await served.control.events("a", 1000)
    assert [e.event.message for e in kept] == ["a 2", "a 3"]
    # Many VMs: the overall ring and the number of per-VM rings stay bounded.
    await service.report_events(
        token, [VmEvent(f"vm-{i}", EventKind.CREATED, f"vm {i}") for i in range(25)]
    )
    everything = await served.control.events("", 1000)
    assert [e.event.message for e in everything] == [f"vm {i}" for i in range(15, 25)]
    assert await served.control.events("web-1", 1000) == ()  # its ring was the stalest
    assert len(service._vm_events) == 10
    assert [e.event.message for e in await served.control.events("vm-24", 1000)] == ["vm 24"]


async def test_followers_page_by_seq(served: Served) -> None:
    service = served.service
    await _assign(served, "web-1")
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    await service.report_events(token, [VmEvent("web-1", EventKind.BOOTED, "a")])
    (first,) = await served.control.events("", 100)
    assert first.seq > 0 and first.worker_id == "host-a"
    assert await served.control.events("", 100, after_seq=first.seq) == ()
    await service.report_events(
        token, [VmEvent("web-1", EventKind.PAUSED, "b"), VmEvent("web-1", EventKind.RESUMED, "c")]
    )
    newer = await served.control.events("", 1, after_seq=first.seq)
    assert [e.event.message for e in newer] == ["b"]  # the oldest first, one page
    rest = await served.control.events("web-1", 100, after_seq=newer[-1].seq)
    assert [e.event.message for e in rest] == ["c"]
    assert first.seq < newer[0].seq < rest[0].seq


async def test_describe_shows_desired_observed_and_events(served: Served) -> None:
    service = served.service
    result = await served.control.apply(parse_fleet(_fleet()))
    token = await service.register(WorkerInfo("host-a"), FakeNode())
    await service.report_status(
        token,
        WorkerStatus(
            "host-a",
            result.generation,
            (
                VmStatus(
                    "web-1",
                    Phase.PAUSED,
                    observed_hash=HASH,
                    message="paused (pid 7)",
                    restarts=2,
                    address="10.120.0.9",
                    observed_power=PowerState.PAUSED,
                    op_id=result.op_id,
                ),
            ),
        ),
    )
    await service.report_events(
        token, [VmEvent("web-1", EventKind.PAUSED, "paused (VMM pid 7)", result.op_id, 1000)]
    )
    described = await served.control.describe_vm("web-1")
    assert described.desired is not None and described.status is not None
    assert (described.desired.power, described.status.observed_power) == (PowerState.PAUSED,) * 2
    assert described.desired.hash == described.status.observed_hash == HASH
    assert (described.worker_id, described.observed_by) == ("host-a", "host-a")
    assert described.worker_connected
    assert described.desired_generation == described.observed_generation == result.generation
    assert described.desired_op_id == result.op_id
    assert (described.status.restarts, described.status.address) == (2, "10.120.0.9")
    assert [(e.event.kind, e.event.op_id) for e in described.events] == [
        (EventKind.PAUSED, result.op_id)
    ]
    # The fleet status carries the desired VMs too: desired vs observed power.
    (worker,) = (await served.control.status()).workers
    assert [(vm.id, vm.power) for vm in worker.desired_vms] == [("web-1", PowerState.PAUSED)]

    # Moved to host-b, which has not started it yet: still shown on host-a,
    # but the generation next to host-b's desired one is host-b's.
    moved = await served.control.apply(
        parse_fleet(f'[workers.host-b]\nvms = [ {{ id = "web-1", image = "{IMAGE}" }} ]\n')
    )
    token_b = await service.register(WorkerInfo("host-b"), FakeNode())
    await service.report_status(token_b, WorkerStatus("host-b", 0))
    described = await served.control.describe_vm("web-1")
    assert (described.worker_id, described.observed_by) == ("host-b", "host-a")
    assert described.desired_generation == moved.generation
    assert described.observed_generation == 0  # not host-a's

    with pytest.raises(NotFoundError, match="'web-9' is neither desired"):
        await served.control.describe_vm("web-9")
    with pytest.raises(ValidationError):
        await served.control.describe_vm("Not An Id")


async def test_apply_errors_carry_the_op_id(served: Served) -> None:
    await served.control.apply(parse_fleet(_fleet("running")))
    with pytest.raises(StaleGenerationError) as stale:
        await served.control.apply(parse_fleet(_fleet()), expected_generation=7)
    assert stale.value.op_id.startswith("op-")
    assert f"(op {stale.value.op_id})" in str(stale.value)
    # A power change alone is a diff of its own, never a replacement.
    dry = await served.control.apply(parse_fleet(_fleet()), dry_run=True)
    (diff,) = dry.diffs
    assert diff.replaced == () and diff.added == ()
    assert [(c.vm_id, c.before, c.after) for c in diff.power_changed] == [
        ("web-1", PowerState.RUNNING, PowerState.PAUSED)
    ]
