"""``procurator describe worker W``: a worker's capacity and what is free
of it as placement counts it (its VMs and the VMs moving to it: a move
under way, not yet switched), used/total per resource, in text and
``--json``. The command as a process against an in-process master
(``MasterService`` on a real SQLite store, served on a real socket) whose
workers register in process and never report: the move stays under way."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "master"))

from masterhelpers import FakeNode

from procurator.cli.ops import describe_worker, worker_description_json
from procurator.core.models import Capacity, Fleet, VmAssignment, WorkerInfo
from procurator.core.move import MovePhase
from procurator.core.validation import LIMITS
from procurator.master.service import MasterService
from procurator.master.store import FleetStore
from procurator.rpc.address import Address, parse_address
from procurator.rpc.bridge import open_bridge
from procurator.rpc.master_server import serve_master

IMAGE = "/nix/store/" + "w" * 32 + "-vm"


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[MasterService, Address]]:
    async with (
        await FleetStore.open(tmp_path / "m.db") as store,
        open_bridge() as bridge,
        trio.open_nursery() as nursery,
    ):
        service = MasterService(store, push_timeout=1.0)
        await nursery.start(service.run)
        address = await nursery.start(serve_master, bridge, service, parse_address("127.0.0.1:0"))
        yield service, address
        nursery.cancel_scope.cancel()


async def procurator(address: Address, *args: str) -> subprocess.CompletedProcess[str]:
    done = await trio.run_process(
        [sys.executable, "-m", "procurator", *args, "--master", str(address)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


async def test_describe_worker_shows_used_and_total_counting_the_vms_moving_in(
    served: tuple[MasterService, Address],
) -> None:
    service, address = served
    for info in (
        # 4 CPUs sold twice over: 8 vCPUs; the master's VM limit.
        WorkerInfo("host-a", "1.0", Capacity(4, 4096, 0), cpu_overcommit=2.0),
        WorkerInfo(
            "host-b",
            "1.0",
            Capacity(4, 4096, 10),
            driver="qemu",
            labels=(("zone", "b"),),
            transfer_address="127.0.0.1:7400",
        ),
    ):
        await service.register(info, FakeNode())

    def vm(vm_id: str, vcpus: int, memory_mib: int) -> VmAssignment:
        return VmAssignment(vm_id, "h-" + vm_id, IMAGE, vcpus=vcpus, memory_mib=memory_mib)

    await service.apply(
        Fleet(
            (
                ("host-a", (vm("pin-1", 1, 1024), vm("web-1", 2, 1024), vm("bare-1", 0, 0))),
                ("host-b", (vm("db-1", 1, 512),)),
            )
        )
    )
    move = await service.move("web-1", "host-b")
    assert move.phase is MovePhase.PENDING  # nobody reports: it stays under way

    shown = await procurator(address, "describe", "worker", "host-b", "--json")
    assert shown.returncode == 0, shown.stderr
    b = json.loads(shown.stdout)
    # web-1 counts on its target from the move's commit...
    assert b["resources"] == {
        "vcpus": {"used": 3, "total": 4, "free": 1},
        "memory_mib": {"used": 1536, "total": 4096, "free": 2560},
        "vms": {"used": 2, "total": 10, "free": 8},
    }
    (moving,) = b["moving_in"]
    # The leader has it preparing by now, or soon: host-b never says prepared.
    assert moving.pop("phase") in ("pending", "preparing")
    assert moving == {"vm_id": "web-1", "source": "host-a", "op_id": move.op_id}
    assert (b["vms"], b["state"], b["connected"], b["driver"]) == (
        ["db-1"],
        "ready",
        True,
        "qemu",
    )
    assert (b["labels"], b["capacity"], b["undeclared_vms"]) == (
        {"zone": "b"},
        {"vcpus": 4, "memory_mib": 4096, "max_vms": 10},
        0,
    )
    # ... and on its source, whose assignment holds it until the switch.
    # (In process, the same functions the command runs: one process less.)
    a = worker_description_json(
        describe_worker(await service.fleet_status(), await service.moves(), "host-a")
    )
    limit = LIMITS.max_vms_per_worker  # host-a has no VM limit of its own
    assert a["resources"] == {
        "vcpus": {"used": 3, "total": 8, "free": 5},
        "memory_mib": {"used": 2048, "total": 4096, "free": 2048},
        "vms": {"used": 3, "total": limit, "free": limit - 3},
    }
    assert (a["moving_in"], a["undeclared_vms"], a["overcommit"]) == (
        [],
        1,
        {"cpu": 2.0, "memory": 1.0},
    )

    text = await procurator(address, "describe", "worker", "host-b")
    assert text.returncode == 0, text.stderr
    rows = text.stdout.splitlines()
    assert rows[0] == "worker host-b (ready, connected)"
    assert "  vcpus:      3/4 used, 1 free" in rows
    assert "  memory:     1536/4096 MiB used, 2560 MiB free" in rows
    assert "  vms:        2/10 used, 8 free" in rows
    assert f"  moving in:  web-1 (from host-a, op {move.op_id})" in rows
    assert "  capacity:   4 CPUs x 1, 4096 MiB x 1, VM limit 10" in rows

    unknown = await procurator(address, "describe", "worker", "host-z")
    assert unknown.returncode == 1 and "worker host-z is unknown" in unknown.stderr
