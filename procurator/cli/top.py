"""``procurator top``: a live view of the fleet in the terminal.

Workers (connected, desired vs observed generation, VMs by phase, last
report), the fleet's convergence and its recent events, refreshed in place
on a terminal (``rich``'s ``Live``) and printed as plain lines otherwise.

How it reads the master: a blocking ``Control.status`` (``wait_index`` =
the change index of the answer before) answers as soon as anything a
status shows changes (an apply, a report, a connect), or after ``--wait``
seconds, so ages move; then ``Control.events`` after the last event seen.
A read starts at most once per ``--interval`` (1 s): a fleet whose status
changes many times a second costs one status read a second per viewer, not
one per change. A status carries every VM of the fleet (about 2 MB at
10,000 VMs): a few viewers are fine, a wall of them is not.

Plain mode (stdout not a terminal, or ``--plain``): each line starts with
the time; the fleet line and a worker's line are printed when they change
(ages excluded), every new event once. When the reader goes away
(``procurator top | head``) it ends at once, quietly, with status 141, as
every read-only command does (``procurator.cli.pipes.run_reader``).

When the master goes away after the first answer, the view says so and
reconnects every ``--interval``; the first connection failing is an error,
as for every command.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TextIO

import trio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from procurator.cli.connect import control_from_args
from procurator.cli.exits import EXIT_OK
from procurator.cli.ops import event_line
from procurator.cli.pipes import run_reader
from procurator.core.control import FleetStatus, WorkerConnection, WorkerEvent
from procurator.core.errors import UnavailableError
from procurator.core.models import Phase
from procurator.rpc.bridge import open_bridge

__all__ = [
    "FleetFrame",
    "PlainPrinter",
    "WorkerRow",
    "fleet_frame",
    "render",
    "run",
]

EVENTS_PAGE = 1000

# Phases as the worker table shows them: one column each for what an
# operator acts on, the transitional ones together.
_COLUMNS: tuple[tuple[str, tuple[Phase, ...]], ...] = (
    ("running", (Phase.RUNNING,)),
    ("paused", (Phase.PAUSED,)),
    ("stopped", (Phase.STOPPED,)),
    ("starting", (Phase.PENDING, Phase.REALISING, Phase.STARTING)),
    ("stopping", (Phase.STOPPING, Phase.REMOVING)),
    ("failed", (Phase.FAILED,)),
    ("crashLoop", (Phase.CRASH_LOOP,)),
    ("unknown", (Phase.UNKNOWN,)),
)


# ---------------------------------------------------------------- the frame


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One worker as the view shows it."""

    worker_id: str
    connected: bool
    since_unix_ms: int  # when it (dis)connected; 0: never seen
    desired_generation: int
    observed_generation: int
    desired_vms: int
    phases: tuple[tuple[str, int], ...]  # (column, count), every column
    last_report_unix_ms: int

    @property
    def converged(self) -> bool:
        return self.connected and self.observed_generation == self.desired_generation

    def line(self) -> str:
        """The worker in one line, ages left out (plain mode prints it when
        it changes)."""
        state = "connected" if self.connected else "disconnected"
        counts = " ".join(f"{name} {count}" for name, count in self.phases if count)
        return (
            f"worker {self.worker_id}: {state}, generation {self.observed_generation}"
            f"/{self.desired_generation}{'' if self.converged else ' (not converged)'}, "
            f"{self.desired_vms} VMs desired; {counts or 'no VMs reported'}"
        )


@dataclass(frozen=True, slots=True)
class FleetFrame:
    """Everything one refresh shows; built by :func:`fleet_frame`."""

    master: str
    generation: int
    workers: tuple[WorkerRow, ...]
    events: tuple[WorkerEvent, ...]  # the newest, oldest first
    taken_unix: float
    problem: str = ""  # why the figures may be stale (master unreachable)
    phase_totals: tuple[tuple[str, int], ...] = field(default=())

    @property
    def connected(self) -> int:
        return sum(1 for w in self.workers if w.connected)

    @property
    def converged(self) -> int:
        return sum(1 for w in self.workers if w.converged)

    def line(self) -> str:
        """The fleet in one line (no ages)."""
        counts = ", ".join(f"{name} {count}" for name, count in self.phase_totals if count)
        return (
            f"fleet generation {self.generation}: {self.connected}/{len(self.workers)} "
            f"workers connected, {self.converged}/{len(self.workers)} converged; "
            f"VMs: {counts or 'none reported'}"
        )


def _phase_columns(worker: WorkerConnection) -> tuple[tuple[str, int], ...]:
    counts: dict[Phase, int] = {}
    for vm in worker.status.vms if worker.status else ():
        counts[vm.phase] = counts.get(vm.phase, 0) + 1
    return tuple((name, sum(counts.get(p, 0) for p in phases)) for name, phases in _COLUMNS)


def fleet_frame(
    master: str,
    status: FleetStatus,
    events: Sequence[WorkerEvent],
    *,
    now_unix: float,
    problem: str = "",
) -> FleetFrame:
    """What to show for ``status`` and the newest ``events``. Pure."""
    rows = tuple(
        WorkerRow(
            worker_id=w.worker_id,
            connected=w.connected,
            since_unix_ms=w.since_unix_ms,
            desired_generation=w.desired_generation,
            observed_generation=w.status.observed_generation if w.status else 0,
            desired_vms=w.vm_count,
            phases=_phase_columns(w),
            last_report_unix_ms=w.last_report_unix_ms,
        )
        for w in status.workers
    )
    totals = tuple((name, sum(dict(row.phases)[name] for row in rows)) for name, _ in _COLUMNS)
    return FleetFrame(
        master=master,
        generation=status.generation,
        workers=rows,
        events=tuple(events),
        taken_unix=now_unix,
        problem=problem,
        phase_totals=totals,
    )


def _age(unix_ms: int, now_unix: float) -> str:
    """``12s``, ``4m``, ``3h``, ``2d`` since ``unix_ms``; ``-`` for never."""
    if unix_ms <= 0:
        return "-"
    seconds = max(0.0, now_unix - unix_ms / 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{math.floor(seconds / size)}{unit}"
    return f"{math.floor(seconds)}s"


def _clock(unix: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(unix))


# ---------------------------------------------------------------- terminal


_PHASE_STYLE = {"failed": "bold red", "crashLoop": "bold red", "unknown": "yellow"}


def render(frame: FleetFrame) -> RenderableType:
    """The frame as ``rich`` renderables: a header, the worker table, the
    recent events."""
    now = frame.taken_unix
    header = Text()
    header.append("procurator top", style="bold")
    header.append(f"  master {frame.master}  {_clock(now)}\n")
    header.append(f"fleet generation {frame.generation}  ")
    total = len(frame.workers)
    header.append(
        f"workers {frame.connected}/{total} connected  ",
        style="" if frame.connected == total else "bold yellow",
    )
    header.append(
        f"{frame.converged}/{total} converged",
        style="green" if frame.converged == total else "bold yellow",
    )
    counts = "  ".join(f"{name} {count}" for name, count in frame.phase_totals if count)
    header.append(f"\nVMs  {counts or 'none reported'}")
    if frame.problem:
        header.append(f"\n{frame.problem}", style="bold red")

    table = Table(expand=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("WORKER")
    table.add_column("STATE")
    table.add_column("GENERATION", justify="right")
    table.add_column("VMS", justify="right")
    for name, _ in _COLUMNS:
        table.add_column(name.upper(), justify="right")
    table.add_column("REPORTED", justify="right")
    for row in frame.workers:
        state = (
            Text("connected", style="green")
            if row.connected
            else Text(f"down {_age(row.since_unix_ms, now)}", style="bold red")
        )
        generation = Text(
            f"{row.observed_generation}/{row.desired_generation}",
            style="" if row.converged else "bold yellow",
        )
        cells: list[Text | str] = [row.worker_id, state, generation, str(row.desired_vms)]
        for name, count in row.phases:
            cells.append(Text(str(count), style=_PHASE_STYLE.get(name, "") if count else "dim"))
        cells.append(_age(row.last_report_unix_ms, now))
        table.add_row(*cells)

    events = Text()
    events.append("recent events\n", style="bold")
    for item in frame.events:
        style = "red" if item.event.kind.value in ("failed", "crashed") else ""
        events.append(event_line(item) + "\n", style=style)
    if not frame.events:
        events.append("none\n", style="dim")
    return Group(header, Text(""), table, Text(""), events)


# ---------------------------------------------------------------- pipes


class PlainPrinter:
    """Plain mode: prints what changed since the last frame, one line each,
    starting with the time."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._fleet = ""
        self._workers: dict[str, str] = {}
        self._last_seq = 0
        self._problem = ""

    def show(self, frame: FleetFrame) -> None:
        stamp = _clock(frame.taken_unix)
        lines: list[str] = []
        if frame.problem != self._problem:
            self._problem = frame.problem
            lines.append(frame.problem or "master reachable again")
        fleet = frame.line()
        if fleet != self._fleet:
            self._fleet = fleet
            lines.append(fleet)
        seen = set()
        for row in frame.workers:
            seen.add(row.worker_id)
            text = row.line()
            if self._workers.get(row.worker_id) != text:
                self._workers[row.worker_id] = text
                lines.append(text)
        for gone in self._workers.keys() - seen:
            del self._workers[gone]
            lines.append(f"worker {gone}: no longer in the fleet")
        for item in frame.events:
            if item.seq > self._last_seq:
                self._last_seq = item.seq
                lines.append("event " + event_line(item))
        for line in lines:
            print(f"{stamp} {line}", file=self._out)
        self._out.flush()


# ---------------------------------------------------------------- the loop


class _Control(Protocol):
    async def status(self, *, wait_index: int = 0, wait: float = 0.0) -> FleetStatus: ...

    async def events(
        self, vm_id: str = "", limit: int = 100, *, after_seq: int = 0
    ) -> tuple[WorkerEvent, ...]: ...


@dataclass(slots=True)
class _Reader:
    """What the loop remembers between reads of the master."""

    keep_events: int  # how many of the newest events the frames carry
    first_events: int  # how many recent events the first read fetches
    index: int = 0
    events: list[WorkerEvent] = field(default_factory=list)
    status: FleetStatus | None = None

    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    async def read(self, client: _Control, wait: float) -> None:
        """One blocking status read (it answers at once the first time),
        then the events received since the last one seen."""
        self.status = await client.status(wait_index=self.index, wait=wait if self.index else 0)
        self.index = self.status.change_index
        if not self.keep_events or not self.first_events:
            return
        last = self.last_seq()
        if last:
            fresh = await client.events("", EVENTS_PAGE, after_seq=last)
        else:
            fresh = await client.events("", self.first_events)
        self.events = (self.events + list(fresh))[-self.keep_events :]


async def _run(
    args: argparse.Namespace, *, show: Callable[[FleetFrame], None], keep_events: int
) -> int:
    reader = _Reader(keep_events=keep_events, first_events=args.events)
    connected_once = False
    while True:
        try:
            async with open_bridge() as bridge, control_from_args(bridge, args) as client:
                while True:
                    began = trio.current_time()
                    await reader.read(client, args.wait)
                    connected_once = True
                    assert reader.status is not None
                    show(
                        fleet_frame(args.master, reader.status, reader.events, now_unix=time.time())
                    )
                    if args.once:
                        return EXIT_OK
                    # At most one read per --interval, however often the
                    # fleet changes.
                    await trio.sleep_until(began + args.interval)
        except UnavailableError as exc:
            if not connected_once:
                raise
            reader.index = 0  # a new master (or the same, restarted) has a new index
            if reader.status is not None:
                problem = f"master unreachable: {exc}; retrying every {args.interval:g} s"
                show(
                    fleet_frame(
                        args.master,
                        reader.status,
                        reader.events,
                        now_unix=time.time(),
                        problem=problem,
                    )
                )
            await trio.sleep(args.interval)


@contextlib.contextmanager
def _plain_output(out: TextIO) -> Iterator[Callable[[FleetFrame], None]]:
    yield PlainPrinter(out).show


@contextlib.contextmanager
def _live_output(console: Console) -> Iterator[Callable[[FleetFrame], None]]:
    # Anything written to stderr meanwhile (a warning) is printed above the
    # view instead of through it.
    with Live(console=console, auto_refresh=False, redirect_stderr=True) as live:

        def show(frame: FleetFrame) -> None:
            live.update(render(frame), refresh=True)

        yield show


def run(args: argparse.Namespace) -> int:
    """``procurator top`` (its flags: ``procurator.cli.parsers.top``)."""
    out = sys.stdout
    console = Console(file=out)
    plain = args.plain or not console.is_terminal
    # Plain mode prints every new event, not only the newest --events.
    keep = (EVENTS_PAGE if args.events else 0) if plain else args.events
    output = _plain_output(out) if plain else _live_output(console)
    with output as show:
        # A read-only command: it ends as soon as the reader of a pipe goes
        # away (EXIT_OUTPUT_CLOSED, see procurator.cli.pipes), not at the next change.
        return trio.run(run_reader, functools.partial(_run, show=show, keep_events=keep), args)


# ---------------------------------------------------------------- parser
