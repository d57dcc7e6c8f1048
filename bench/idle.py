"""3. Idle cost: the worker process holding the N-VM fleet, nothing to do,
with everything a production worker runs on (health checks, counter polls,
the metrics poller and its HTTP exporter, status and metric reports,
periodic resync), at the default intervals.

Measured from /proc over a window (60 s; 10 s with ``--quick``): the
worker's CPU seconds / wall seconds (share of one core; the process's
``utime + stime``, which keeps the time of threads that ended in the
window: trio's worker threads, which run the metrics poll, end after 10 s
idle) and its resident memory at the end. Shown next to them, same window: the CPU the N fake
VMMs spent answering the worker (the load it puts on its VMMs) and the
worker's threads: the busiest ones by name where the OS knows it (the
sweep, ``vm-sweep``, is named by Python only, so threads are told apart by
their share) and all the others together (the turn pool's threads),
with their wake-ups a second, from each thread's ``schedstat`` (ns) and
voluntary context switches: per-thread ``utime`` counts whole 10 ms ticks,
useless for a thread that runs a few µs a second.

With the tiny fake VMM (``--vmm tiny``), a full run then grows the same
fleet to 10,000 VMs (issue 31 asks for the figures there; or as many as the
worker's open-file limit holds, saying so) and measures again. When
``change`` runs before it (``python -m bench --only change --only idle``),
``change`` grows the fleet itself; idle's window at the first size is then
taken just before that growth (``window_before_growth``) and the second
after ``change`` ends.

Each window waits first (at most ``FREEZE_WAIT``) for the worker to have
frozen its long-lived objects at the fleet's size (its log's last
"froze the worker's long-lived objects: N VMs" line,
``procurator.worker.heap``): the freeze, one full collection of ~0.1 s at
1,000 VMs, comes up to two metrics polls after the fleet stops changing; it
is part of the change before, not of the idle worker. A worker that logs no
such line (an older build) is watched after the wait.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from bench._harness import (
    Row,
    Run,
    cpu_seconds,
    fake_vmm_pids,
    rss_bytes,
    run_seconds,
    thread_count,
)
from bench.change import _fitting, _grow
from bench.start import OneWorkerFleet, one_worker_fleet

NAME = "idle"
LARGE = 10_000
BUSIEST = 4  # threads shown on their own; the rest are the VMs' supervisors
# The most a window waits for the worker's freeze: two still polls at the
# default 15 s metrics interval, and some.
FREEZE_WAIT = 45.0
_FROZE = b"froze the worker's long-lived objects: "


def _total_cpu(pids: list[int]) -> float:
    """CPU seconds of single-threaded processes (the fake VMMs), in ns
    resolution: a VMM answering one call every 15 s runs µs, not ticks."""
    total = 0.0
    for pid in pids:
        try:
            total += run_seconds(pid)
        except OSError:
            continue
    return total


def _threads(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (ns run, voluntary context switches) of every thread of ``pid``."""
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/status", "rb") as f:
                status = f.read()
        except OSError:
            continue  # ended meanwhile
        switches = int(status.split(b"\nvoluntary_ctxt_switches:")[1].split()[0])
        found[int(tid)] = (ns, switches)
    return found


@dataclass(frozen=True)
class _Window:
    seconds: float
    worker_seconds: float  # the process: every thread, ended ones too
    live_ns: int  # the threads alive at both ends
    vmm_seconds: float
    vmms: int
    busiest: list[tuple[int, int, int]]  # (ns, switches, tid), busiest first
    others_ns: int
    others_switches: int
    others: int


def _frozen_at(fleet: OneWorkerFleet) -> int | None:
    """The fleet size of the worker's last freeze in its log (None: none)."""
    text = fleet.worker.log.read_bytes()
    at = text.rfind(_FROZE)
    if at < 0:
        return None
    count = text[at + len(_FROZE) :].split(b" ", 1)[0]
    return int(count) if count.isdigit() else None


def _wait_frozen(run: Run, fleet: OneWorkerFleet) -> None:
    """Until the worker froze its long-lived objects at ``fleet.n`` VMs, at
    most ``FREEZE_WAIT`` (module docstring)."""
    deadline = time.monotonic() + FREEZE_WAIT
    while _frozen_at(fleet) != fleet.n:
        if time.monotonic() > deadline:
            run.log(f"idle: no freeze of {fleet.n} VMs logged by the worker; watching anyway")
            return
        fleet.worker.check_alive()
        time.sleep(0.5)


def _watch(run: Run, fleet: OneWorkerFleet, window: float) -> _Window:
    pid = fleet.worker.pid
    _wait_frozen(run, fleet)
    vmms = fake_vmm_pids(run, exclude={pid, fleet.master.pid})
    run.log(f"idle: watching the worker ({len(vmms)} VMMs) for {window:.0f} s")
    cpu0, threads0, vmm0, t0 = cpu_seconds(pid), _threads(pid), _total_cpu(vmms), time.monotonic()
    time.sleep(window)
    cpu1, threads1, vmm1, t1 = cpu_seconds(pid), _threads(pid), _total_cpu(vmms), time.monotonic()
    fleet.worker.check_alive()
    deltas = sorted(
        (
            (ns - threads0.get(tid, (0, 0))[0], switches - threads0.get(tid, (0, 0))[1], tid)
            for tid, (ns, switches) in threads1.items()
            if tid in threads0
        ),
        reverse=True,
    )
    rest = deltas[BUSIEST:]
    return _Window(
        seconds=t1 - t0,
        worker_seconds=cpu1 - cpu0,
        live_ns=sum(d[0] for d in deltas),
        vmm_seconds=vmm1 - vmm0,
        vmms=len(vmms),
        busiest=deltas[:BUSIEST],
        others_ns=sum(d[0] for d in rest),
        others_switches=sum(d[1] for d in rest),
        others=len(rest),
    )


def _rows(fleet: OneWorkerFleet, w: _Window, window: float, note: str = "") -> list[Row]:
    pid = fleet.worker.pid
    share = w.worker_seconds / w.seconds
    ended = max(0.0, w.worker_seconds - w.live_ns / 1e9) / w.seconds
    busiest = ", ".join(
        f"{'main ' if tid == pid else ''}{ns / 1e6 / w.seconds:.2f} ms/s"
        for ns, _, tid in w.busiest
    )
    others = (
        f"the other {w.others} threads {w.others_ns / 1e6 / w.seconds:.2f} ms/s together, "
        f"{w.others_switches / w.seconds:.1f} wake-ups/s; threads started or ended "
        f"in the window (trio's, the metrics poll) ~{ended * 1000:.2f} ms/s"
    )
    return [
        Row(
            NAME,
            f"worker CPU, idle with {fleet.n} VMs ({window:.0f} s window)",
            f"{share * 100:.2f} % of a core",
            f"{w.vmm_seconds / w.seconds * 100:.2f} % its {w.vmms} VMMs",
            "",
            "<= 1 %",
            note=(
                f"idle at {fleet.n} VMs: the worker runs {thread_count(pid)} threads; "
                f"by CPU: {busiest}; {others}" + (f"; {note}" if note else "")
            ),
        ),
        Row(
            NAME,
            f"worker resident memory with {fleet.n} VMs",
            f"{rss_bytes(pid) / 2**20:.0f} MiB",
            "",
            "",
            "<= 150 MiB",
        ),
    ]


# run.shared: (fleet size, rows) of a window taken before change grew the fleet
_EARLIER = "idle.earlier_window"


def _window(run: Run, fleet: OneWorkerFleet) -> list[Row]:
    window = 10.0 if run.quick else 60.0
    time.sleep(5.0)  # let the last change's reports and events drain
    return _rows(fleet, _watch(run, fleet, window), window)


def window_before_growth(run: Run, fleet: OneWorkerFleet) -> None:
    """Idle's window at the fleet's present size, taken when ``change`` is
    about to grow it (``change.BEFORE_GROWTH``); ``measure`` reports it
    first."""
    run.shared[_EARLIER] = (fleet.n, _window(run, fleet))


def measure(run: Run) -> list[Row]:
    fleet = one_worker_fleet(run)
    window = 10.0 if run.quick else 60.0
    earlier: tuple[int, list[Row]] = run.shared.pop(_EARLIER, (0, []))
    earlier_n, rows = earlier
    if earlier_n != fleet.n:  # not measured at this size yet
        rows = [*rows, *_window(run, fleet)]
    if run.quick or run.vmm != "tiny" or fleet.n >= LARGE:
        return rows
    size, why = _fitting(fleet, LARGE, 1000)
    if size <= fleet.n:
        run.log(f"idle: not grown: {why}")
        return rows
    run.log(f"idle: growing the fleet to {size} VMs")
    _grow(run, fleet, size)
    time.sleep(15.0)  # the start's last reports, events and counters sweep
    return rows + _rows(fleet, _watch(run, fleet, window), window, why)
