"""``procurator status`` shows the moves under way to and from each worker
(issue 30): a move takes capacity on its target (``WorkerFacts.incoming``)
while its VM still counts on its source, and the status said nothing of
it. The table's line per worker with moves and ``--json``'s ``moves``,
rendered from a fleet status and the master's move list; and the command
as a process against an in-process master on a real socket."""

from __future__ import annotations

import io
import json
import sys

import trio
from rpcfixtures import RunningMaster, make_fleet

from procurator.cli.status import _print_status, _status_json
from procurator.core.control import FleetStatus, WorkerConnection
from procurator.core.models import PowerState
from procurator.core.move import Move, MoveKind, MovePhase
from procurator.rpc.bridge import Bridge
from procurator.rpc.clients import open_control


def _move(vm: str, source: str, target: str, phase: MovePhase) -> Move:
    return Move(
        vm, source, target, MoveKind.LIVE, phase, f"op-{vm}", 1_000, 61_000, PowerState.RUNNING, 1
    )


MOVES = (
    _move("vm-1", "host-a", "host-b", MovePhase.MIGRATING),
    _move("vm-2", "host-a", "host-b", MovePhase.PREPARING),
    _move("vm-3", "host-b", "host-a", MovePhase.CANCELLING),
    _move("vm-4", "host-a", "host-b", MovePhase.DONE),  # over: not shown
    _move("vm-5", "host-c", "host-d", MovePhase.FAILED),
)


def _worker(worker_id: str) -> WorkerConnection:
    return WorkerConnection(worker_id, True, 1, 7, None, 0, 2)


def test_status_shows_each_workers_moves_in_and_out() -> None:
    status = FleetStatus(7, (_worker("host-a"), _worker("host-b"), _worker("host-c")))
    out = io.StringIO()
    _print_status(status, out, MOVES)
    lines = out.getvalue().splitlines()
    assert (
        "host-a: moves in 1 (cancelling=1), out 2 (migrating=1 preparing=1); each counts on "
        "both its workers until it switches"
    ) in lines, lines
    assert (
        "host-b: moves in 2 (migrating=1 preparing=1), out 1 (cancelling=1); each counts on "
        "both its workers until it switches"
    ) in lines, lines
    assert not any(line.startswith("host-c: moves") for line in lines), lines
    workers = {w["worker_id"]: w["moves"] for w in _status_json(status, MOVES)["workers"]}
    assert workers == {
        "host-a": {"in": {"cancelling": 1}, "out": {"migrating": 1, "preparing": 1}},
        "host-b": {"in": {"migrating": 1, "preparing": 1}, "out": {"cancelling": 1}},
        "host-c": {"in": {}, "out": {}},
    }


async def test_status_json_lists_moves_per_worker(master: RunningMaster, bridge: Bridge) -> None:
    assert master.address is not None
    async with open_control(bridge, master.address) as client:
        await client.apply(make_fleet({"host-a": [("vm-1", "a")]}))
    done = await trio.run_process(
        [sys.executable, "-m", "procurator", "status", "--json", "--master", str(master.address)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done
    workers = json.loads(done.stdout)["workers"]
    assert workers and all(w["moves"] == {"in": {}, "out": {}} for w in workers), workers
