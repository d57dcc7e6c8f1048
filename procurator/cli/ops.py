"""``procurator describe vm ID`` and ``procurator events``.

Everything here is read-only and goes through the master's ``Control``
interface: ``describeVm`` for one VM (desired vs observed, its worker, its
newest events), ``events`` for the fleet's event stream. ``events
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
from typing import Any, TextIO

import trio

from procurator.cli.connect import control_from_args
from procurator.cli.exits import EXIT_OK
from procurator.cli.pipes import run_reader
from procurator.core.control import VmDescription, WorkerEvent
from procurator.core.errors import UnavailableError
from procurator.core.models import VmAssignment, VmStatus
from procurator.core.move import Move, move_json
from procurator.rpc.bridge import open_bridge

__all__ = [
    "describe_json",
    "event_json",
    "event_line",
    "print_description",
    "run_describe",
    "run_events",
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
    return trio.run(run_reader, _describe, args)


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


# ---------------------------------------------------------------- parsers
