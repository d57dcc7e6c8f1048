"""``procurator move VM --to WORKER [--live] [--wait] [--timeout S]`` and
``procurator moves [VM]``: move a VM to another worker, and show the moves
(docs/SNAPSHOTS.md, "Moves").

``move`` asks the master once (``Control.move``): the master records the
move (refusing it with the reason when it cannot be done) and its leader
drives it through its phases; ``--wait`` follows it until it is over,
or ``--timeout`` passed (then a live move whose migration is being
cancelled is followed up to ``CANCEL_GRACE_S`` more, for its source's
verdict).
``moves`` lists the moves under way and the newest that are over. Their
flags and help are ``procurator.cli.parsers``' (``move_and_moves``), which
runs ``run_move`` and ``run_moves`` here: a ``--help`` imports neither trio
nor Cap'n Proto.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Protocol

import trio

from procurator.cli.connect import control_from_args
from procurator.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT
from procurator.cli.pipes import run_reader
from procurator.core.control import FleetStatus
from procurator.core.move import Move, MoveKind, MovePhase, move_json
from procurator.rpc.bridge import open_bridge

__all__ = ["CANCEL_GRACE_S", "MoveWatch", "format_move", "run_move", "run_moves", "wait_for_move"]


def run_move(args: argparse.Namespace) -> int:
    """``procurator move`` (its parser: ``procurator.cli.parsers.move_and_moves``)."""
    return trio.run(run_reader, _move, args)


def run_moves(args: argparse.Namespace) -> int:
    """``procurator moves``."""
    return trio.run(run_reader, _list, args)


async def _move(args: argparse.Namespace) -> int:
    kind = MoveKind.LIVE if args.live else MoveKind.COLD
    async with open_bridge() as bridge, control_from_args(bridge, args) as client:
        move = await client.move(args.vm, args.to, kind=kind, timeout_s=args.timeout)
        _show(move, args.json)
        if not args.wait:
            return EXIT_OK
        return await wait_for_move(client, move, args.timeout, args.json)


#: How long ``--wait`` follows a live move past ``--timeout`` while its
#: migration is being stopped: the move's deadline (which ``--timeout``
#: also sets) found it ``migrating``, so the leader asks the source to
#: cancel (``cancelling``) and the source's verdict ends it, failed (the
#: migration undone: QEMU at its next poll, cloud-hypervisor as its relay
#: closes) or done (too late to undo). That takes the source seconds; a
#: verdict still missing after this grace is said, not waited for.
CANCEL_GRACE_S = 60.0


class MoveWatch(Protocol):
    """What ``--wait`` reads of the master (``ControlClient``)."""

    async def status(self, *, wait_index: int = 0, wait: float = 0.0) -> FleetStatus: ...

    async def moves(self, vm_id: str = "") -> tuple[Move, ...]: ...


async def wait_for_move(
    client: MoveWatch,
    move: Move,
    timeout: float,
    as_json: bool,
    *,
    grace: float = CANCEL_GRACE_S,
) -> int:
    """Follow ``move`` (blocking status reads, then its row) until it is
    over or ``timeout`` passed; past it, a live move ``migrating`` or
    ``cancelling`` is followed up to ``grace`` seconds more (its deadline
    cancels the migration, and only the source's verdict ends it). The
    exit status: ``EXIT_OK`` done, ``EXIT_FAILED`` failed (or no longer
    recorded), ``EXIT_TIMEOUT`` not over (said how it stands)."""
    last = move
    shown = move.phase
    index = 0

    async def follow() -> int:
        nonlocal last, shown, index
        while True:
            status = await client.status(wait_index=index, wait=2.0)
            index = status.change_index
            now = next((m for m in await client.moves(move.vm_id) if m.op_id == move.op_id), None)
            if now is None:
                print(f"move {move.op_id}: no longer recorded")
                return EXIT_FAILED
            last = now
            if now.phase is not shown:
                _show(now, as_json)
                shown = now.phase
            if now.phase is MovePhase.DONE:
                return EXIT_OK
            if now.phase is MovePhase.FAILED:
                return EXIT_FAILED

    with trio.move_on_after(timeout):
        return await follow()
    if last.phase in (MovePhase.MIGRATING, MovePhase.CANCELLING):
        with trio.move_on_after(grace):
            return await follow()
        if last.phase is MovePhase.CANCELLING:
            print(
                f"move {move.op_id}: cancelling after {timeout + grace:g} s: the source "
                f"{move.source} has been asked to stop the migration and has not said how it "
                f"ended; check `procurator moves {move.vm_id}`"
            )
            return EXIT_TIMEOUT
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
