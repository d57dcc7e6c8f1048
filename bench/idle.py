"""3. Idle cost: the worker process holding the N-VM fleet, nothing to do,
with everything a production worker runs on (health checks, counter polls,
the metrics poller and its HTTP exporter, status and metric reports,
periodic resync), at the default intervals.

Measured from /proc over a window (60 s; 10 s with ``--quick``): the
worker's CPU seconds / wall seconds (share of one core) and its resident
memory at the end. Shown next to them, same window: the CPU the N fake
VMMs spent answering the worker (the load it puts on its VMMs) and the
worker's thread count.
"""

from __future__ import annotations

import time

from bench._harness import (
    Row,
    Run,
    cpu_seconds,
    fake_vmm_pids,
    rss_bytes,
    thread_count,
)
from bench.start import one_worker_fleet

NAME = "idle"


def _vmm_pids(run: Run, exclude: set[int]) -> list[int]:
    return fake_vmm_pids(run, exclude=exclude)  # either --vmm


def _total_cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += cpu_seconds(pid)
        except OSError:
            continue
    return total


def measure(run: Run) -> list[Row]:
    fleet = one_worker_fleet(run)
    window = 10.0 if run.quick else 60.0
    pid = fleet.worker.pid
    time.sleep(5.0)  # let the last change's reports and events drain
    vmms = _vmm_pids(run, {pid, fleet.master.pid})
    run.log(f"idle: watching the worker ({len(vmms)} VMMs) for {window:.0f} s")
    cpu0, vmm0, t0 = cpu_seconds(pid), _total_cpu(vmms), time.monotonic()
    time.sleep(window)
    cpu1, vmm1, t1 = cpu_seconds(pid), _total_cpu(vmms), time.monotonic()
    fleet.worker.check_alive()
    share = (cpu1 - cpu0) / (t1 - t0)
    vmm_share = (vmm1 - vmm0) / (t1 - t0)
    rss = rss_bytes(pid)
    threads = thread_count(pid)
    return [
        Row(
            NAME,
            f"worker CPU, idle with {fleet.n} VMs ({window:.0f} s window)",
            f"{share * 100:.1f} % of a core",
            f"{vmm_share * 100:.1f} % its {len(vmms)} VMMs",
            "",
            "<= 1 %",
            note=f"the worker runs {threads} threads",
        ),
        Row(
            NAME,
            f"worker resident memory with {fleet.n} VMs",
            f"{rss / 2**20:.0f} MiB",
            "",
            "",
            "<= 150 MiB",
        ),
    ]
