"""``procurator move VM --to WORKER [--live] [--wait] [--timeout S]`` and
``procurator moves [VM]``: move a VM to another worker, and show the moves
(docs/SNAPSHOTS.md, "Moves").

``move`` asks the master once (``Control.move``): the master records the
move (refusing it with the reason when it cannot be done) and its leader
drives it through its phases; ``--wait`` follows it until it is over.
``moves`` lists the moves under way and the newest that are over.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

import trio

from procurator.cli.args import add_common, add_master_address, int_between
from procurator.cli.connect import control_from_args
from procurator.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT
from procurator.cli.pipes import run_reader
from procurator.core.move import (
    DEFAULT_MOVE_TIMEOUT_S,
    MAX_MOVE_TIMEOUT_S,
    Move,
    MoveKind,
    MovePhase,
    move_json,
)
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import ControlClient

__all__ = ["add_parsers", "format_move"]

_MOVE_DESCRIPTION = """\
Move VM to worker WORKER, keeping its id and MAC (docs/SNAPSHOTS.md).

A cold move (the default): the target prepares the VM's image (realised
and rooted) while the VM runs on; then the VM is stopped on its worker
(stop ladder); once that worker reports it stopped, it sends the VM's
writable disk copies to the target (plain TCP to the target's
--transfer-listen address, a one-time token, sizes and sha256 checked),
and once the target has them all, the target boots the VM with them. The
VM never runs on two workers; any failure before the switch (a worker
lost, the image failing to prepare, --timeout passed) leaves it running
on its worker, and the move failed with the reason. The move is stored:
a master restart or failover continues it. The target must run with
--transfer-listen.

--live: a live move. The target starts an incoming VMM for the VM, the
source migrates the running guest into it (QEMU mirrors the disks while
it runs), and only once the source says it sent the whole state does the
VM switch to the target, which lets it run. Both workers must run the
same VMM driver, one that moves running VMs (refused otherwise, saying
which); cloud-hypervisor cannot move a VM with writable disks live yet
(the move fails, the VM runs on). Any failure before the switch leaves
the guest running on its worker.

Not carried: the VM's snapshots (they stay, and go with the VM's
directory on its old worker).

A pinned VM ([workers.W] in the fleet file) is pinned to WORKER by the
move; the next apply of a fleet file that still pins it elsewhere moves
it back (the fleet file wins): update the file. An unpinned VM stays on
WORKER.

exit status: 0 recorded (with --wait: done); 1 refused; 3 --wait: not
over after --timeout (the move goes on until its own deadline); 4 --wait:
the move failed.

example:
  procurator move web-1 --to host-b --wait
  procurator moves web-1"""


def add_parsers(sub: Any) -> None:
    """Register ``move`` and ``moves``."""
    raw = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("move", description=_MOVE_DESCRIPTION, formatter_class=raw)
    p.add_argument("vm", help="the VM's id")
    p.add_argument("--to", required=True, metavar="WORKER", help="the worker to move it to")
    p.add_argument(
        "--live",
        action="store_true",
        help="move it running (a live move: the same VMM driver on both workers)",
    )
    p.add_argument("--wait", action="store_true", help="follow the move until it is done or failed")
    p.add_argument(
        "--timeout",
        type=int_between(1, MAX_MOVE_TIMEOUT_S),
        default=DEFAULT_MOVE_TIMEOUT_S,
        metavar="S",
        help="the move fails if not done within S seconds (before its switch, the VM "
        f"stays on its worker); --wait waits as long (default: {DEFAULT_MOVE_TIMEOUT_S})",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_master_address(p)
    add_common(p, daemon=False)
    p.set_defaults(handler=lambda args: trio.run(run_reader, _move, args))

    q = sub.add_parser(
        "moves",
        description=(
            "The moves under way and the newest that are over, newest first: phase,\n"
            "source -> target, op id, and why a failed one failed.\n\n"
            "example:\n  procurator moves\n  procurator moves web-1 --json"
        ),
        formatter_class=raw,
    )
    q.add_argument("vm", nargs="?", default="", help="one VM's moves (default: all)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    add_master_address(q)
    add_common(q, daemon=False)
    q.set_defaults(handler=lambda args: trio.run(run_reader, _list, args))


async def _move(args: argparse.Namespace) -> int:
    kind = MoveKind.LIVE if args.live else MoveKind.COLD
    async with open_bridge() as bridge, control_from_args(bridge, args) as client:
        move = await client.move(args.vm, args.to, kind=kind, timeout_s=args.timeout)
        _show(move, args.json)
        if not args.wait:
            return EXIT_OK
        return await _wait(client, move, args.timeout, args.json)


async def _wait(client: ControlClient, move: Move, timeout: float, as_json: bool) -> int:
    """Follow ``move`` (blocking status reads, then its row) until it is
    over or ``timeout`` passed."""
    index = 0
    shown = move.phase
    with trio.move_on_after(timeout):
        while True:
            status = await client.status(wait_index=index, wait=min(timeout, 2.0))
            index = status.change_index
            now = next((m for m in await client.moves(move.vm_id) if m.op_id == move.op_id), None)
            if now is None:
                print(f"move {move.op_id}: no longer recorded")
                return EXIT_FAILED
            if now.phase is not shown:
                _show(now, as_json)
                shown = now.phase
            if now.phase is MovePhase.DONE:
                return EXIT_OK
            if now.phase is MovePhase.FAILED:
                return EXIT_FAILED
    print(f"move {move.op_id}: not over after {timeout:g} s; it goes on")
    return EXIT_TIMEOUT


def _show(move: Move, as_json: bool) -> None:
    print(json.dumps(move_json(move)) if as_json else format_move(move))
    sys.stdout.flush()


async def _list(args: argparse.Namespace) -> int:
    async with open_bridge() as bridge, control_from_args(bridge, args) as client:
        moves = await client.moves(args.vm)
    if args.json:
        print(json.dumps([move_json(m) for m in moves]))
    elif not moves:
        print("no moves" + (f" of VM {args.vm}" if args.vm else ""))
    else:
        print("\n".join(format_move(m) for m in moves))
    return EXIT_OK


def format_move(move: Move) -> str:
    """One line: the VM, where from and to, the phase (and why it failed)."""
    when = datetime.datetime.fromtimestamp(move.started_unix_ms / 1000, datetime.UTC)
    why = f": {move.reason}" if move.reason else ""
    if move.progress:
        why = f" {move.progress}{why}"
    return (
        f"move {move.op_id}: VM {move.vm_id} {move.source} -> {move.target} ({move.kind.value}, "
        f"asked {when:%Y-%m-%d %H:%M:%S}Z): {move.phase.value}{why}"
    )
