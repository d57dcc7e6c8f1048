"""``procurator status``: the fleet generation, each worker's connection
and generations, the moves under way to and from each worker (count and
phases: a move takes capacity on its target and keeps it on its source
until it switches), and every VM's phase, power, address and restarts; as
a table or as JSON (``--json``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import trio

from procurator.cli.connect import control_from_args
from procurator.cli.exits import EXIT_OK
from procurator.cli.pipes import run_reader
from procurator.core.control import FleetStatus, WorkerConnection
from procurator.core.drain import mode_json
from procurator.core.models import VmAssignment, VmStatus, WorkerInfo, WorkerState
from procurator.core.move import Move
from procurator.rpc.bridge import open_bridge

__all__ = ["phase_counts", "print_vm_table", "run", "status_vm_json", "worker_moves"]


def run(args: argparse.Namespace) -> int:
    """``procurator status`` (its flags: ``procurator.cli.parsers.status``)."""
    return trio.run(run_reader, _status, args)


async def _status(args: argparse.Namespace) -> int:
    async with open_bridge() as bridge, control_from_args(bridge, args) as client:
        status = await client.status()
        moves = await client.moves()
    if args.json:
        json.dump(_status_json(status, moves), sys.stdout, indent=2)
        print()
    else:
        _print_status(status, sys.stdout, moves)
    return EXIT_OK


def _format_time(unix_ms: int) -> str:
    if unix_ms <= 0:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(unix_ms / 1000))


def phase_counts(worker: WorkerConnection) -> dict[str, int]:
    counts: dict[str, int] = {}
    if worker.status is not None:
        for vm in worker.status.vms:
            counts[vm.phase.value] = counts.get(vm.phase.value, 0) + 1
    return dict(sorted(counts.items()))


def worker_moves(worker_id: str, moves: Sequence[Move]) -> dict[str, dict[str, int]]:
    """The moves not over to (``in``) and from (``out``) ``worker_id``:
    per direction, how many in each phase."""
    counts: dict[str, dict[str, int]] = {"in": {}, "out": {}}
    for move in moves:
        if move.over:
            continue
        for direction, end in (("in", move.target), ("out", move.source)):
            if end == worker_id:
                phases = counts[direction]
                phases[move.phase.value] = phases.get(move.phase.value, 0) + 1
    return {direction: dict(sorted(c.items())) for direction, c in counts.items()}


def _status_json(status: FleetStatus, moves: Sequence[Move] = ()) -> dict[str, Any]:
    return {
        "generation": status.generation,
        "workers": [_worker_json(w, moves) for w in status.workers],
    }


def _worker_json(w: WorkerConnection, moves: Sequence[Move] = ()) -> dict[str, Any]:
    desired = {d.id: d for d in w.desired_vms}
    return {
        "worker_id": w.worker_id,
        "state": w.state.value if w.state is not None else None,
        "connected": w.connected,
        "since_unix_ms": w.since_unix_ms,
        "lease_renewed_unix_ms": w.renewed_unix_ms or None,
        "lease_renewed_ago_ms": w.renewed_ago_ms if w.renewed_ago_ms >= 0 else None,
        "mode": mode_json(w.mode),
        "handoffs": w.handoffs,
        "desired_generation": w.desired_generation,
        "observed_generation": w.status.observed_generation if w.status else None,
        "last_report_unix_ms": w.last_report_unix_ms,
        "vm_count": w.vm_count,
        "info": _info_json(w.info),
        "phases": phase_counts(w),
        "moves": worker_moves(w.worker_id, moves),
        "vms": [
            status_vm_json(vm, desired.get(vm.id)) for vm in (w.status.vms if w.status else ())
        ],
    }


def _info_json(info: WorkerInfo | None) -> dict[str, Any] | None:
    if info is None:
        return None
    return {
        "version": info.version,
        "driver": info.driver,
        "metrics_url": info.metrics_url,
        "capacity": {
            "vcpus": info.capacity.vcpus,
            "memory_mib": info.capacity.memory_mib,
            "max_vms": info.capacity.max_vms,
        },
    }


def _host(info: WorkerInfo | None) -> str:
    """``qemu 2cpu 23.4GiB`` for the status table."""
    if info is None:
        return "-"
    cap = info.capacity
    return f"{info.driver or '?'} {cap.vcpus}cpu {cap.memory_mib / 1024:.1f}GiB"


def _print_status(status: FleetStatus, out: TextIO, moves: Sequence[Move] = ()) -> None:
    print(f"fleet generation {status.generation}", file=out)
    if not status.workers:
        print("no workers", file=out)
        return
    rows = [
        ("WORKER", "STATE", "RENEWED", "CONNECTION", "HOST", "DESIRED", "OBSERVED", "VMS", "PHASES")
    ]
    for w in status.workers:
        if w.connected:
            connection = f"up since {_format_time(w.since_unix_ms)}"
        elif w.since_unix_ms:
            # Away: lost once its lease expired (the STATE column), else
            # within its lease (it may be back any moment).
            connection = f"away since {_format_time(w.since_unix_ms)}"
        else:
            connection = "never connected"
        observed = str(w.status.observed_generation) if w.status else "-"
        phases = " ".join(f"{k}={v}" for k, v in phase_counts(w).items()) or "-"
        rows.append(
            (
                w.worker_id,
                _state(w),
                _ago(w.renewed_ago_ms),
                connection,
                _host(w.info),
                str(w.desired_generation),
                observed,
                str(w.vm_count),
                phases,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip(), file=out)
    for w in status.workers:
        # Listed with nothing to run and disconnected: the master keeps it
        # until it confirms the removal of its VMs.
        if not w.connected and w.vm_count == 0:
            print(
                f"{w.worker_id}: nothing left to run, but it has not confirmed stopping its "
                "VMs: it may still run them until it reconnects",
                file=out,
            )
        if (line := _drain_line(w)) is not None:
            print(line, file=out)
        if (line := _moves_line(w.worker_id, moves)) is not None:
            print(line, file=out)
    print_vm_table(status, out)


def _moves_line(worker_id: str, moves: Sequence[Move]) -> str | None:
    """``host-b: moves in 1 (migrating=1), out 0``: why capacity is taken."""
    counts = worker_moves(worker_id, moves)
    if not any(counts.values()):
        return None
    parts = []
    for direction, phases in counts.items():
        listed = " ".join(f"{k}={v}" for k, v in phases.items())
        parts.append(f"{direction} {sum(phases.values())}" + (f" ({listed})" if listed else ""))
    return (
        f"{worker_id}: moves {', '.join(parts)}; each counts on both its workers until it switches"
    )


def _state(w: WorkerConnection) -> str:
    """``draining 2/5`` for the status table (``?`` from an older master)."""
    if w.state is None:
        return "?"
    if w.state is WorkerState.DRAINING and w.mode is not None:
        return f"draining {w.mode.moved}/{w.mode.total}"
    return w.state.value


def _ago(ms: int) -> str:
    """How long ago, for the RENEWED column (``-``: never or unknown)."""
    if ms < 0:
        return "-"
    seconds = ms // 1000
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def _drain_line(w: WorkerConnection) -> str | None:
    """A draining (or drained) worker's progress, one line."""
    mode = w.mode
    if mode is None or not (mode.state is WorkerState.DRAINING or mode.total):
        return None
    if mode.state is WorkerState.DRAINING:
        line = (
            f"{w.worker_id}: drain {mode.op_id}: {mode.moved}/{mode.total} moved, "
            f"{w.handoffs} in handoff (at most {mode.max_unavailable} at once)"
        )
    else:
        line = f"{w.worker_id}: drained by {mode.op_id}: {mode.moved}/{mode.total} moved"
    pinned = w.vm_count - (mode.total - mode.moved) if mode.state is WorkerState.DRAINING else 0
    if pinned > 0:
        line += f"; {pinned} pinned VM(s) stay"
    if mode.blocked:
        line += f"; cannot go on: {mode.blocked}"
    return line


def status_vm_json(vm: VmStatus, desired: VmAssignment | None) -> dict[str, Any]:
    """One VM of ``status --json``: what the worker reports, next to what
    is desired of it."""
    return {
        "id": vm.id,
        "phase": vm.phase.value,
        "observed_hash": vm.observed_hash,
        "desired_hash": desired.hash if desired else None,
        "desired_power": desired.power.value if desired else None,
        "observed_power": vm.observed_power.value,
        "message": vm.message,
        "restarts": vm.restarts,
        "address": vm.address,
        "op_id": vm.op_id,
        "health": vm.health.value,
    }


def print_vm_table(status: FleetStatus, out: TextIO) -> None:
    """Per VM: worker, phase, desired vs observed power, address."""
    rows = [("VM", "WORKER", "PHASE", "POWER (DESIRED/OBSERVED)", "ADDRESS", "RESTARTS")]
    for w in status.workers:
        desired = {vm.id: vm for vm in w.desired_vms}
        reported = {vm.id: vm for vm in (w.status.vms if w.status else ())}
        for vm_id in sorted(set(desired) | set(reported)):
            want, have = desired.get(vm_id), reported.get(vm_id)
            power = (
                f"{want.power.value if want else '-'}/{have.observed_power.value if have else '-'}"
            )
            rows.append(
                (
                    vm_id,
                    w.worker_id,
                    have.phase.value if have else "not reported",
                    power,
                    have.address if have and have.address else "-",
                    str(have.restarts) if have else "-",
                )
            )
    if len(rows) == 1:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    print(file=out)
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]).rstrip(), file=out)
