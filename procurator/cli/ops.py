"""``procurator describe vm ID``, ``procurator describe worker ID`` and
``procurator events``.

Everything here is read-only and goes through the master's ``Control``
interface: ``describeVm`` for one VM (desired vs observed, its worker, its
newest events), ``status`` and ``moves`` for one worker, ``events`` for
the fleet's event stream.

A worker's room is placement's view of it (docs/SCHEDULING.md): what it
offers (capacity times overcommit, its VM limit) and what its VMs and the
VMs moving to it take. The master's own functions compute it from what
``status`` and ``moves`` answer: ``procurator.master.scheduling.
worker_facts`` (the VMs moving in, from the moves under way and their
sources' assignments) and ``procurator.core.placement.worker_room``, which
the scheduler counts with too. ``events
--follow`` polls ``Control.events`` with the ``seq`` of the last event it
printed (the master numbers events as it receives them, increasingly, also
across its restarts), so it prints every event exactly once — unless the
master's bounded history dropped it before the next poll (a burst of more
than its per-VM or total bound within one ``--interval``). Polling, not a
subscription: one call per ``--interval`` per follower is cheap, and a
follower that goes away leaves nothing behind on the master.

Times are printed in local time; ``--json`` prints unix milliseconds.
Both commands end as soon as the reader of their output goes away
(``procurator.cli.pipes.run_reader``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TextIO

import trio

from procurator.cli.connect import control_from_args
from procurator.cli.exits import EXIT_OK
from procurator.cli.pipes import run_reader
from procurator.core.control import FleetStatus, VmDescription, WorkerConnection, WorkerEvent
from procurator.core.errors import NotFoundError, UnavailableError
from procurator.core.models import Assignment, VmAssignment, VmStatus
from procurator.core.move import Move, move_json
from procurator.core.placement import Room, WorkerRoom, worker_room
from procurator.master.scheduling import KnownWorker, worker_facts
from procurator.rpc.bridge import open_bridge

__all__ = [
    "WorkerDescription",
    "describe_json",
    "describe_worker",
    "event_json",
    "event_line",
    "print_description",
    "print_worker_description",
    "run_describe",
    "run_events",
    "worker_description_json",
]

# How many events ``events`` fetches per call.
EVENTS_PAGE = 1000


def _time(unix_ms: int) -> str:
    if unix_ms <= 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_ms / 1000))


# ---------------------------------------------------------------- events


def event_json(item: WorkerEvent) -> dict[str, Any]:
    e = item.event
    return {
        "seq": item.seq,
        "unix_time_ms": e.unix_time_ms,
        "worker_id": item.worker_id,
        "vm_id": e.vm_id,
        "kind": e.kind.value,
        "op_id": e.op_id,
        "message": e.message,
    }


def event_line(item: WorkerEvent, *, with_vm: bool = True) -> str:
    e = item.event
    cells = [_time(e.unix_time_ms), item.worker_id]
    if with_vm:
        cells.append(e.vm_id)
    cells += [f"{e.kind.value:<9}", e.op_id or "-", e.message]
    return "  ".join(cells)


def _print_events(events: Iterable[WorkerEvent], as_json: bool, out: TextIO) -> None:
    for item in events:
        if as_json:
            print(json.dumps(event_json(item), ensure_ascii=False), file=out)
        else:
            print(event_line(item), file=out)
    out.flush()


def run_events(args: argparse.Namespace) -> int:
    """``procurator events`` (its flags: ``procurator.cli.parsers``)."""
    return trio.run(run_reader, _events, args)


def run_describe(args: argparse.Namespace) -> int:
    """``procurator describe`` (its flags: ``procurator.cli.parsers``)."""
    return trio.run(run_reader, _describe_worker if args.kind == "worker" else _describe, args)


async def _events(args: argparse.Namespace) -> int:
    """Print the recent events; with ``--follow`` keep polling, and when the
    master goes away (restart, network) reconnect and go on after the last
    event printed (seqs keep increasing across master restarts)."""
    out = sys.stdout
    vm = args.vm or ""
    last: int | None = None  # None: nothing fetched yet
    while True:
        try:
            async with open_bridge() as bridge, control_from_args(bridge, args) as client:
                if last is None:
                    events = await client.events(vm, args.limit)
                    _print_events(events, args.json, out)
                    if not args.follow:
                        return EXIT_OK
                    last = events[-1].seq if events else 0
                while True:
                    if len(events) < EVENTS_PAGE:  # a full page: more are waiting
                        await trio.sleep(args.interval)
                    events = await client.events(vm, EVENTS_PAGE, after_seq=last)
                    _print_events(events, args.json, out)
                    if events:
                        last = events[-1].seq
        except UnavailableError as exc:
            if last is None:
                raise  # the first call: report it, as every command does
            print(f"events: {exc}; reconnecting in {args.interval:g} s", file=sys.stderr)
            events = ()
            await trio.sleep(args.interval)


# ---------------------------------------------------------------- describe


def _desired_json(vm: VmAssignment | None) -> dict[str, Any] | None:
    if vm is None:
        return None
    return {
        "hash": vm.hash,
        "image": vm.nix_store_path,
        "power": vm.power.value,
        "vcpus": vm.vcpus,
        "memory_mib": vm.memory_mib,
    }


def _status_json(vm: VmStatus | None) -> dict[str, Any] | None:
    if vm is None:
        return None
    return {
        "phase": vm.phase.value,
        "hash": vm.observed_hash,
        "power": vm.observed_power.value,
        "message": vm.message,
        "restarts": vm.restarts,
        "address": vm.address,
        "op_id": vm.op_id,
    }


def describe_json(d: VmDescription) -> dict[str, Any]:
    return {
        "vm_id": d.vm_id,
        "fleet_generation": d.fleet_generation,
        "worker_id": d.worker_id,
        "observed_by": d.observed_by,
        "worker_connected": d.worker_connected,
        "desired_generation": d.desired_generation,
        "desired_op_id": d.desired_op_id,
        "observed_generation": d.observed_generation,
        "desired": _desired_json(d.desired),
        "observed": _status_json(d.status),
        "last_error": _last_error(d),
        "move": move_json(d.move) if d.move is not None else None,
        "events": [event_json(e) for e in d.events],
    }


def _move_row(move: Move | None) -> str:
    """The VM's move under way or its last: phase, where, op id, why."""
    if move is None:
        return "-"
    progress = f" {move.progress}" if move.progress else ""
    why = f": {move.reason}" if move.reason else ""
    return (
        f"{move.phase.value}{progress} {move.source} -> {move.target} "
        f"({move.kind.value}, op {move.op_id}){why}"
    )


def _last_error(d: VmDescription) -> str:
    """The newest failure an event reported (the status message says what
    is going on now; this says what last went wrong)."""
    for item in reversed(d.events):
        if item.event.kind.value in ("failed", "crashed"):
            return f"{_time(item.event.unix_time_ms)} {item.event.kind.value}: {item.event.message}"
    return ""


def _pair(desired: str, observed: str) -> str:
    if desired == observed:
        return desired or "-"
    return f"desired {desired or '-'}, observed {observed or '-'}"


def print_description(d: VmDescription, out: TextIO) -> None:
    want, have = d.desired, d.status
    worker = d.worker_id or "(not desired on any worker)"
    if d.observed_by and d.observed_by != d.worker_id:
        worker += f"; reported by {d.observed_by}"
    connection = "connected" if d.worker_connected else "disconnected"
    rows = [
        ("worker", f"{worker} ({connection})"),
        ("image", want.nix_store_path if want else "-"),
        ("hash", _pair(want.hash if want else "", have.observed_hash if have else "")),
        (
            "generation",
            f"desired {d.desired_generation or '-'} (op {d.desired_op_id or '-'}), "
            f"worker observed {d.observed_generation or '-'}, fleet {d.fleet_generation}",
        ),
        (
            "power",
            _pair(
                want.power.value if want else "",
                have.observed_power.value if have else "",
            ),
        ),
        ("phase", f"{have.phase.value}: {have.message}" if have else "not reported"),
        ("address", have.address if have and have.address else "-"),
        ("restarts", str(have.restarts) if have else "-"),
        ("last op", have.op_id if have and have.op_id else "-"),
        ("last error", _last_error(d) or "-"),
        ("move", _move_row(d.move)),
    ]
    print(f"VM {d.vm_id}", file=out)
    for name, value in rows:
        print(f"  {name + ':':<12}{value}", file=out)
    if not d.events:
        print("no events", file=out)
        return
    print(f"events (newest last, {len(d.events)}):", file=out)
    for item in d.events:
        print("  " + event_line(item, with_vm=False), file=out)


async def _describe(args: argparse.Namespace) -> int:
    async with open_bridge() as bridge, control_from_args(bridge, args) as client:
        description = await client.describe_vm(args.id, args.events)
    if args.json:
        json.dump(describe_json(description), sys.stdout, indent=2)
        print()
    else:
        print_description(description, sys.stdout)
    return EXIT_OK


# ---------------------------------------------------------------- describe worker


@dataclass(frozen=True, slots=True)
class WorkerDescription:
    """One worker as ``procurator describe worker`` shows it: the master's
    view of it (``connection``), its room as placement counts it, and the
    moves under way to it that hold some of that room."""

    connection: WorkerConnection
    room: WorkerRoom
    moving_in: tuple[Move, ...]


def describe_worker(
    status: FleetStatus, moves: Iterable[Move], worker_id: str
) -> WorkerDescription:
    """Worker ``worker_id`` of ``status``, its room counted as the master's
    placement counts it (the module docstring); ``NotFoundError`` when the
    master knows no such worker."""
    connection = next((w for w in status.workers if w.worker_id == worker_id), None)
    if connection is None:
        raise NotFoundError(f"worker {worker_id} is unknown to the master")
    moves = tuple(moves)
    known = [KnownWorker(w.worker_id, w.info, w.connected) for w in status.workers]
    assignments = {
        w.worker_id: Assignment(w.worker_id, w.desired_generation, w.desired_vms)
        for w in status.workers
    }
    (facts,) = [
        f for f in worker_facts(known, assignments, moves=moves) if f.worker_id == worker_id
    ]
    incoming = {vm.id for vm in facts.incoming}
    moving_in = tuple(
        m
        for m in moves
        if m.target == worker_id and m.vm_id in incoming and not m.over and not m.switched
    )
    return WorkerDescription(connection, worker_room(facts, connection.desired_vms), moving_in)


def _room_json(room: Room) -> dict[str, int]:
    return {"used": room.used, "total": room.total, "free": room.free}


def worker_description_json(d: WorkerDescription) -> dict[str, Any]:
    w, info = d.connection, d.connection.info
    return {
        "worker_id": w.worker_id,
        "state": w.state.value if w.state is not None else None,
        "connected": w.connected,
        "registered": info is not None,
        "driver": info.driver if info is not None else "",
        "labels": dict(info.labels) if info is not None else {},
        "capacity": {
            "vcpus": info.capacity.vcpus if info is not None else 0,
            "memory_mib": info.capacity.memory_mib if info is not None else 0,
            "max_vms": info.capacity.max_vms if info is not None else 0,
        },
        "overcommit": {
            "cpu": info.cpu_overcommit if info is not None else None,
            "memory": info.memory_overcommit if info is not None else None,
        },
        "resources": {
            "vcpus": _room_json(d.room.vcpus),
            "memory_mib": _room_json(d.room.memory_mib),
            "vms": _room_json(d.room.vms),
        },
        "undeclared_vms": d.room.undeclared,
        "vms": sorted(vm.id for vm in w.desired_vms),
        "moving_in": [
            {"vm_id": m.vm_id, "source": m.source, "op_id": m.op_id, "phase": m.phase.value}
            for m in d.moving_in
        ],
    }


def _room_row(room: Room, unit: str = "") -> str:
    free = f"{room.free}{unit} free" if room.free >= 0 else f"over by {-room.free}{unit}"
    return f"{room.used}/{room.total}{unit} used, {free}"


def print_worker_description(d: WorkerDescription, out: TextIO) -> None:
    w, info = d.connection, d.connection.info
    state = w.state.value if w.state is not None else "-"
    connection = "connected" if w.connected else "disconnected"
    print(f"worker {w.worker_id} ({state}, {connection})", file=out)
    if info is None:
        rows = [("capacity", "never registered: it offers nothing")]
    else:
        labels = ", ".join(f"{k}={v}" for k, v in info.labels) or "-"
        limit = str(info.capacity.max_vms) if info.capacity.max_vms else "the master's"
        rows = [
            ("driver", info.driver or "-"),
            ("labels", labels),
            (
                "capacity",
                f"{info.capacity.vcpus} CPUs x {info.cpu_overcommit:g}, "
                f"{info.capacity.memory_mib} MiB x {info.memory_overcommit:g}, "
                f"VM limit {limit}",
            ),
        ]
    rows += [
        ("vcpus", _room_row(d.room.vcpus)),
        ("memory", _room_row(d.room.memory_mib, " MiB")),
        ("vms", _room_row(d.room.vms)),
    ]
    if d.room.undeclared:
        rows.append(
            ("undeclared", f"{d.room.undeclared} VM(s) declare no vcpus/memory_mib: counted as 0")
        )
    moving = ", ".join(f"{m.vm_id} (from {m.source}, op {m.op_id})" for m in d.moving_in)
    rows.append(("moving in", moving or "-"))
    for name, value in rows:
        print(f"  {name + ':':<12}{value}", file=out)
    print(
        "(used: its VMs and those moving in, as placement counts them; "
        "total: what it offers placement)",
        file=out,
    )


async def _describe_worker(args: argparse.Namespace) -> int:
    async with open_bridge() as bridge, control_from_args(bridge, args) as client:
        status = await client.status()
        moves = await client.moves()
    description = describe_worker(status, moves, args.id)
    if args.json:
        json.dump(worker_description_json(description), sys.stdout, indent=2)
        print()
    else:
        print_worker_description(description, sys.stdout)
    return EXIT_OK
