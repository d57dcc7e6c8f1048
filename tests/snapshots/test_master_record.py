"""The master's record of the workers' snapshots (MasterService on a real
SQLite store, workers as hand-written fake Nodes): an operation's answer is
recorded, a fleet-wide list shows a worker that is away as last recorded,
and a worker's own answer replaces its record."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "master"))

from masterhelpers import FakeNode

from procurator.core.errors import UnavailableError
from procurator.core.models import Fleet, VmAssignment, WorkerInfo
from procurator.core.snapshot import SnapshotAction, SnapshotInfo, SnapshotRequest
from procurator.master.service import MasterService
from procurator.master.store import FleetStore

PATH = "/nix/store/" + "a" * 32 + "-img"


class SnapshotNode(FakeNode):
    """A worker's Node that keeps snapshots the way a worker answers."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: dict[tuple[str, str], SnapshotInfo] = {}
        self.requests: list[SnapshotRequest] = []

    async def snapshot(self, request: SnapshotRequest) -> SnapshotInfo:
        self.requests.append(request)
        key = (request.vm_id, request.name)
        if request.action is SnapshotAction.CREATE:
            self.kept[key] = SnapshotInfo(
                request.vm_id, request.name, "h", PATH, 10, len(self.kept), request.op_id
            )
            return self.kept[key]
        if request.action is SnapshotAction.DELETE:
            return self.kept.pop(key)
        return self.kept[key]

    async def list_snapshots(self, vm_id: str = "") -> tuple[SnapshotInfo, ...]:
        return tuple(i for i in self.kept.values() if vm_id in ("", i.vm_id))


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[MasterService]:
    async with await FleetStore.open(tmp_path / "m.db") as store, trio.open_nursery() as nursery:
        svc = MasterService(store, push_timeout=1.0)
        await nursery.start(svc.run)
        yield svc
        nursery.cancel_scope.cancel()


def _fleet(**workers: list[str]) -> Fleet:
    return Fleet(
        tuple((w, tuple(VmAssignment(vm, "h", PATH) for vm in vms)) for w, vms in workers.items())
    )


async def test_a_list_shows_a_worker_that_is_away_as_last_recorded(
    service: MasterService,
) -> None:
    a, b = SnapshotNode(), SnapshotNode()
    await service.register(WorkerInfo("host-a"), a)
    token_b = await service.register(WorkerInfo("host-b"), b)
    await service.apply(_fleet(**{"host-a": ["vm-a"], "host-b": ["vm-b"]}))
    made = await service.snapshot(SnapshotRequest(SnapshotAction.CREATE, "vm-a", "s1", op_id="o1"))
    assert made.worker_id == "host-a" and a.requests[-1].op_id == "o1"
    await service.snapshot(SnapshotRequest(SnapshotAction.CREATE, "vm-b", "s1"))
    await service.snapshot(SnapshotRequest(SnapshotAction.CREATE, "vm-b", "s2"))
    await service.snapshot(SnapshotRequest(SnapshotAction.DELETE, "vm-b", "s2"))

    await service.unregister(token_b)
    # Host-b is away: asking it is refused, the record answers for it.
    with pytest.raises(UnavailableError, match="not connected to this master"):
        await service.snapshot(SnapshotRequest(SnapshotAction.RESTORE, "vm-b", "s1"))
    listed = await service.list_snapshots()
    assert [(i.worker_id, i.vm_id, i.name) for i in listed] == [
        ("host-a", "vm-a", "s1"),
        ("host-b", "vm-b", "s1"),
    ]
    assert [i.name for i in await service.list_snapshots("vm-b")] == ["s1"]

    # A worker's own answer replaces what was recorded of it.
    a.kept.clear()
    assert [i.worker_id for i in await service.list_snapshots()] == ["host-b"]
