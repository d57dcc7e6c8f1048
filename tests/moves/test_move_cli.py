"""``procurator move`` and ``procurator moves`` over the wire: the command
as a process against an in-process master on a real socket (refusals, the
list), and a move's wire form."""

from __future__ import annotations

import json
import subprocess
import sys

import trio
from rpcfixtures import RunningMaster, make_fleet

from procurator.core.models import PowerState
from procurator.core.move import Move, MoveKind, MovePhase
from procurator.rpc import convert
from procurator.rpc.bridge import Bridge
from procurator.rpc.clients import open_control
from procurator.rpc.schema import load_schema

S = load_schema()


async def procurator(master: RunningMaster, *args: str) -> subprocess.CompletedProcess[bytes]:
    return await trio.run_process(
        [sys.executable, "-m", "procurator", *args, "--master", str(master.address)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )


async def test_refused_moves_say_why_and_exit_1(master: RunningMaster, bridge: Bridge) -> None:
    assert master.address is not None
    async with open_control(bridge, master.address) as client:
        await client.apply(make_fleet({"host-a": [("vm-1", "a")]}))
    for args, why in (
        (("vm-1", "--to", "host-a"), b"VM vm-1 is on worker host-a already; nothing was changed"),
        (("vm-1", "--to", "host-z"), b"worker host-z is unknown"),
        (("vm-9", "--to", "host-a"), b"VM vm-9 is not in the fleet"),
        (("vm-1", "--to", "host-z", "--live"), b"worker host-z is unknown"),
    ):
        refused = await procurator(master, "move", *args)
        assert refused.returncode == 1, refused
        assert why in refused.stderr, refused.stderr
    bad = await procurator(master, "move", "vm-1", "--to", "host-b", "--timeout", "0")
    assert bad.returncode == 2 and b"--timeout" in bad.stderr
    listed = await procurator(master, "moves")
    assert (listed.returncode, listed.stdout) == (0, b"no moves\n")
    as_json = await procurator(master, "moves", "vm-1", "--json")
    assert json.loads(as_json.stdout) == []


def test_a_move_crosses_the_wire_whole() -> None:
    move = Move(
        "vm-1",
        "host-a",
        "host-b",
        MoveKind.COLD,
        MovePhase.FAILED,
        "op-1",
        1_000,
        601_000,
        PowerState.RUNNING,
        42,
        2_000,
        "the target worker host-b is lost",
    )
    builder = S.MoveListResult.new_message()
    convert.fill_move_list(builder, [move, move])
    with S.MoveListResult.from_bytes(builder.to_bytes()) as reader:
        assert convert.move_list_from_reader(reader) == (move, move)
    builder = S.MoveResult.new_message()
    convert.fill_move_result(builder, move)
    with S.MoveResult.from_bytes(builder.to_bytes()) as reader:
        assert convert.move_from_reader(reader) == move
