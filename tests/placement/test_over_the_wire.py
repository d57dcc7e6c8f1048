"""Unpinned VMs from a fleet file to the workers, over real sockets: the
fleet crosses the wire whole, the master places them, the workers (real
``MasterLink``s reporting labels and capacity) receive their VMs."""

from __future__ import annotations

import io
from typing import Any

import pytest
import trio

from procurator.cli.apply import _print_apply
from procurator.core.assignments import (
    AssignmentChanges,
    AssignmentUpdate,
    apply_assignment_changes,
)
from procurator.core.control import ApplyResult
from procurator.core.errors import ValidationError
from procurator.core.fleet import parse_fleet
from procurator.core.models import (
    Assignment,
    Capacity,
    PlacementReason,
    VmPlacement,
    WorkerInfo,
)
from procurator.rpc import convert
from procurator.rpc.bridge import Bridge
from procurator.rpc.clients import CapnpMasterDialer, open_control
from procurator.rpc.schema import load_schema
from procurator.worker.link import LinkSettings, MasterLink

S = load_schema()
IMAGE = "/nix/store/" + "b" * 32 + "-vm"
FAST = LinkSettings(resync_interval=0.5, call_timeout=5.0, backoff_initial=0.05, backoff_max=0.2)

FLEET = f"""
[workers.host-a]
vms = [ {{ id = "db-1", image = "{IMAGE}", vcpus = 2, memory_mib = 2048 }} ]

[placement]
strategy = "spread"

[[vms]]
id = "web-1"
image = "{IMAGE}"
vcpus = 1
memory_mib = 512
spread = "web"

[[vms]]
id = "web-2"
image = "{IMAGE}"
vcpus = 1
memory_mib = 512
spread = "web"
on_worker_lost = "wait"

[[vms]]
id = "gpu-1"
image = "{IMAGE}"
vcpus = 2
memory_mib = 1024
constraints = {{ gpu = "yes" }}
"""


def test_a_fleet_with_unpinned_vms_crosses_the_wire_whole() -> None:
    fleet = parse_fleet(FLEET)
    builder = S.Fleet.new_message()
    convert.fill_fleet(builder, fleet)
    with S.Fleet.from_bytes(builder.to_bytes()) as reader:
        assert convert.fleet_from_reader(reader) == fleet


def test_where_an_apply_placed_vms_crosses_the_wire_and_is_printed() -> None:
    result = ApplyResult(
        3,
        True,
        (),
        "op-1",
        placed=(
            VmPlacement("web-7", "host-c", PlacementReason.NEW),
            VmPlacement("web-3", "host-b", PlacementReason.NO_LONGER_FITS, "host-a", "needs more"),
        ),
    )
    builder = S.ApplyResult.new_message()
    convert.fill_apply_result(builder, result)
    with S.ApplyResult.from_bytes(builder.to_bytes()) as reader:
        assert convert.apply_result_from_reader(reader) == result
    out = io.StringIO()
    _print_apply(result, "fleet.toml", out)
    assert out.getvalue().splitlines()[1:] == [
        "  place: web-7 -> host-c (new)",
        "  move: web-3 host-a -> host-b (no longer fits: needs more)",
    ]


def test_the_reason_table_matches_the_schema() -> None:
    ordinals = S.PlacementReason.schema.enumerants
    assert list(convert.REASON_NAMES) == sorted(ordinals, key=ordinals.__getitem__)
    assert len(convert.REASON_NAMES) == len(PlacementReason)


def test_hostile_unpinned_vms_are_refused_naming_the_field() -> None:
    builder = S.Fleet.new_message()
    convert.fill_fleet(builder, parse_fleet(FLEET))
    web = builder.unpinned[1]
    web.vm.id = "Web/1"
    web.spread = "No Spaces"
    labels = web.init("constraints", 2)
    labels[0].name, labels[0].value = "gpu", "yes"
    labels[1].name, labels[1].value = "gpu", "no"
    builder.unpinned[0].constraints[0].value = "-"
    with pytest.raises(ValidationError) as caught, S.Fleet.from_bytes(builder.to_bytes()) as r:
        convert.fleet_from_reader(r)
    details = "\n".join(caught.value.details)
    assert "fleet.unpinned[0].constraints[0]: '-' is not a valid label value" in details
    assert "fleet.unpinned[1].id: " in details
    assert "fleet.unpinned[1].spread: 'No Spaces' is not a valid group name" in details
    assert "fleet.unpinned[1].constraints[1]: label 'gpu' is given twice" in details


class Received:
    def __init__(self) -> None:
        self.assignments: list[Assignment] = []
        self._changed = trio.Event()

    async def __call__(self, update: AssignmentUpdate) -> bool:
        if isinstance(update, AssignmentChanges):
            # As a worker does: changes apply to the assignment it holds.
            update = apply_assignment_changes(self.assignments[-1], update)
        self.assignments.append(update)
        self._changed.set()
        self._changed = trio.Event()
        return True

    async def wait_generation(self, generation: int) -> Assignment:
        with trio.fail_after(20):
            while not self.assignments or self.assignments[-1].generation < generation:
                await self._changed.wait()
        return self.assignments[-1]


async def test_the_master_places_what_the_fleet_file_leaves_unpinned(
    bridge: Bridge, master: Any
) -> None:
    infos = [
        WorkerInfo("host-a", "1", Capacity(4, 4096, 0)),
        WorkerInfo("host-b", "1", Capacity(4, 4096, 0), labels=(("gpu", "yes"),)),
    ]
    async with trio.open_nursery() as nursery:
        received = {}
        for info in infos:
            got = received[info.worker_id] = Received()
            link = MasterLink(CapnpMasterDialer(bridge, master.address), info, got, settings=FAST)
            await nursery.start(link.run)
            with trio.fail_after(20):
                await link.wait_connected()
        async with open_control(bridge, master.address) as control:
            result = await control.apply(parse_fleet(FLEET))
            a = await received["host-a"].wait_generation(result.generation)
            b = await received["host-b"].wait_generation(result.generation)
            # gpu-1 where gpu=yes (placed first: the most constrained), then
            # the spread group on different workers: web-1 on the emptiest.
            assert sorted(vm.id for vm in a.vms) == ["db-1", "web-2"]
            assert sorted(vm.id for vm in b.vms) == ["gpu-1", "web-1"]
            status = await control.status()
            shown = {w.worker_id: w.info for w in status.workers}
            assert shown["host-b"] is not None and shown["host-b"].labels == (("gpu", "yes"),)
            # Applied again, the same fleet changes nothing.
            again = await control.apply(parse_fleet(FLEET))
            assert (again.changed, again.generation) == (False, result.generation)
        nursery.cancel_scope.cancel()
