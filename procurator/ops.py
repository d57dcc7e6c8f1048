"""Operator commands: ``procurator describe vm ID`` and ``procurator events``,
and the per-VM power view of ``procurator status``.

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

In a pipe (``procurator status | head``), every command behaves as a
pipe-reading tool should: when the reader of its output goes away, it ends
quietly with exit status 141 (128 + SIGPIPE, what a shell reports for a C
tool killed by SIGPIPE), without a traceback. Python ignores SIGPIPE, so a
write to a closed pipe raises ``BrokenPipeError`` at the write, never in the
middle of other work: a command's effects (an apply stored by the master,
certificates written) are whole before it prints about them. ``main`` turns
that error into 141 (``output_closed``, ``discard_output``). Read-only
commands also watch their output while they wait (``run_reader``): ``events
--follow | head -3`` ends as soon as ``head`` does, not at the next event.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import select
import stat
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TextIO

import trio

from procurator.core.errors import UnavailableError
from procurator.core.models import VmAssignment, VmStatus
from procurator.rpc.bridge import open_bridge
from procurator.rpc.clients import open_control
from procurator.rpc.messages import FleetStatus, VmDescription, WorkerEvent
from procurator.rpc.tls import TlsFiles

__all__ = [
    "EXIT_OUTPUT_CLOSED",
    "add_commands",
    "control_from_args",
    "describe_json",
    "discard_output",
    "event_json",
    "event_line",
    "output_closed",
    "print_description",
    "print_vm_table",
    "run_reader",
    "status_vm_json",
]

EXIT_OK = 0
# The reader of our output went away (``procurator status | head``): 128 +
# SIGPIPE, the status a shell reports for a tool that SIGPIPE killed.
EXIT_OUTPUT_CLOSED = 141

# How many events ``describe`` shows by default, and how many ``events``
# fetches per call.
DESCRIBE_EVENTS = 20
EVENTS_PAGE = 1000


def control_from_args(bridge: Any, args: argparse.Namespace) -> Any:
    """``open_control`` for a subcommand's --master, --tls-* and --insecure."""
    tls = TlsFiles.from_options(args.tls_cert, args.tls_key, args.tls_ca)
    return open_control(bridge, args.master, tls=tls, insecure=args.insecure)


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
        "events": [event_json(e) for e in d.events],
    }


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


# ---------------------------------------------------------------- status


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


# ---------------------------------------------------------------- pipes


def _reader_gone(fd: int) -> bool:
    """Whether ``fd`` is a pipe (or socket, or terminal) whose other end
    is closed. ``poll`` reports that (POLLERR for a pipe without readers,
    POLLHUP for a socket or a hung-up terminal) whatever events are asked
    for; a file, ``/dev/null`` or a closed descriptor never shows it."""
    poller = select.poll()
    poller.register(fd, 0)
    return any(mask & (select.POLLERR | select.POLLHUP) for _, mask in poller.poll(0))


def output_closed(errors: Iterable[BaseException]) -> bool:
    """Whether ``errors`` (the leaves of what ended a command) mean that the
    reader of our output went away: a ``BrokenPipeError`` among them, and
    stdout or stderr now without a reader. A broken pipe anywhere else (a
    socket of ours) is a bug to show, not a reader to ignore."""
    return any(isinstance(e, BrokenPipeError) for e in errors) and (
        _reader_gone(1) or _reader_gone(2)
    )


def discard_output() -> None:
    """Point stdout and stderr, where their reader went away, at /dev/null.

    Python flushes them once more at exit; into a closed pipe that flush
    would fail, print "Exception ignored ... BrokenPipeError" and turn the
    exit status into 120. Whatever is still buffered goes nowhere instead:
    no one is left to read it."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            if _reader_gone(fd):
                os.dup2(devnull, fd)
    finally:
        os.close(devnull)


async def _until_output_closed() -> None:
    """Return when stdout is a pipe and its last reader closes it; sleep
    forever otherwise (a terminal, a file, captured output)."""
    try:
        fd = sys.stdout.fileno()
        pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except (AttributeError, OSError, ValueError):  # no stdout, or not a real file
        pipe = False
    if not pipe:
        await trio.sleep_forever()
    # The write end of a pipe never becomes readable: epoll reports it only
    # with EPOLLERR, once no reader is left, and trio wakes a reader waiting
    # on it for that. The check after each wake-up keeps a stray one (a FIFO
    # opened read-write) from ending the command.
    while not _reader_gone(fd):
        await trio.lowlevel.wait_readable(fd)
        if not _reader_gone(fd):
            await trio.sleep(0.5)


async def run_reader(
    command: Callable[[argparse.Namespace], Awaitable[int]], args: argparse.Namespace
) -> int:
    """Run a read-only command, and stop it as soon as the reader of its
    output goes away: ``events --follow | head -3`` ends when ``head`` does,
    even if no event follows; ``main`` reports it as ``EXIT_OUTPUT_CLOSED``.
    Only for commands that change nothing: a cancelled read leaves nothing
    half done (``apply`` is not run this way, so an apply is always sent
    and answered, whatever becomes of its output)."""

    async def watch() -> None:
        await _until_output_closed()
        raise BrokenPipeError(errno.EPIPE, "the reader of standard output went away")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        code = await command(args)
        nursery.cancel_scope.cancel()
    return code


# ---------------------------------------------------------------- parsers


def _positive(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"must be 1..10000, not {text}")
    return value


def add_commands(
    sub: Any,
    *,
    master_default: str,
    add_common: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Register ``describe`` and ``events`` on the ``procurator`` parser."""
    raw = argparse.RawDescriptionHelpFormatter

    def add_master(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--master",
            default=master_default,
            help=f"master address (default: $PROCURATOR_MASTER or {master_default})",
        )

    p = sub.add_parser(
        "describe",
        help="show one VM: desired vs observed state, its worker and recent events",
        description=(
            "Show everything the master knows about one VM: desired vs observed\n"
            "hash, generation, power and phase; its worker and address; restarts;\n"
            "the last error; its recent events with their operation ids.\n\n"
            "example:\n  procurator describe vm web-1\n  procurator describe vm web-1 --json"
        ),
        formatter_class=raw,
    )
    p.add_argument("kind", choices=["vm"], help="what to describe (vm)")
    p.add_argument("id", help="the VM's id")
    p.add_argument(
        "--events",
        type=_count,
        default=DESCRIBE_EVENTS,
        help=f"how many recent events to show (default: {DESCRIBE_EVENTS})",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_master(p)
    add_common(p)
    p.set_defaults(handler=lambda args: trio.run(run_reader, _describe, args))

    p = sub.add_parser(
        "events",
        help="print the fleet's recent VM events; --follow streams new ones",
        description=(
            "Print recent VM events the workers reported (created, booted,\n"
            "crashed, restarted, replaced, stopped, paused, resumed, failed,\n"
            "readopted, removed), oldest first, each with its operation id.\n"
            "The master keeps a bounded recent history (per VM and overall).\n"
            "--follow keeps polling the master for new events (every --interval\n"
            "seconds) until interrupted.\n\n"
            "example:\n  procurator events --vm web-1 --follow\n  procurator events --json"
        ),
        formatter_class=raw,
    )
    p.add_argument("--vm", default="", metavar="ID", help="only this VM's events")
    p.add_argument(
        "--limit",
        type=_count,
        default=100,
        help="how many recent events to print first (default: 100)",
    )
    p.add_argument("--follow", "-f", action="store_true", help="keep printing new events")
    p.add_argument(
        "--interval",
        type=_positive,
        default=1.0,
        help="seconds between polls with --follow (default: 1)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    add_master(p)
    add_common(p)
    p.set_defaults(handler=lambda args: trio.run(run_reader, _events, args))
