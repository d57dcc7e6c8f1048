"""``procurator worker cordon|uncordon|drain`` and ``status`` over the wire:
the command as a process, against an in-process master on a real socket."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import trio
from rpcfixtures import RunningMaster, make_fleet

from procurator.cli.status import _print_status
from procurator.core.control import FleetStatus, WorkerConnection
from procurator.core.drain import WorkerMode
from procurator.core.models import WorkerState
from procurator.rpc.bridge import Bridge
from procurator.rpc.clients import open_control


async def procurator(master: RunningMaster, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "procurator", *args, "--master", str(master.address)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_cordon_and_uncordon_from_the_command_line(
    master: RunningMaster, bridge: Bridge
) -> None:
    assert master.address is not None
    async with open_control(bridge, master.address) as client:
        await client.apply(make_fleet({"host-a": [("vm-1", "a")]}))

    unknown = await procurator(master, "worker", "cordon", "host-z")
    assert unknown.returncode == 1
    assert b"'host-z' is unknown: it never registered and has no VMs assigned" in unknown.stderr

    done = await procurator(master, "worker", "cordon", "host-a")
    assert (done.returncode, done.stdout) == (0, b"worker host-a cordoned: it takes no new VMs\n")
    again = await procurator(master, "worker", "cordon", "host-a", "--json")
    answer = json.loads(again.stdout)
    assert answer["changed"] is False and answer["mode"]["state"] == "cordoned"

    status = await procurator(master, "status", "--json")
    (worker,) = json.loads(status.stdout)["workers"]
    assert worker["state"] == "cordoned" and worker["mode"]["op_id"] == answer["mode"]["op_id"]
    # Never registered: no lease renewed.
    assert worker["lease_renewed_ago_ms"] is None
    table = (await procurator(master, "status")).stdout.decode()
    assert "STATE" in table.splitlines()[1] and "RENEWED" in table.splitlines()[1]
    assert table.splitlines()[2].split()[:3] == ["host-a", "cordoned", "-"]

    back = await procurator(master, "worker", "uncordon", "host-a")
    assert back.stdout == b"worker host-a uncordoned: it takes new VMs\n"
    bad = await procurator(master, "worker", "drain", "host-a", "--max-unavailable", "0")
    assert bad.returncode == 2 and b"--max-unavailable" in bad.stderr


def test_status_shows_a_drains_progress_and_why_it_is_blocked() -> None:
    mode = WorkerMode(WorkerState.DRAINING, "op-d", 1, 2, 1, 3, "web-3: needs 4 vCPU/8 GiB")
    worker = WorkerConnection(
        "host-a",
        True,
        1,
        7,
        None,
        0,
        3,
        state=WorkerState.DRAINING,
        renewed_ago_ms=4200,
        mode=mode,
        handoffs=1,
    )
    out = io.StringIO()
    _print_status(FleetStatus(7, (worker,)), out)
    lines = out.getvalue().splitlines()
    assert lines[2].split()[:4] == ["host-a", "draining", "1/3", "4s"]
    # 3 assigned, 2 of them still to move: 1 pinned stays.
    assert lines[3] == (
        "host-a: drain op-d: 1/3 moved, 1 in handoff (at most 2 at once); 1 pinned VM(s) stay; "
        "cannot go on: web-3: needs 4 vCPU/8 GiB"
    )
